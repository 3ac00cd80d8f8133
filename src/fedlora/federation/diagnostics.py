"""Per-round diagnostics: aggregation error and the factor choices (issue 9).

**Aggregation error.** For every LoRA-adapted module, the relative Frobenius error between
the weighted mean of the clients' effective updates and the update the server keeps::

    || sum_i p_i B_i A_i  -  (B' A' + (W0' - W0) / s) ||_F  /  || sum_i p_i B_i A_i ||_F

- ``B_i, A_i``: client i's factors after local training, from its upload, or from the
  round's global state for a factor it did not upload (FFA's frozen A, RoLoRA's and AS-LoRA's
  inactive factor). ``p_i``: the aggregation weights.
- ``B', A', W0'``: what the server keeps. Methods that fold into the base weight (FedEx-LoRA's
  residual, FLoRA's merge) count the base-weight change ``(W0' - W0) / s`` (s = LoRA scale), so
  the comparison is of effective weights: ``W0' + s B'A'`` against ``W0 + s mean(B_i A_i)``.
- Storage rounding is excluded: the method's aggregation is replayed on float64 copies of the
  same inputs (aggregations are pure functions; the method memory is copied), so the figure
  measures the aggregation rule, not the float32 cast of the kept tensors (about 1e-7 relative).
  With user-level DP the replay draws the same server noise (seeded by round), so the error
  includes it.
- Norms without d x k matrices: the difference is ``L R`` with the stacked factors
  ``L = [p_1 B_1 .. p_K B_K, -B']``, ``R = [A_1; ..; A_K; A']``; ``||L R||_F = ||R_L R_R^T||_F``
  from the QR factorisations ``L = Q_L R_L``, ``R^T = Q_R R_R`` (cost O((d + k) m^2), m = (K+1) r).
  This is the numerically stable form of the Gram-matrix identity ``||LR||^2 = <L^T L, R R^T>``
  (which loses half the digits when the error is near zero). Only when the base weight changed
  (FedEx, FLoRA: already a dense d x k update) is the difference formed densely.
- Modules whose A or B is kept on the clients (FedSA-LoRA's B): the server keeps no product, so
  the error is defined on what it does keep, the shared factor:
  ``||sum_i p_i X_i - X'|| / ||sum_i p_i X_i||`` (0 for FedSA's mean of A) [interp].
- VeRA's vectors (not matrix factors) are skipped. A zero mean product gives 0 when the kept
  product is zero too, else NaN.

**Factor choices.** ``plan_modes``: one letter per transformer layer of what the round trains
there ("A", "B", "J" for both, "-" for neither); ``plan_schedule``: one letter per local step of
what the schedule activates ("A", "B", "J", or "M" when the layers differ in that step). Methods
that log their own ``plan_modes`` (AS-LoRA) keep it; it has the same shape. AS-LoRA's server
score EMAs after the round (what the next round's choice is drawn from) are logged as
``factor_scores`` ({"<layer>/<A|B>": float}).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedlora.adapters import Factor
from fedlora.methods.base import Method, PlanContext, RoundPlan, State
from fedlora.methods.lowrank import lora_modules, matrix


def lowrank_fro(left: torch.Tensor, right: torch.Tensor) -> float:
    """``||left @ right||_F`` for thin factors (d, m) and (m, k), via QR, in float64."""
    _, rl = torch.linalg.qr(left.to(torch.float64))  # (q, m)
    _, rr = torch.linalg.qr(right.to(torch.float64).T)  # (q', m)
    return float(torch.linalg.matrix_norm(rl @ rr.T))


def _relative(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.nan
    return num / den


def module_error(bs: list[torch.Tensor], as_: list[torch.Tensor], weights: list[float],
                 b_new: torch.Tensor, a_new: torch.Tensor, base_change: torch.Tensor | None) -> float:
    """Relative error of one module (see the module docstring); ``base_change`` is (W0' - W0)/s or None."""
    f64 = torch.float64
    left = torch.cat([w * b.to(f64) for w, b in zip(weights, bs, strict=True)], dim=1)  # (d, K r)
    right = torch.cat([a.to(f64) for a in as_], dim=0)  # (K r, k)
    den = lowrank_fro(left, right)
    if base_change is None:
        num = lowrank_fro(torch.cat([left, -b_new.to(f64)], dim=1), torch.cat([right, a_new.to(f64)], dim=0))
    else:
        diff = left @ right - b_new.to(f64) @ a_new.to(f64) - base_change.to(f64)  # (d, k)
        num = float(torch.linalg.matrix_norm(diff))
    return _relative(num, den)


def factor_error(xs: list[torch.Tensor], weights: list[float], x_new: torch.Tensor) -> float:
    """Relative error of a kept factor against the weighted mean of the clients' values."""
    mean = sum(w * x.to(torch.float64) for w, x in zip(weights, xs, strict=True))
    return _relative(float(torch.linalg.norm(mean - x_new.to(torch.float64))), float(torch.linalg.norm(mean)))


def f64_state(state: State) -> State:
    return {k: v.detach().to(torch.float64) for k, v in state.items()}


def aggregation_errors(method: Method, ctx: PlanContext, plan: RoundPlan, before: State, uploads: list[State],
                       weights: list[float], scale: float | None) -> dict[str, float]:
    """{module: relative error} for the round's aggregation, replayed in float64 (see above)."""
    if not uploads:
        return {}
    ups = [f64_state(u) for u in uploads]
    old = f64_state(before)
    ctx64 = replace(ctx, memory=copy.deepcopy(ctx.memory))
    new = method.aggregate(ctx64, plan, old, ups, list(weights))
    errors: dict[str, float] = {}
    module_of = {f.name: f.module for f in ctx.factors}
    for a, b, w0 in lora_modules(ctx.factors):
        if a not in old and a not in ups[0] and b not in old and b not in ups[0]:
            continue  # both factors local (never the case for the built-in methods)
        shared = [x for x in (a, b) if x in new]
        if len(shared) == 1:  # the other factor is kept on the clients
            x = shared[0]
            errors[module_of[a]] = factor_error([u.get(x, old[x]) for u in ups], weights, new[x])
            continue
        if old[a].dim() < 2 or old[b].dim() < 2:
            continue  # VeRA vectors
        base = None
        if w0 in new and w0 in old and not torch.equal(new[w0], old[w0]):
            if not scale:
                raise ValueError(f"the base weight of {module_of[a]} changed but no LoRA scale is known")
            base = matrix((new[w0] - old[w0]) / scale)
        # 1x1-conv factors (r, k, 1, 1) / (d, r, 1, 1) as matrices
        errors[module_of[a]] = module_error([matrix(u.get(b, old[b])) for u in ups],
                                            [matrix(u.get(a, old[a])) for u in ups], weights,
                                            matrix(new[b]), matrix(new[a]), base)
    return errors


# ------------------------------------------------------------------------ factor choices
def _letter(roles: set[str]) -> str:
    roles = roles & {"A", "B"}
    return "J" if roles == {"A", "B"} else (roles.pop() if roles else "-")


def layer_letters(factors: list[Factor], names: frozenset[str]) -> dict[int, str]:
    """{layer: "A" | "B" | "J" | "-"}: which factors of each layer are in ``names``."""
    layers = sorted({f.layer for f in factors if f.role in ("A", "B") and f.layer is not None})
    return {lay: _letter({f.role for f in factors if f.layer == lay and f.name in names}) for lay in layers}


def factor_choices(method: Method, plan: RoundPlan, factors: list[Factor], local_steps: int) -> dict[str, str]:
    """``plan_modes`` (per layer, this round) and ``plan_schedule`` (per local step)."""
    modes = "".join(layer_letters(factors, plan.trainable).values())
    steps = []
    for step in range(local_steps):
        letters = {v for v in layer_letters(factors, method.schedule.active(plan, step)).values() if v != "-"}
        steps.append(letters.pop() if len(letters) == 1 else ("M" if letters else "-"))
    return {"plan_modes": modes, "plan_schedule": "".join(steps)}


def summarize(errors: dict[str, float]) -> dict[str, Any]:
    vals = [v for v in errors.values() if not math.isnan(v)]
    return {"aggregation_error": float(np.mean(vals)) if vals else None, "aggregation_error_modules": errors}


# ------------------------------------------------------------------------ the round's keys
def lora_scale(adapter: Any) -> float | None:
    """s = alpha / r (alpha / sqrt(r) with rsLoRA) for LoRA adapters; None for VeRA."""
    if getattr(adapter, "type", "lora") != "lora":
        return None
    return float(adapter.alpha / (adapter.rank**0.5 if adapter.rslora else adapter.rank))


def round_diagnostics(sim: Any, rnd: int, ctx: PlanContext, plan: RoundPlan, before: State,
                      uploads: list[State], weights: list[float]) -> dict[str, Any]:
    """The diagnostic keys of one round's record (``sim``: the server side, after aggregation)."""
    cfg = sim.cfg
    out: dict[str, Any] = factor_choices(sim.method, plan, ctx.factors, cfg.federation.local_steps)
    if "modes" in plan.info:  # the method's own per-layer choice (same shape) is logged as plan_modes
        del out["plan_modes"]
    if isinstance(sim.memory.get("ema"), dict):  # AS-LoRA's score EMAs after this round, {"<layer>/<A|B>": float}
        out["factor_scores"] = {k: float(v) for k, v in sorted(sim.memory["ema"].items())}
    if cfg.eval.diagnostics:
        start = time.perf_counter()
        errors = aggregation_errors(sim.method, ctx, plan, before, uploads, weights, lora_scale(cfg.adapter))
        out.update(summarize(errors))
        out["diagnostics_seconds"] = time.perf_counter() - start
    every = cfg.eval.sharpness_every
    if every and (rnd % every == 0 or rnd == cfg.federation.rounds):
        from fedlora.federation.sharpness import global_sharpness  # noqa: PLC0415

        start = time.perf_counter()
        out["sharpness"] = global_sharpness(sim)
        out["sharpness_seconds"] = time.perf_counter() - start
    return out
