"""``train.compile``: the pure tensor math of the fused DP step through ``torch.compile``.

What is compiled (each a small pure function, ``dynamic=True``, ``fullgraph=True``):

- the per-example gradient of a linear layer's weight over a token (or pixel) axis,
  ``einsum("bto,bti->boi", g, x)`` (:func:`fedlora.privacy.dpsgd.linear_per_sample`), one call per
  hooked layer (a bias's ``g.sum(tokens)`` and the pooled head's outer product, with no token axis,
  stay eager: one kernel each, nothing to fuse, and each would be one more graph to compile);
- VeRA's per-example gradients of lambda_b and lambda_d (:func:`~fedlora.privacy.dpsgd.vera_lambda_b_grad`,
  :func:`~fedlora.privacy.dpsgd.vera_lambda_d_grad`);
- clipping and the weighted sum, per clipping group: per-example norms, factors min(1, C/||g_i||)
  and sum_i factor_i g_i (:func:`~fedlora.privacy.dpsgd.clip_factors` and
  :func:`~fedlora.privacy.dpsgd.clipped_sum`, the same ops).

What is not: the model's forward and backward (the hooks record Python-side state), the noise draw
(a :class:`~fedlora.privacy.noise.NoiseSource`, OS randomness or a seeded stream, exactly as
eager), the division by the expected batch, the exact one-example fallback, and QA's sum per record.
The privacy semantics are those of the eager step: the same clip bound, the same noise; only the
float rounding of the sums may differ (tests/privacy/test_compiled.py states the tolerance).

Poisson batches (and dynamic padding) change the batch and token sizes at every step, so the
functions are compiled with symbolic shapes: one graph per structure (which tensors, their ranks),
not per batch size. Batches of 0 or 1 rows run eagerly (torch specialises sizes 0 and 1, which
would cost a recompile for a rare, cheap case). A function that fails to compile falls back to
eager for the rest of the process with a one-line :class:`RuntimeWarning`; a run never stops for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedlora.privacy.dpsgd import (
    DPParams,
    Grads,
    clip_factors,
    clip_groups,
    clipped_sum,
    clipped_sums,
    linear_per_sample,
    vera_lambda_b_grad,
    vera_lambda_d_grad,
    vera_operands,
    vera_per_sample,
)


def _weight(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return linear_per_sample(x, g, "weight")  # (batch, out, in)


def _clip_and_sum(tensors: list[torch.Tensor], bound: float) -> list[torch.Tensor]:
    """One clipping group: its tensors' clipped sums (a list, not a dict: no guard on names)."""
    per_sample = {str(i): g for i, g in enumerate(tensors)}
    summed = clipped_sum(per_sample, clip_factors(per_sample, bound))
    return [summed[str(i)] for i in range(len(tensors))]


class StepKernels:
    """The DP step's pure tensor math (:class:`fedlora.privacy.dpsgd.StepMath`), compiled when
    ``enabled`` and eager otherwise. ``failed`` names the functions that fell back to eager, and why.

    ``backend`` and ``mode`` are passed to ``torch.compile`` (``mode="reduce-overhead"`` adds CUDA graphs
    on a GPU; docs/PERFORMANCE.md says why it is not the default)."""

    def __init__(self, enabled: bool = True, *, backend: str = "inductor", mode: str | None = None) -> None:
        self.enabled, self.backend, self.mode = enabled, backend, mode
        self.failed: dict[str, str] = {}
        self._compiled: dict[str, Callable[..., Any]] = {}

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        name = fn.__name__.lstrip("_")
        if not self.enabled or name in self.failed:
            return fn(*args)
        compiled = self._compiled.get(name)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend=self.backend, mode=self.mode)
            self._compiled[name] = compiled
        try:
            return compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: the eager function is the reference
            why = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"[:200]
            self.failed[name] = why
            warnings.warn(f"train.compile: {name} did not compile ({why}); it runs eagerly from now on",
                          RuntimeWarning, stacklevel=3)
            return fn(*args)

    def linear(self, x: torch.Tensor, g: torch.Tensor, attr: str) -> torch.Tensor:
        """:func:`~fedlora.privacy.dpsgd.linear_per_sample`, compiled for a weight over a token axis
        (x: (batch, tokens, ..., in)) and batches of 2 or more rows."""
        if attr != "weight" or x.dim() < 3 or x.shape[0] < 2:
            return linear_per_sample(x, g, attr)
        return self._run(_weight, x, g)

    def vera(self, module: nn.Module, x: torch.Tensor, g: torch.Tensor, role: str) -> torch.Tensor:
        """:func:`~fedlora.privacy.dpsgd.vera_per_sample`, its math compiled for batches of 2 or more rows."""
        if x.shape[0] < 2:
            return vera_per_sample(module, x, g, role)
        x3, g3, a, bmat, lam_d, lam_b = vera_operands(module, x, g)
        if role == "lambda_b":
            return self._run(vera_lambda_b_grad, x3, g3, a, bmat, lam_d)
        return self._run(vera_lambda_d_grad, x3, g3, a, bmat, lam_b)

    def clipped_sums(self, per_sample: Grads, dp: DPParams, groups: dict[str, str] | None = None) -> Grads:
        """:func:`~fedlora.privacy.dpsgd.clipped_sums`, one compiled call per clipping group."""
        if not per_sample or min(g.shape[0] for g in per_sample.values()) < 2:
            return clipped_sums(per_sample, dp, groups)
        out: Grads = {}
        for names, bound in clip_groups(per_sample, dp, groups):
            out.update(zip(names, self._run(_clip_and_sum, [per_sample[k] for k in names], bound), strict=True))
        return {k: out[k] for k in per_sample}
