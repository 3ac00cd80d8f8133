"""The DP-SGD step on the active tensors: per-sample gradients, clip, noise, scale.

Per-sample gradients of every ``nn.Linear`` (or 1x1 ``nn.Conv2d``, a linear layer over pixels, or
GPT-2's ``transformers.pytorch_utils.Conv1D``, a linear layer with its weight stored (in, out))
that owns an active tensor (LoRA's ``lora_A`` and ``lora_B``, the classifier head) are computed
inside the ordinary backward pass from the layer's saved input and output gradient (``einsum``
over tokens or pixels), for the active tensors only.
Tensors not owned by a linear layer (VeRA's lambda vectors, say) fall back to a
one-example-at-a-time loop: slower, exact. Clipping is flat (one L2 norm over all active
tensors of the step) or per group (``privacy.clipping: per-group``: the head to
``C_head = C sqrt(f)`` and the adapter factors to ``C_adapter = C sqrt(1 - f)``, f =
``privacy.head_clip_fraction``, so C_head^2 + C_adapter^2 = C^2 and every example's clipped
gradient over all groups still has norm <= C, as in Opacus's per-layer clipping); noise is
Gaussian with std ``sigma * C`` on every coordinate of the clipped sum in both cases (the same
sensitivity-C Gaussian mechanism, so the accountant is unchanged; docs/privacy.md), and the
result is divided by the expected batch size, as Opacus does for Poisson sampling. The noise
comes from a :class:`~fedlora.privacy.noise.NoiseSource`: the OS's secure randomness unless the
run opted into a reproducible stream (``privacy/noise.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fedlora.pointwise import is_pointwise_conv
from fedlora.privacy.noise import NoiseSource

Grads = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DPParams:
    """Public parameters of one client's DP-SGD."""

    noise_multiplier: float  # sigma
    clip_norm: float  # C
    expected_batch_size: float  # q * n
    head_clip_fraction: float | None = None  # per-group clipping: share f of C^2 for the head (None: flat)

    def group_bounds(self) -> dict[str, float]:
        """Per-group clipping bounds (head, adapter) whose squares sum to C^2; flat: one group."""
        if self.head_clip_fraction is None:
            return {"all": self.clip_norm}
        f = self.head_clip_fraction
        return {"head": self.clip_norm * f**0.5, "adapter": self.clip_norm * (1.0 - f) ** 0.5}


def linear_per_sample(x: torch.Tensor, g: torch.Tensor, attr: str) -> torch.Tensor:
    """Per-example gradient of a linear layer's ``weight`` (batch, out, in) or ``bias`` (batch, out)
    from its input ``x`` (batch, ..., in) and output gradient ``g`` (batch, ..., out)."""
    b = x.shape[0]
    x3, g3 = x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])  # (batch, tokens, features)
    if attr != "weight":
        return g3.sum(1)
    if x3.shape[1] == 1:  # one token or pixel: the outer product itself (exact; no reduction to run)
        return g3.transpose(1, 2) * x3
    return torch.einsum("bto,bti->boi", g3, x3)


def vera_operands(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A PEFT VeRA layer's input ``x3`` (batch, tokens, in), output gradient ``g3`` (batch, tokens, out),
    frozen shared A (r, in) and B (out, r), and its vectors lambda_d (r,) and lambda_b (out,), in the
    vectors' dtype, for :func:`vera_lambda_b_grad` and :func:`vera_lambda_d_grad`."""
    from fedlora.adapters import ADAPTER  # noqa: PLC0415

    lam_d, lam_b = module.vera_lambda_d[ADAPTER], module.vera_lambda_b[ADAPTER]
    a = module.vera_A[ADAPTER][:, : module.in_features].to(lam_d)  # (r, in)
    bmat = module.vera_B[ADAPTER][: module.out_features, :].to(lam_d)  # (out, r)
    n = x.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1]).to(lam_d.dtype)  # (batch, tokens, in)
    g3 = g.reshape(n, -1, g.shape[-1]).to(lam_d.dtype)  # (batch, tokens, out)
    return x3, g3, a, bmat, lam_d.detach(), lam_b.detach()


def vera_lambda_b_grad(x3: torch.Tensor, g3: torch.Tensor, a: torch.Tensor, bmat: torch.Tensor,
                       lam_d: torch.Tensor) -> torch.Tensor:
    """Per-example d/d lambda_b (batch, out) = sum over tokens of g * B (lambda_d * A x)."""
    u = x3 @ a.T  # (batch, tokens, r)
    return ((lam_d * u) @ bmat.T * g3).sum(1)


def vera_lambda_d_grad(x3: torch.Tensor, g3: torch.Tensor, a: torch.Tensor, bmat: torch.Tensor,
                       lam_b: torch.Tensor) -> torch.Tensor:
    """Per-example d/d lambda_d (batch, r) = sum over tokens of (B^T (lambda_b * g)) * (A x)."""
    u = x3 @ a.T  # (batch, tokens, r)
    return ((lam_b * g3) @ bmat * u).sum(1)


def vera_per_sample(module: nn.Module, x: torch.Tensor, g: torch.Tensor, role: str) -> torch.Tensor:
    """Per-example gradient of a PEFT VeRA layer's ``lambda_b`` (batch, out) or ``lambda_d``
    (batch, r) from its input ``x`` and output gradient ``g``. The layer adds
    ``lambda_b * B (lambda_d * A x)`` with frozen shared A (r, in) and B (out, r), so with u = A x:
    d/d lambda_b = sum over tokens of g * B (lambda_d * u), d/d lambda_d = sum of (B^T (lambda_b * g)) * u."""
    x3, g3, a, bmat, lam_d, lam_b = vera_operands(module, x, g)
    if role == "lambda_b":
        return vera_lambda_b_grad(x3, g3, a, bmat, lam_d)
    return vera_lambda_d_grad(x3, g3, a, bmat, lam_b)


def _vera_owners(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """id(parameter) -> (VeRA layer, 'lambda_d' | 'lambda_b') for VeRA layers without dropout (with
    dropout the layer's input is not what its factors saw; those fall back to the exact loop)."""
    try:
        from peft.tuners.vera import VeraLayer  # noqa: PLC0415
    except ImportError:  # pragma: no cover - peft is a dependency
        return {}
    from fedlora.adapters import ADAPTER  # noqa: PLC0415

    owners: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        if isinstance(module, VeraLayer) and ADAPTER in module.vera_lambda_d:
            dropout = module.vera_dropout[ADAPTER]
            if isinstance(dropout, nn.Identity) or getattr(dropout, "p", 1.0) == 0:
                owners[id(module.vera_lambda_d[ADAPTER])] = (module, "lambda_d")
                owners[id(module.vera_lambda_b[ADAPTER])] = (module, "lambda_b")
    return owners


def _conv1d_type() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's projections: ``x @ W + b`` with W (in, out)), if importable."""
    try:
        from transformers.pytorch_utils import Conv1D  # noqa: PLC0415
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


class PerSampleGradients:
    """Hooks that record, per active linear (or VeRA) layer, its input and output gradient.

    ``linear`` maps the tensors owned by an ``nn.Linear`` (or 1x1 conv) to (module, attr);
    ``vera`` maps VeRA's scaling vectors to (VeRA layer, role); ``fused`` is both: the tensors
    whose per-example gradients come from one backward pass. Anything else is in ``other``.
    """

    def __init__(self, params: dict[str, nn.Parameter], model: nn.Module) -> None:
        owners: dict[int, tuple[str, nn.Module, str]] = {}
        conv1d = _conv1d_type()
        self._conv1d = conv1d
        for mname, module in model.named_modules():
            if isinstance(module, nn.Linear) or is_pointwise_conv(module) or (conv1d is not None and isinstance(module, conv1d)):
                for attr in ("weight", "bias"):
                    p = getattr(module, attr)
                    if p is not None:
                        owners[id(p)] = (mname, module, attr)
        vera = _vera_owners(model)
        self.linear: dict[str, tuple[nn.Module, str]] = {}
        self.vera: dict[str, tuple[nn.Module, str]] = {}
        self.other: dict[str, nn.Parameter] = {}
        tracked: dict[int, list[nn.Parameter]] = {}
        for name, p in params.items():
            if id(p) in owners:
                self.linear[name] = owners[id(p)][1:]
            elif id(p) in vera:
                self.vera[name] = vera[id(p)]
            else:
                self.other[name] = p
                continue
            module = (self.linear.get(name) or self.vera[name])[0]
            tracked.setdefault(id(module), []).append(p)
        self.fused = set(self.linear) | set(self.vera)
        self._tracked = tracked
        self._records: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self._handles = []
        modules = {id(m): m for m, _ in [*self.linear.values(), *self.vera.values()]}
        for module in modules.values():
            self._handles.append(module.register_forward_hook(self._forward_hook))
        self.enabled = False

    def _forward_hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.enabled or not any(p.requires_grad for p in self._tracked[id(module)]):
            return
        entry: list = [inputs[0].detach(), None]
        self._records.setdefault(id(module), []).append(entry)  # type: ignore[arg-type]

        def save(grad: torch.Tensor) -> None:
            entry[1] = grad.detach()

        output.register_hook(save)

    def clear(self) -> None:
        self._records.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def fused_grads(self, active: list[str], kernels: StepMath | None = None) -> Grads:
        """Per-sample gradients (batch, *shape) of the active hooked tensors (``fused``); ``kernels``:
        the einsums through :class:`~fedlora.privacy.compiled.StepKernels` (``train.compile``), else eager."""
        linear = kernels.linear if kernels is not None else linear_per_sample
        vera = kernels.vera if kernels is not None else vera_per_sample
        out: Grads = {}
        for name in active:
            module, attr = self.linear.get(name) or self.vera[name]
            total = None
            for x, g in self._records.get(id(module), []):
                if g is None:
                    raise RuntimeError(f"no output gradient recorded for {name}; was backward() called?")
                if name in self.vera:
                    piece = vera(module, x, g, attr)
                    total = piece if total is None else total + piece
                    continue
                b = x.shape[0]
                dtype = getattr(module, attr).dtype  # bf16 autocast records bf16 tensors: fp32 from here on
                x, g = x.to(dtype), g.to(dtype)
                if isinstance(module, nn.Conv2d):  # a 1x1 conv is a linear layer over pixels
                    x, g = x.flatten(2).transpose(1, 2), g.flatten(2).transpose(1, 2)  # (batch, pixels, ch)
                piece = linear(x, g, attr)
                if isinstance(module, nn.Conv2d) and attr == "weight":
                    piece = piece.reshape(b, *module.weight.shape)  # (batch, out, in, 1, 1)
                elif self._conv1d is not None and isinstance(module, self._conv1d) and attr == "weight":
                    piece = piece.transpose(1, 2)  # Conv1D stores its weight (in, out): (batch, in, out)
                total = piece if total is None else total + piece
            if total is None:
                raise RuntimeError(f"{name} was active but its layer was not used in the forward pass")
            out[name] = total
        self._records.clear()
        return out


# ----------------------------------------------------------------------------- the DP step


def clip_factors(per_sample: Grads, clip_norm: float) -> torch.Tensor:
    """Per-example factors min(1, C/||g_i||), the norm taken flat over all active tensors."""
    sq = sum(g.flatten(1).pow(2).sum(1) for g in per_sample.values())  # (batch,)
    return (clip_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # type: ignore[union-attr]


def sum_by_record(per_sample: Grads, record: torch.Tensor, records: int) -> Grads:
    """Per-record gradients from per-row ones: the rows of one record (a QA example's windows) summed,
    so that clipping bounds the whole record's contribution, not each row's."""
    return {k: torch.zeros((records, *g.shape[1:]), dtype=g.dtype, device=g.device).index_add_(0, record.to(g.device), g)
            for k, g in per_sample.items()}


def clipped_sum(per_sample: Grads, factors: torch.Tensor) -> Grads:
    return {k: torch.einsum("b,b...->...", factors.to(g.dtype), g) for k, g in per_sample.items()}


def add_noise(summed: Grads, *, std: float, noise: NoiseSource) -> Grads:
    """Each tensor plus N(0, std^2) per coordinate, in the tensor's own order (sorted names)."""
    names = sorted(summed)
    if not names:
        return {}
    device = summed[names[0]].device  # one draw for the step (one copy to the device)
    draws = noise.normals([summed[k].shape for k in names], dtype=torch.float32, device=device)
    return {k: summed[k] + std * z.to(summed[k].dtype) for k, z in zip(names, draws, strict=True)}


def clip_groups(per_sample: Grads, dp: DPParams, groups: dict[str, str] | None) -> list[tuple[list[str], float]]:
    """The tensors clipped together and their bound: one group (all, C) when flat, else per group
    (``groups``: name -> 'head' | 'adapter'; a name it lacks is an adapter tensor) with the bounds
    of :meth:`DPParams.group_bounds`."""
    bounds = dp.group_bounds()
    if "all" in bounds or groups is None:
        return [(list(per_sample), dp.clip_norm)]
    return [([k for k in per_sample if groups.get(k, "adapter") == group], bounds[group])
            for group in sorted({groups.get(k, "adapter") for k in per_sample})]


def group_clip_factors(per_sample: Grads, dp: DPParams, groups: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Per tensor, its per-example clip factors, flat or per group (:func:`clip_groups`).
    Either way each example's clipped gradient has norm <= C."""
    out: dict[str, torch.Tensor] = {}
    for names, bound in clip_groups(per_sample, dp, groups):
        out.update(dict.fromkeys(names, clip_factors({k: per_sample[k] for k in names}, bound)))
    return out


def clipped_sums(per_sample: Grads, dp: DPParams, groups: dict[str, str] | None = None) -> Grads:
    """The noiseless clipped sum of each tensor: sum over examples of factor_i * g_i (flat or per group)."""
    factors = group_clip_factors(per_sample, dp, groups)
    return {k: torch.einsum("b,b...->...", factors[k].to(g.dtype), g) for k, g in per_sample.items()}


class StepMath(Protocol):
    """The pure tensor math of the DP step, eager or compiled (:class:`fedlora.privacy.compiled.StepKernels`)."""

    def linear(self, x: torch.Tensor, g: torch.Tensor, attr: str) -> torch.Tensor: ...
    def vera(self, module: nn.Module, x: torch.Tensor, g: torch.Tensor, role: str) -> torch.Tensor: ...
    def clipped_sums(self, per_sample: Grads, dp: DPParams, groups: dict[str, str] | None) -> Grads: ...


def privatize(per_sample: Grads, dp: DPParams, noise: NoiseSource, *, groups: dict[str, str] | None = None,
              signal: dict[str, float] | None = None, kernels: StepMath | None = None) -> Grads:
    """clip (flat, or per group with ``groups``) -> sum -> noise -> scale by the expected batch size.

    ``signal``, when given, receives each tensor's squared norm of the noiseless clipped sum: a
    NON-private statistic (research diagnostics only; a run that releases it is not covered by DP).
    ``kernels`` (``train.compile``) computes the clip and sum; the noise is drawn here either way."""
    summed = (kernels.clipped_sums if kernels is not None else clipped_sums)(per_sample, dp, groups)
    if signal is not None:
        signal.update({k: float(v.double().pow(2).sum()) for k, v in summed.items()})
    noisy = add_noise(summed, std=dp.noise_multiplier * dp.clip_norm, noise=noise)
    return {k: v / dp.expected_batch_size for k, v in noisy.items()}


def loop_per_sample(
    params: dict[str, nn.Parameter], loss_of: Callable[[torch.Tensor], torch.Tensor], batch_size: int
) -> Grads:
    """Per-sample gradients one example at a time (the fallback and the test oracle)."""
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    for i in range(batch_size):
        grads = torch.autograd.grad(loss_of(torch.tensor([i])).sum(), list(params.values()), allow_unused=True)
        for k, g, p in zip(params, grads, params.values(), strict=True):
            rows[k].append(torch.zeros_like(p) if g is None else g)
    return {k: torch.stack(v) for k, v in rows.items()}
