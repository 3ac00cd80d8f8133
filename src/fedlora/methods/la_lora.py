"""LA-LoRA: alternate B and A at every local step; optional low-pass filter on the noisy gradient.

Liu, Miao, Xi, Liu, "Rethinking LoRA for Privacy-Preserving Federated Learning in Large
Models", ICLR 2026, https://arxiv.org/abs/2602.19926 (ALGORITHMS.md section 5).

- Schedule: local step 1 trains B, step 2 trains A, and so on (the paper's phase; option
  ``phase: A`` gives the reference code's phase). Only the active factor is clipped and
  noised at a step (the client privatises exactly the tensors :meth:`active` returns), so the
  product perturbation is linear in the noise. The head, when trained, is active at every
  step together with the active factor [interp].
- Filter (option ``filter``, default true, the paper's full method): the fixed 5-tap binomial
  kernel (1/16)[1, 4, 6, 4, 1] along the feature axis of the noisy gradient of the active
  factor (A: r x k, each row along k; B: d x r, each column along d), mirror padding, the
  rank axis never mixed. It is post-processing of the privatised gradient: no privacy cost.
  Applied to every step's gradient before the optimizer step [interp]. The factors of a 1x1
  convolution (A: (r, k, 1, 1), B: (d, r, 1, 1)) are filtered as the matrices they are (reshaped
  to (r, k) / (d, r), filtered, reshaped back); any other factor shape is refused rather than
  left unfiltered. The public code's Laplacian smoothing and its double step are not reproduced.
- Server: FedAvg of A and B separately (inexact, as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from fedlora.errors import ConfigError
from fedlora.methods.base import Method, RoundPlan, State
from fedlora.methods.dp_lora import local_roles
from fedlora.methods.registry import MethodSetup, register_method
from fedlora.methods.seams import MeanOfUploads, SendTrained, TrainRoles

BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)  # / 16: the discrete Gaussian of variance 1
FEATURE_AXIS = {"A": 1, "B": 0}  # A: (r, k) -> along k;  B: (d, r) -> along d


def binomial_smooth(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Convolve every line of ``g`` along ``dim`` with (1/16)[1,4,6,4,1], mirror-padded.

    Lines along every other axis (the rank axis) are filtered independently, never mixed.
    Lines shorter than 3 (too short to mirror-pad by 2) are returned unchanged.
    """
    n = g.shape[dim]
    if n < 3:
        return g
    lines = g.movedim(dim, -1)  # (..., n)
    flat = lines.reshape(-1, 1, n)  # (lines, 1, n)
    kernel = torch.tensor(BINOMIAL, dtype=g.dtype, device=g.device).div(16).view(1, 1, 5)
    out = F.conv1d(F.pad(flat, (2, 2), mode="reflect"), kernel)  # (lines, 1, n)
    return out.reshape(lines.shape).movedim(-1, dim)


def smooth_factor(name: str, g: torch.Tensor, dim: int) -> torch.Tensor:
    """The filter on one factor's gradient: a matrix directly, a 1x1 convolution's (out, in, 1, 1)
    factor as its (out, in) matrix; any other shape is refused (never silently left unfiltered)."""
    if g.dim() == 2:
        return binomial_smooth(g, dim)
    if g.dim() == 4 and tuple(g.shape[2:]) == (1, 1):
        return binomial_smooth(g.reshape(g.shape[0], g.shape[1]), dim).reshape(g.shape)
    raise ConfigError(f"la-lora's low-pass filter needs matrix factors (or a 1x1 convolution's); '{name}' has shape "
                      f"{tuple(g.shape)}; set method.options.filter=false to run without it")


@dataclass(frozen=True)
class AlternateSteps:
    """One factor per local step, ``first`` at step 1; the head joins every step."""

    first: str = "B"
    smooth: bool = True

    @property
    def info(self) -> dict[str, Any]:
        """The options that select what ran; a method carrying this schedule records them."""
        return {"phase": self.first, "filter": self.smooth}

    def factor(self, step: int) -> str:  # step is 0-based
        return self.first if step % 2 == 0 else {"A": "B", "B": "A"}[self.first]

    def active(self, plan: RoundPlan, step: int) -> frozenset[str]:
        return plan.groups[self.factor(step)] | plan.groups.get("head", frozenset())

    def transform(self, grads: State, plan: RoundPlan, step: int) -> State:
        if not self.smooth:
            return grads
        f = self.factor(step)
        return {k: smooth_factor(k, g, FEATURE_AXIS[f]) if k in plan.groups[f] else g for k, g in grads.items()}


def alternate_steps(setup: MethodSetup) -> AlternateSteps:
    """The schedule from the options ``phase`` (B: paper, A: reference code) and ``filter``."""
    phase = str(setup.option("phase", "B"))
    if phase not in ("A", "B"):
        raise ConfigError(f"la-lora option 'phase' must be 'B' (paper) or 'A' (reference code), got {phase!r}")
    smooth = setup.option("filter", True)
    if not isinstance(smooth, bool):
        raise ConfigError(f"la-lora option 'filter' must be true or false, got {smooth!r}")
    return AlternateSteps(first=phase, smooth=smooth)


@register_method("la-lora", "B and A alternate every local step (B first); optional binomial low-pass filter")
def la_lora(setup: MethodSetup) -> Method:
    schedule = alternate_steps(setup)
    return Method(
        name="la-lora",
        plan=TrainRoles(("A", "B", "head")),  # names the per-role groups the schedule alternates over
        schedule=schedule,
        upload=SendTrained(),
        aggregate=MeanOfUploads(),
        local_roles=local_roles(setup),
        info=schedule.info,
    )
