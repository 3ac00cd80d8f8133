"""AS-LoRA: per layer and per round, train A or B, chosen from the privatised gradients' energy.

Kim, Park, Han, Ahn, arXiv 2605.05769 (https://arxiv.org/abs/2605.05769); ALGORITHMS.md 6.
Every seam is post-processing of DP outputs plus public constants (no privacy cost).

- Plan: warm-up of floor(0.1 R) rounds (at least 2 [interp]), all layers B, A, B, ...; then per layer a seeded draw
  of A with ``p_A = sigmoid(clip(d / T, -30, 30))``, ``d = (S_A - S_B) / (|S_A| + |S_B| + 1e-8)``,
  ``T = max(0.1, 0.95^(r - warmup))`` (one EMA missing: the factor that has one; none: 1/2).
  ``RoundPlan.info["modes"]``: one letter per layer. The head trains every round [interp].
- Upload: each layer's active factor plus its score under ``score/<layer>/<A|B>`` (no parameter
  has such a name): the energy of the last step's noisy gradient under a fixed seeded Gaussian
  projection (``g R`` for A, ``R g`` for B), minus the expected noise energy
  ``numel * noise_std^2`` (the client's own sigma), floored at 0.
- Curvature (option ``curvature``): ``secant`` (default, privacy-exact) [interp, ALGORITHMS.md 6.2b]
  in the last ``curvature_rounds`` (10) rounds, as the reference code switches its curvature on
  (``USE_CURV = r > ROUNDS - 10``: every round of a run of 10 rounds or fewer), or ``off``
  (the energy alone). Secant: for an SGD step ``-eta g_{T-1}``,
  ``eta kappa = -<g_T - g_{T-1}, g_{T-1}> / ||g_{T-1}||^2`` (noise-debiased) and the score is
  ``e (1 - eta kappa / 2)``, floored at 0; or ``finite-difference`` (the reference code's: it
  re-reads the private batch outside DP, so it needs ``allow_non_private_curvature: true`` and
  the run is marked NOT covered by the DP guarantee; ``as_lora_curvature.py``). The secant
  schedule keeps each client's last two gradients, so the batched engine runs as-lora one
  client after another (``batched_clients: auto`` falls back; ``curvature: off`` batches).
- Aggregate: weighted mean of the parameters; each score's uniform mean over the clients that
  sent it updates the server's EMA (beta 0.9) of that layer's active factor only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fedlora.errors import ConfigError
from fedlora.methods.as_lora_curvature import NOT_COVERED, curvature_option, finite_difference_score
from fedlora.methods.base import ClientTrace, Method, PlanContext, RoundPlan, State
from fedlora.methods.dp_lora import local_roles
from fedlora.methods.registry import MethodSetup, register_method
from fedlora.methods.seams import Joint, SendTrained, download_keys, weighted_mean
from fedlora.seeds import derive_seed, generator

SCORE = "score/"


def prob_a(s_a: float | None, s_b: float | None, temperature: float) -> float:
    if s_a is None or s_b is None:
        return 0.5 if s_a is None and s_b is None else (0.0 if s_a is None else 1.0)
    d = (s_a - s_b) / (abs(s_a) + abs(s_b) + 1e-8)
    return 1.0 / (1.0 + math.exp(-min(max(d / temperature, -30.0), 30.0)))


@dataclass(frozen=True)
class LayerwiseChoice:
    warmup_frac: float = 0.1
    t0: float = 1.0
    t_min: float = 0.1
    gamma: float = 0.95

    def warmup_rounds(self, rounds: int) -> int:
        """floor(0.1 R), but at least B then A (2 rounds, or R when shorter) [interp]: the
        reference code with R < 20 draws round 1 at p_A = 1/2 and, once only A has a score,
        keeps A forever while B stays at its zero start (the adapter never moves)."""
        return max(math.floor(self.warmup_frac * rounds), min(2, rounds))

    def __call__(self, ctx: PlanContext) -> RoundPlan:
        lora = [f for f in ctx.factors if f.role in ("A", "B")]
        if any(f.layer is None for f in lora):
            raise ConfigError("as-lora needs a transformer layer index in every adapted module name (.layer.<i>.)")
        layers = sorted({f.layer for f in lora})
        warmup = self.warmup_rounds(ctx.rounds)
        ema = ctx.memory.get("ema", {})
        if ctx.round <= warmup:
            temp, modes = self.t0, {lay: "B" if ctx.round % 2 == 1 else "A" for lay in layers}
        else:
            temp = max(self.t_min, self.t0 * self.gamma ** (ctx.round - warmup))
            rng = np.random.default_rng(derive_seed(ctx.seed, "as-lora", "modes", ctx.round))
            modes = {lay: "A" if rng.random() < prob_a(ema.get(f"{lay}/A"), ema.get(f"{lay}/B"), temp) else "B"
                     for lay in layers}
        groups = {f"{lay}/{m}": frozenset(f.name for f in lora if f.layer == lay and f.role == m) for lay, m in modes.items()}
        trainable = frozenset().union(*groups.values()) | ctx.names("head")
        info = {"modes": "".join(modes[lay] for lay in layers), "temperature": temp}
        return RoundPlan(ctx.round, trainable, download_keys(ctx), info, groups)


@dataclass(frozen=True)
class RecordLastTwo(Joint):
    """Joint schedule that keeps the last two (privatised) gradients for the secant score."""

    history: dict[str, State] = field(default_factory=dict, compare=False)

    def transform(self, grads: State, plan: RoundPlan, step: int) -> State:
        self.history["prev"] = self.history.get("last", {}) if step > 0 else {}
        self.history["last"] = grads
        return grads


def secant_factor(prev: torch.Tensor, last: torch.Tensor, noise_std: float) -> float:
    n_var = prev.numel() * noise_std**2  # E||xi||^2 of one step's noise
    denom = float(prev.pow(2).sum()) - n_var
    if denom <= 0:
        return 1.0
    inner = float(((last - prev) * prev).sum()) + n_var
    return max(0.0, 1.0 + 0.5 * inner / denom)


@dataclass(frozen=True)
class SendWithScores:
    seed: int
    rounds: int
    history: dict[str, State] | None = None  # set for curvature=secant
    curvature_rounds: int = 10
    fd_eps: float | None = None  # set for curvature=finite-difference (NOT covered by DP)
    _proj: dict[str, torch.Tensor] = field(default_factory=dict, compare=False)

    def projection(self, name: str, size: int, device: torch.device) -> torch.Tensor:
        if name not in self._proj:
            g = generator(self.seed, "as-lora", "projection", name)
            self._proj[name] = torch.randn(size, size, generator=g) / math.sqrt(size)  # (size, size)
        return self._proj[name].to(device)

    def projected(self, name: str, role: str, g: torch.Tensor) -> torch.Tensor:
        g = g.reshape(g.shape[0], -1)  # a 1x1 conv's (r, k, 1, 1) / (d, r, 1, 1) as a matrix
        if role == "A":  # (r, k) @ (k, k)
            return g @ self.projection(name, g.shape[1], g.device)
        return self.projection(name, g.shape[0], g.device) @ g  # (d, d) @ (d, r)

    def energy(self, name: str, role: str, g: torch.Tensor, noise_std: float) -> float:
        proj = self.projected(name, role, g)
        return max(float(proj.pow(2).sum()) - g.numel() * noise_std**2, 0.0)

    def __call__(self, plan: RoundPlan, before: State, after: State, trace: ClientTrace) -> State:
        up = SendTrained()(plan, before, after, trace)
        late = plan.round > self.rounds - self.curvature_rounds
        curved, fd = self.history is not None and late, self.fd_eps is not None and late
        base_loss = trace.probe({}) if fd and trace.probe is not None else 0.0
        for group, names in sorted(plan.groups.items()):
            role, score = group.split("/")[1], 0.0
            for k in sorted(n for n in names if n in trace.last_grads):
                g = trace.last_grads[k]
                e = self.energy(k, role, g, trace.noise_std)
                prev = self.history.get("prev", {}).get(k) if curved and self.history is not None else None
                if fd and self.fd_eps is not None:
                    proj = self.projected(k, role, g)
                    score += finite_difference_score(e, proj, k, trace, self.fd_eps, base_loss)
                else:
                    score += e * secant_factor(prev, g, trace.noise_std) if prev is not None else e
            up[f"{SCORE}{group}"] = torch.tensor(score, dtype=torch.float32)
        return up


@dataclass(frozen=True)
class MeanAndScoreEMA:
    beta: float = 0.9

    def __call__(self, ctx: PlanContext, plan: RoundPlan, global_state: State, uploads: list[State], weights: list[float]) -> State:
        params = [{k: v for k, v in u.items() if not k.startswith(SCORE)} for u in uploads]
        ema = ctx.memory.setdefault("ema", {})
        for key in sorted({k for u in uploads for k in u if k.startswith(SCORE)}):
            vals = [float(u[key]) for u in uploads if key in u]
            new, name = sum(vals) / len(vals), key.removeprefix(SCORE)
            ema[name] = new if name not in ema else self.beta * ema[name] + (1 - self.beta) * new
        return {**global_state, **weighted_mean(params, weights)}


@register_method("as-lora", "per-layer, per-round choice of A or B from debiased noisy-gradient energy")
def as_lora(setup: MethodSetup) -> Method:
    curvature = curvature_option(setup)
    schedule = RecordLastTwo() if curvature == "secant" else Joint()
    history = schedule.history if isinstance(schedule, RecordLastTwo) else None
    fd_eps = float(setup.option("fd_eps", 1e-3))
    if not fd_eps > 0:
        raise ConfigError(f"as-lora option 'fd_eps' must be > 0, got {fd_eps}")
    upload = SendWithScores(setup.seed, setup.rounds, history, int(setup.option("curvature_rounds", 10)),
                            fd_eps if curvature == "finite-difference" else None)
    return Method(
        name="as-lora",
        plan=LayerwiseChoice(),
        schedule=schedule,
        upload=upload,
        aggregate=MeanAndScoreEMA(),
        local_roles=local_roles(setup),
        exact=True,
        side_uploads=(SCORE,),
        info={"curvature": curvature},
        reads_private_data=NOT_COVERED if curvature == "finite-difference" else "",
    )
