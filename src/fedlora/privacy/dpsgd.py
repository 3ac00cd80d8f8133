"""The DP-SGD step on the active tensors: per-sample gradients, clip, noise, scale.

Per-sample gradients of every ``nn.Linear`` (or 1x1 ``nn.Conv2d``, a linear layer over pixels)
that owns an active tensor (LoRA's ``lora_A`` and ``lora_B``, the classifier head) are computed
inside the ordinary backward pass from the layer's saved input and output gradient (``einsum``
over tokens or pixels), for the active tensors only.
Tensors not owned by a linear layer (VeRA's lambda vectors, say) fall back to a
one-example-at-a-time loop: slower, exact. Clipping is flat (one L2 norm over all active
tensors of the step), noise is Gaussian with std ``sigma * C`` on the clipped sum, and the
result is divided by the expected batch size, as Opacus does for Poisson sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Grads = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DPParams:
    """Public parameters of one client's DP-SGD."""

    noise_multiplier: float  # sigma
    clip_norm: float  # C
    expected_batch_size: float  # q * n
    # Test-only (``fedlora.privacy.canaries.run_audit(_disable_noise_for_tests=True)``): add no noise while
    # the accountant still reports sigma's epsilon, so tests can show that the audit catches a broken
    # mechanism. No config key sets it.
    _audit_disable_noise_for_tests: bool = False


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped ``nn.Conv2d``: per-sample gradients fuse like a Linear's."""
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
    )


def linear_per_sample(x: torch.Tensor, g: torch.Tensor, attr: str) -> torch.Tensor:
    """Per-example gradient of a linear layer's ``weight`` (batch, out, in) or ``bias`` (batch, out)
    from its input ``x`` (batch, ..., in) and output gradient ``g`` (batch, ..., out)."""
    b = x.shape[0]
    x3, g3 = x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])  # (batch, tokens, features)
    return torch.einsum("bto,bti->boi", g3, x3) if attr == "weight" else g3.sum(1)


class PerSampleGradients:
    """Hooks that record, per active linear layer, its input and output gradient."""

    def __init__(self, params: dict[str, nn.Parameter], model: nn.Module) -> None:
        owners: dict[int, tuple[str, nn.Module, str]] = {}
        for mname, module in model.named_modules():
            if isinstance(module, nn.Linear) or is_pointwise_conv(module):
                for attr in ("weight", "bias"):
                    p = getattr(module, attr)
                    if p is not None:
                        owners[id(p)] = (mname, module, attr)
        self.linear: dict[str, tuple[nn.Module, str]] = {}
        self.other: dict[str, nn.Parameter] = {}
        for name, p in params.items():
            if id(p) in owners:
                self.linear[name] = owners[id(p)][1:]
            else:
                self.other[name] = p
        self._records: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self._handles = []
        for module in {id(m): m for m, _ in self.linear.values()}.values():
            self._handles.append(module.register_forward_hook(self._forward_hook))
        self.enabled = False

    def _forward_hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.enabled or not any(p.requires_grad for p in module.parameters(recurse=False)):
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

    def linear_grads(self, active: list[str]) -> Grads:
        """Per-sample gradients (batch, *shape) of the active linear-layer tensors."""
        out: Grads = {}
        for name in active:
            module, attr = self.linear[name]
            total = None
            for x, g in self._records.get(id(module), []):
                if g is None:
                    raise RuntimeError(f"no output gradient recorded for {name}; was backward() called?")
                b = x.shape[0]
                dtype = getattr(module, attr).dtype  # bf16 autocast records bf16 tensors: fp32 from here on
                x, g = x.to(dtype), g.to(dtype)
                if isinstance(module, nn.Conv2d):  # a 1x1 conv is a linear layer over pixels
                    x, g = x.flatten(2).transpose(1, 2), g.flatten(2).transpose(1, 2)  # (batch, pixels, ch)
                piece = linear_per_sample(x, g, attr)
                if isinstance(module, nn.Conv2d) and attr == "weight":
                    piece = piece.reshape(b, *module.weight.shape)  # (batch, out, in, 1, 1)
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


def clipped_sum(per_sample: Grads, factors: torch.Tensor) -> Grads:
    return {k: torch.einsum("b,b...->...", factors.to(g.dtype), g) for k, g in per_sample.items()}


def add_noise(summed: Grads, *, std: float, generator: torch.Generator) -> Grads:
    out = {}
    for k, s in summed.items():
        noise = torch.randn(s.shape, generator=generator, dtype=torch.float32, device=generator.device)
        out[k] = s + (std * noise).to(device=s.device, dtype=s.dtype)
    return out


def privatize(per_sample: Grads, dp: DPParams, generator: torch.Generator) -> Grads:
    """clip -> sum -> noise -> scale by the expected batch size."""
    summed = clipped_sum(per_sample, clip_factors(per_sample, dp.clip_norm))
    std = 0.0 if dp._audit_disable_noise_for_tests else dp.noise_multiplier * dp.clip_norm
    noisy = add_noise(summed, std=std, generator=generator)
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
