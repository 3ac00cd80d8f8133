"""The statistics of a one-run privacy audit (Steinke, Nasr, Jagielski, NeurIPS 2023).

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
choice of k+ and k-) is in ``privacy/canaries.py``; see docs/privacy.md.
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
