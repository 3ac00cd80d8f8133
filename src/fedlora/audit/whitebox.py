"""The white-box audit: Dirac gradient canaries inserted at the DP step itself, scored on what is released.

The strongest adversary of the threat model sees every privatised gradient that a client's upload
is a post-processing of, knows every other record of the client, and may choose the audited
records' gradients. The audit plays that adversary against the production DP step:

1. *Real gradients* (:func:`collect`): the canary client of a real configuration trains alone for
   the configured T = rounds x local_steps steps (its Poisson batches, its method's schedule, its
   optimizer on the honestly privatised gradient); the per-sample gradients of every step come from
   ``fedlora.federation.client.local_gradients`` itself (the fused hooks and the exact fallback),
   captured where it calls ``privatize``.
2. *Canaries* (:func:`replay`): canary j owns one coordinate of the active, released tensors (every
   coordinate by default; the tensors that are active at every step). It is in the client's data with
   probability 1/2 (seeded, independent), and an "in" canary is Poisson-sampled at every step with
   the client's rate q, like any record. A sampled canary is one extra per-sample row: a gradient of
   norm ``scale`` x C on its coordinate and 0 elsewhere (the honest step clips it to exactly C).
   The rows are added to the step's real per-sample gradients and the whole dict goes through the
   mechanism (the production ``privatize`` for the honest row).
3. *Scores*: the auditor multiplies the released gradient by the public expected batch size,
   subtracts the honestly clipped sum of the real rows (it knows the other records), divides by C,
   and reads canary j's coordinate y_jt; its score is sum_t log(1 - q + q exp((y_jt - 1/2) / sigma^2)),
   the log-likelihood ratio of "sampled with prob. q" against "absent" for the Poisson-subsampled
   Gaussian step at the claimed sigma (any score is valid; this one is the most powerful per step).
4. *Bound*: (a) the Gaussian-DP estimate: mu = (mean in - mean out) / std out, its one-sided
   lower confidence limit by bootstrap, converted to epsilon at the run's delta (an *estimate*: it
   assumes the in/out trade-off is Gaussian, which the CLT makes close for T steps of DP-SGD); (b) the
   one-run bound of Steinke, Nasr and Jagielski (2023) on the same scores (a rigorous bound for
   pure epsilon-DP, far from tight for subsampled mechanisms). Each is at confidence 1 - alpha/2 and
   the reported bound is the larger. The claim is the production accountant's epsilon for the
   client's (sigma, q, T) at delta.

Canaries on distinct coordinates with independent sampling and per-coordinate noise are
independent trials; ``repeats`` independent replays of the mechanism on the same real gradients
add trials. The real gradients are the same in every replay and every mutation (they are "other
records" to the auditor, who subtracts their honest clipped sum).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedlora.config import ExperimentConfig
from fedlora.errors import ConfigError
from fedlora.privacy.accounting import epsilon as accountant_epsilon
from fedlora.privacy.audit import gdp_epsilon, gdp_mu_lower
from fedlora.privacy.dpsgd import DPParams, Grads, clip_factors, clipped_sum, privatize
from fedlora.privacy.noise import NoiseSource, noise_stream
from fedlora.seeds import derive_seed

Mechanism = Callable[[Grads, DPParams, NoiseSource], Grads]
CANARY_SCALE = 4.0  # a canary's gradient norm before clipping, in units of C (the honest step clips it to C)
REPEATS = 4
QUIET_FRACTION = 0.85  # default canaries: this share of the coordinates, those where the real gradients are smallest


@dataclass
class Collected:
    """The canary client's real per-sample gradients, step by step, and its public DP facts."""

    cfg: ExperimentConfig
    client: int
    sample_rate: float
    dp: DPParams  # the calibrated DP parameters of the configuration (the claim's sigma)
    indices: np.ndarray
    steps: list[tuple[int, Grads]]  # (round, per-sample gradients of the active tensors)
    names: list[str]  # the tensors that carry canaries (active at every step, released)
    seconds: float
    _known: dict[float, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return int(sum(self.steps[0][1][k].shape[1:].numel() for k in self.names))

    def quiet_order(self) -> np.ndarray:
        """Canary coordinates, quietest first: the real rows' summed squared per-sample gradient over all steps
        (the auditor knows the other records; canaries where they are loud only add variance)."""
        energy = torch.zeros(self.dims, dtype=torch.float64)
        for _, real in self.steps:
            energy += torch.cat([real[k].double().pow(2).sum(0).flatten() for k in self.names])
        return np.argsort(energy.numpy(), kind="stable")

    def known_sum(self, clip_norm: float) -> list[torch.Tensor]:
        """Per step: the honestly clipped sum of the real rows on the canary tensors, flat (the auditor's knowledge)."""
        if clip_norm not in self._known:
            out = []
            for _, real in self.steps:
                summed = clipped_sum(real, clip_factors(real, clip_norm))
                out.append(torch.cat([summed[k].flatten().double() for k in self.names]))
            self._known[clip_norm] = out
        return self._known[clip_norm]


@contextmanager
def _capture(store: list[Grads]):
    """While active, ``local_gradients`` hands its per-sample gradients to ``store`` on the way to ``privatize``."""
    import fedlora.federation.client as client_mod  # noqa: PLC0415

    original = client_mod.privatize

    def capture(per_sample: Grads, dp: DPParams, noise: NoiseSource) -> Grads:
        store.append({k: v.detach().clone() for k, v in per_sample.items()})
        return original(per_sample, dp, noise)

    client_mod.privatize = capture
    try:
        yield
    finally:
        client_mod.privatize = original


def collect(cfg: ExperimentConfig, *, client: int | None = None) -> Collected:
    """Train the canary client alone for T steps; keep each step's real per-sample gradients."""
    from fedlora.federation.client import _optimizer, local_gradients, poisson_batch  # noqa: PLC0415
    from fedlora.federation.simulation import Simulation  # noqa: PLC0415
    from fedlora.seeds import generator  # noqa: PLC0415

    if not cfg.privacy.enabled:
        raise ConfigError("the white-box audit checks sample-level DP-SGD: set privacy.enabled=true")
    start = time.perf_counter()
    # The frozen-prefix cache is exact but costs a pass over the whole training set; T batches do not need it.
    sim = Simulation(cfg.model_copy(update={"task": cfg.task.model_copy(update={"cache_prefix": False})}))
    if client is None:  # the largest sampling rate: the most Gaussian mechanism, the most powerful audit
        client = int(np.argmax([s.sample_rate for s in sim.specs]))
    if not 0 <= client < len(sim.specs):
        raise ConfigError(f"--client {client} is not a client of this run (0..{len(sim.specs) - 1})")
    spec, rt, method, seed = sim.specs[client], sim.rt, sim.method, cfg.train.seed
    adapted = rt.adapted
    adapted.load(sim.init_local)
    adapted.load(sim.global_state)
    adapted.model.train()
    steps: list[tuple[int, Grads]] = []
    active_sets: list[set[str]] = []
    for rnd in range(1, cfg.federation.rounds + 1):
        plan = method.plan(sim.plan_context(rnd))
        trainable = [adapted.params[k] for k in sorted(plan.trainable)]
        optimizer = _optimizer(trainable, cfg.train)
        gen = generator(seed, "client", spec.cid, rnd)
        noise = spec.noise(seed, rnd)
        for step in range(cfg.federation.local_steps):
            active = sorted(method.schedule.active(plan, step))
            adapted.set_active(set(active))
            rows = poisson_batch(len(spec.indices), spec.sample_rate, gen)
            store: list[Grads] = []
            with _capture(store):
                grads, _ = local_gradients(rt, spec, rows, active, noise)
            if len(store) != 1:
                raise RuntimeError("local_gradients did not call fedlora.federation.client.privatize once; "
                                   "the white-box audit's capture (audit/whitebox.py) must follow the client code")
            steps.append((rnd, {k: v.cpu() for k, v in store[0].items()}))
            active_sets.append(set(active))
            grads = method.schedule.transform(grads, plan, step)
            optimizer.zero_grad(set_to_none=True)
            for k, g in grads.items():
                adapted.params[k].grad = g
            optimizer.step()
    adapted.set_active(set(adapted.params))
    always = set.intersection(*active_sets)
    released = sorted(always - sim.local_keys) or sorted(always)
    if not released:
        raise ConfigError(f"method '{method.name}' has no tensor active at every local step; the white-box audit "
                          "places its canaries on such tensors")
    return Collected(cfg, client, spec.sample_rate, spec.dp, spec.indices, steps, released, time.perf_counter() - start)


def dp_at(col: Collected, target_epsilon: float) -> DPParams:
    """The client's DP parameters had the configuration asked for ``target_epsilon`` (sigma calibrated
    by ``fedlora.federation.simulation.client_specs`` itself, same q, T and accountant)."""
    from fedlora.federation.simulation import client_specs  # noqa: PLC0415

    privacy = col.cfg.privacy.model_copy(update={"epsilon": float(target_epsilon)})
    cfg = col.cfg.model_copy(update={"privacy": privacy})
    dp = client_specs(cfg, [col.indices])[0].dp
    assert dp is not None
    return dp


def claimed_epsilon(col: Collected, dp: DPParams, steps: int | None = None) -> float:
    """The production accountant's epsilon for (sigma, q, steps) at the run's delta (default: all T steps)."""
    p = col.cfg.privacy
    return accountant_epsilon([(dp.noise_multiplier, col.sample_rate, len(col.steps) if steps is None else steps)],
                              delta=p.delta, accountant=p.accountant)


def _with_canaries(real: Grads, names: list[str], positions: np.ndarray, magnitude: float) -> Grads:
    """The step's per-sample dict with one extra row per sampled canary (a Dirac of ``magnitude``)."""
    k = len(positions)
    if k == 0:
        return real
    sizes = [real[n].shape[1:].numel() for n in names]
    dirac = torch.zeros(k, sum(sizes), dtype=real[names[0]].dtype)
    dirac[torch.arange(k), torch.as_tensor(positions)] = magnitude
    pieces = dict(zip(names, torch.split(dirac, sizes, dim=1), strict=True))
    out = {}
    for name, g in real.items():
        rows = pieces[name].reshape(k, *g.shape[1:]) if name in pieces else g.new_zeros((k, *g.shape[1:]))
        out[name] = torch.cat([g, rows.to(g.dtype)])
    return out


def replay(col: Collected, dp: DPParams, *, mechanism: Mechanism = privatize, mechanism_dp: DPParams | None = None,
           reproducible_noise: bool = False, auditor_knows_seed: bool = False, claim_steps: int | None = None,
           repeats: int = REPEATS, canaries: int | None = None, scale: float = CANARY_SCALE,
           confidence: float = 0.95, seed: int | None = None) -> dict[str, Any]:
    """Run ``mechanism`` (under ``mechanism_dp``, default ``dp``) on the real gradients plus Dirac canaries
    ``repeats`` times; score the canaries on the released gradients; bound epsilon against the claim
    (the accountant at ``dp`` over ``claim_steps``, default T). With ``reproducible_noise`` the
    mechanism's noise is the run's seeded stream, and with ``auditor_knows_seed`` the auditor
    regenerates it and subtracts it."""
    from fedlora.audit.canaries import best_guess_bound  # noqa: PLC0415

    start = time.perf_counter()
    seed = col.cfg.train.seed if seed is None else seed
    mech_dp = mechanism_dp or dp
    q, sigma, c = col.sample_rate, dp.noise_multiplier, dp.clip_norm
    dims = col.dims
    m = int(QUIET_FRACTION * dims) if canaries is None else min(int(canaries), dims)
    if m < 2:
        raise ConfigError(f"the white-box audit needs at least 2 canaries (got {m})")
    known = col.known_sum(c)
    alpha = 1 - confidence
    rng = np.random.default_rng(derive_seed(seed, "audit", "whitebox"))
    all_scores, all_in = [], []
    positions = np.sort(col.quiet_order()[:m])  # fixed before, and independent of, the inclusion bits
    means, variances = [], []  # per canary: mean and variance over steps of its coordinate (the fit)
    for _rep in range(repeats):
        included = rng.random(m) < 0.5
        scores, s1, s2 = np.zeros(m), np.zeros(m), np.zeros(m)
        noise = regen = None
        last_round = None
        for t, (rnd, real) in enumerate(col.steps):
            if rnd != last_round:  # one noise stream per round, as on the client
                noise = noise_stream(reproducible_noise, seed, "client", col.client, rnd)
                regen = noise_stream(True, seed, "client", col.client, rnd) if auditor_knows_seed else None
                last_round = rnd
            sampled = np.flatnonzero(included & (rng.random(m) < q))
            released = mechanism(_with_canaries(real, col.names, positions[sampled], scale * c), mech_dp, noise)
            resid = torch.cat([released[k].flatten().double() for k in col.names]) * dp.expected_batch_size - known[t]
            if regen is not None:  # regenerate the seeded draws in privatize's order and subtract them
                draws = {k: regen.normal(released[k].shape, dtype=torch.float32, device="cpu") for k in sorted(released)}
                resid = resid - sigma * c * torch.cat([draws[k].flatten().double() for k in col.names])
            y = resid.numpy()[positions] / c
            s1 += y
            s2 += y * y
            with np.errstate(over="ignore"):
                scores += np.logaddexp(math.log1p(-q), math.log(q) + (y - 0.5) / sigma**2) if sigma > 0 else y
        all_scores.append(scores)
        all_in.append(included)
        n = len(col.steps)
        means.append(s1 / n)
        variances.append(np.maximum(s2 / n - (s1 / n) ** 2, 0.0) * n / max(n - 1, 1))
    scores, included = np.concatenate(all_scores), np.concatenate(all_in)
    fit = subsampled_gaussian_fit(col, dp, np.concatenate(means), np.concatenate(variances), included,
                                  confidence=1 - alpha / 3, claim_steps=len(col.steps), seed=seed)
    mu, mu_low = gdp_mu_lower(scores[included], scores[~included], confidence=1 - alpha / 3,
                              seed=derive_seed(seed, "audit", "bootstrap"))
    delta = col.cfg.privacy.delta
    eps_gdp, eps_gdp_point = gdp_epsilon(mu_low, delta), gdp_epsilon(mu, delta)
    snj = best_guess_bound(scores, included, 1 - alpha / 3)
    bound = max(eps_gdp, snj.get("epsilon_lower_bound", 0.0), fit["epsilon_lower"])
    claimed = claimed_epsilon(col, dp, claim_steps)
    return {"claimed_epsilon": claimed, "epsilon_lower_bound": bound, "verdict": verdict(bound, claimed),
            "ratio": bound / claimed if claimed > 0 else math.inf,
            "gdp_mu": mu, "gdp_mu_lower": mu_low, "gdp_epsilon_lower": eps_gdp, "gdp_epsilon_point": eps_gdp_point,
            "one_run_bound": snj.get("epsilon_lower_bound", 0.0), "one_run": snj,
            "fit_epsilon_lower": fit["epsilon_lower"], "fit": fit,
            "canaries": m, "repeats": repeats, "trials": int(len(scores)), "included": int(included.sum()),
            "client": col.client, "sample_rate": q, "sigma": sigma, "mechanism_sigma": mech_dp.noise_multiplier,
            "clip_norm": c, "steps": len(col.steps), "claim_steps": len(col.steps) if claim_steps is None else claim_steps,
            "delta": delta, "confidence": confidence, "canary_scale": scale,
            "mean_score_in": float(scores[included].mean()), "mean_score_out": float(scores[~included].mean()),
            "seconds": time.perf_counter() - start}


def subsampled_gaussian_fit(col: Collected, dp: DPParams, means: np.ndarray, variances: np.ndarray,
                            included: np.ndarray, *, confidence: float, claim_steps: int, seed: int,
                            resamples: int = 1000) -> dict[str, Any]:
    """Fit the mechanism as a Poisson-subsampled Gaussian of the client's (public) rate q over the T steps
    observed: per step a canary's coordinate is N(0, s^2) when absent and a + N(0, s^2) when sampled
    (a: what one record moves the release by, in C; s: the noise std, in C). s is the within-canary
    std over steps of the "out" canaries (a coordinate's constant offset drops out), a = (mean of "in"
    means - mean of "out" means) / q, sigma_eff = s / a. Its one-sided upper confidence limit
    (bootstrap over canaries) goes through the production accountant for (sigma_eff, q, T): an
    *estimate* of the epsilon the mechanism actually has, valid as far as the model is (for the honest
    step it is exactly the model the accountant analyses). sigma_eff is floored at sigma / 2 (the
    accountant is slow below; the floor only lowers the estimate)."""
    q = col.sample_rate
    rng = np.random.default_rng(derive_seed(seed, "audit", "fit"))
    mi, mo, vo = means[included], means[~included], variances[~included]

    def sigma_eff(a_in: np.ndarray, a_out: np.ndarray, v_out: np.ndarray) -> float:
        amp = (a_in.mean() - a_out.mean()) / q
        return math.inf if amp <= 0 else float(math.sqrt(max(v_out.mean(), 0.0)) / amp)

    point = sigma_eff(mi, mo, vo)
    boot = np.empty(resamples)
    for i in range(resamples):
        io, oo = rng.integers(0, len(mi), len(mi)), rng.integers(0, len(mo), len(mo))
        boot[i] = sigma_eff(mi[io], mo[oo], vo[oo])
    upper = float(np.quantile(boot, confidence, method="higher"))
    floor = dp.noise_multiplier / 2
    used = max(upper, floor)
    eps_lower = 0.0 if not math.isfinite(used) else claimed_epsilon(col, dataclasses.replace(dp, noise_multiplier=used),
                                                                     claim_steps)
    return {"sigma_eff": point, "sigma_eff_upper": upper, "floored": upper < floor, "epsilon_lower": eps_lower,
            "epsilon_point": claimed_epsilon(col, dataclasses.replace(dp, noise_multiplier=max(point, floor)), claim_steps)
            if math.isfinite(point) else 0.0, "amplitude_over_noise": (1 / point) if point > 0 else math.inf}


def verdict(bound: float, claimed: float) -> str:
    return "VIOLATION" if bound > claimed + 1e-9 else "consistent"


def jsonable(x: Any) -> Any:
    """Non-finite floats as strings ("inf"), numpy scalars as Python numbers: strict JSON."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def run_whitebox(cfg: ExperimentConfig, *, client: int | None = None, confidence: float = 0.95,
                 repeats: int = REPEATS, canaries: int | None = None, write: bool = True) -> dict[str, Any]:
    """The white-box audit of the configuration as given (the production mechanism; with
    ``privacy.reproducible_noise`` the auditor, holding the config, regenerates and subtracts the noise).
    Writes audit.json (and config.yaml) to a fresh run directory unless ``write`` is False."""
    from fedlora.report.rundir import RunDir  # noqa: PLC0415

    if write:
        RunDir.check_free(cfg.output.root, cfg.output.name)
    start = time.perf_counter()
    col = collect(cfg, client=client)
    result = replay(col, col.dp, reproducible_noise=cfg.privacy.reproducible_noise,
                    auditor_knows_seed=cfg.privacy.reproducible_noise, repeats=repeats, canaries=canaries,
                    confidence=confidence)
    result.update(collect_seconds=col.seconds, seconds=time.perf_counter() - start, canary_tensors=col.names)
    result["line"] = whitebox_line(result)
    if write:
        run_dir = RunDir.create(cfg.output.root, cfg.output.name, "audit-whitebox")
        run_dir.write_config(cfg.to_yaml())
        run_dir.write_json("audit.json", jsonable(result))
        result["run_dir"] = str(run_dir.path)
    return result


def whitebox_line(r: dict[str, Any]) -> str:
    return (f"white-box audit: epsilon >= {r['epsilon_lower_bound']:.3f} at {r['confidence']:.0%} confidence "
            f"(Gaussian-DP mu >= {r['gdp_mu_lower']:.3f}, one-run bound {r['one_run_bound']:.3f}; {r['trials']} Dirac "
            f"canaries in client {r['client']}, q {r['sample_rate']:.3g}, {r['steps']} steps); claimed epsilon "
            f"{r['claimed_epsilon']:.3g} (delta {r['delta']:g}), ratio {r['ratio']:.2f} -- {r['verdict']}")


__all__ = ["Collected", "claimed_epsilon", "collect", "dp_at", "replay", "run_whitebox", "verdict"]
