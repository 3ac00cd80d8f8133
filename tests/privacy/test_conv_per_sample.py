"""Fused per-sample gradients of LoRA on 1x1 convolutions equal the one-example loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlora.adapters import inject_adapters
from fedlora.config import AdapterConfig
from fedlora.privacy.dpsgd import PerSampleGradients, is_pointwise_conv, loop_per_sample


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()), nn.Sequential(nn.Conv2d(6, 5, 1), nn.ReLU())]
        )
        self.classifier = nn.Linear(5, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = pixel_values
        for block in self.backbone.blocks:
            h = block(h)
        return self.classifier(h.mean((2, 3)))


def test_pointwise_conv_detection():
    assert is_pointwise_conv(nn.Conv2d(4, 4, 1))
    assert not is_pointwise_conv(nn.Conv2d(4, 4, 3))
    assert not is_pointwise_conv(nn.Conv2d(4, 4, 1, stride=2))
    assert not is_pointwise_conv(nn.Conv2d(4, 4, 1, groups=2))


@pytest.mark.parametrize("size", [4, 1])  # 1: one-pixel maps, where 1x1 convs run as matrix products
@pytest.mark.parametrize("roles", [("A", "B", "head"), ("A",), ("B",)])
def test_fused_conv_per_sample_gradients_match_loop(roles, size):
    torch.manual_seed(0)
    cfg = AdapterConfig(rank=2, alpha=4, target_modules=["1.0"], layers=None)
    adapted = inject_adapters(TinyConvNet().double(), cfg, seed=0)
    for p in adapted.params.values():  # B starts at zero: move it so every factor has a gradient
        nn.init.normal_(p, std=0.3)
    active = adapted.names(roles=roles)
    params = {k: adapted.params[k] for k in active}
    hooks = PerSampleGradients(adapted.params, adapted.model)
    assert set(active) <= set(hooks.linear)  # every LoRA factor is on a 1x1 conv or the head
    assert any(type(m).__name__ == "PointwiseConv" for m in adapted.model.modules())
    x = torch.randn(5, 3, size, size, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])

    def losses(i: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return nn.functional.cross_entropy(adapted.model(pixel_values=x[i]), y[i], reduction="none")

    hooks.enabled = True
    torch.autograd.grad(losses().sum(), list(params.values()))
    fused = hooks.fused_grads(active)
    hooks.enabled = False
    exact = loop_per_sample(params, losses, 5)
    for k in active:
        assert fused[k].shape == exact[k].shape
        torch.testing.assert_close(fused[k], exact[k])
