"""The statistics of the privacy audits: the one-run bound (Steinke, Nasr, Jagielski, NeurIPS 2023)
and Gaussian-DP (Dong, Roth, Su 2022) estimates. Pure math; the audits themselves are in ``audit/``.

m canaries are each included in training with probability 1/2; after training the auditor
scores them and guesses "in" for the k+ highest scores and "out" for the k- lowest,
abstaining on the rest. If training is epsilon-DP, each of the k = k+ + k- guesses is right
with probability at most p = e^eps / (1 + e^eps), and the number right is stochastically
dominated by Binomial(k, p) (their Theorem 3.1, delta = 0). A run with r right guesses
therefore rejects every epsilon with P[Binomial(k, p(eps)) >= r] <= 1 - confidence, and the
largest rejected epsilon is an empirical lower bound on the epsilon training actually has.

This module holds the bound only; ``delta`` is ignored (the paper's delta correction lowers
the bound by an amount of order m * delta, negligible at delta = 1e-5 and m in the hundreds).
The training side of the audit (canaries inserted into one client, membership scores, the
choice of k+ and k-) is in ``audit/canaries.py``; the white-box audit is ``audit/whitebox.py``
(see docs/privacy.md). Gaussian DP, below: ``gdp_epsilon`` converts mu-GDP to epsilon at a delta,
``gdp_mu_lower`` fits mu to in/out scores with a one-sided bootstrap confidence limit.
"""

from __future__ import annotations

import math

from scipy.stats import binom


def _p(eps: float) -> float:
    return 1.0 / (1.0 + math.exp(-eps))


def epsilon_lower_bound(*, guesses: int, correct: int, confidence: float = 0.95, tol: float = 1e-4) -> float:
    """Largest epsilon rejected at ``confidence`` given ``correct`` right of ``guesses``.

    Returns 0.0 when even epsilon = 0 (coin flipping) cannot be rejected.
    """
    if not 0 <= correct <= guesses:
        raise ValueError(f"correct guesses must be in [0, {guesses}] (got {correct})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence})")
    alpha = 1.0 - confidence

    def rejected(eps: float) -> bool:  # P[Bin(k, p(eps)) >= r] <= alpha
        return bool(binom.sf(correct - 1, guesses, _p(eps)) <= alpha)

    if guesses == 0 or not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):  # the tail grows with eps: find an eps that is not rejected
        lo, hi = hi, 2 * hi
        if hi > 100:
            return lo
    while hi - lo > tol:  # invariant: rejected(lo), not rejected(hi)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------- Gaussian DP


def gdp_delta(mu: float, eps: float) -> float:
    """delta(eps) of mu-Gaussian DP (Dong, Roth, Su 2022, Corollary 2.13)."""
    from scipy.stats import norm  # noqa: PLC0415

    if mu <= 0:
        return 0.0
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with delta(epsilon) <= ``delta`` for mu-GDP (0 when mu = 0; inf for mu = inf)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (got {delta})")
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    if not math.isfinite(mu) or gdp_delta(mu, 700.0) > delta:
        return math.inf
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-6 * max(1.0, hi):  # delta(eps) decreases in eps
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gdp_delta(mu, mid) > delta else (lo, mid)
    return hi


def gdp_mu(scores_in, scores_out) -> float:
    """mu of the Gaussian fit: (mean of "in" - mean of "out") / std of "out" (inf when "out" has no spread)."""
    import numpy as np  # noqa: PLC0415

    a, b = np.asarray(scores_in, dtype=np.float64), np.asarray(scores_out, dtype=np.float64)
    diff, sd = float(a.mean() - b.mean()), float(b.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(float(b.mean()))):
        return math.inf if diff > 0 else 0.0
    return diff / sd


def gdp_mu_lower(scores_in, scores_out, *, confidence: float = 0.95, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mu, one-sided lower confidence limit of mu) from in/out scores; the limit is the (1 - confidence)
    quantile of ``resamples`` bootstrap resamples (in and out resampled separately, seeded)."""
    import numpy as np  # noqa: PLC0415

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence})")
    a, b = np.asarray(scores_in, dtype=np.float64), np.asarray(scores_out, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return 0.0, 0.0
    mu = gdp_mu(a, b)
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    for i in range(resamples):
        boot[i] = gdp_mu(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
    return mu, float(max(0.0, np.quantile(boot, 1 - confidence, method="lower")))
