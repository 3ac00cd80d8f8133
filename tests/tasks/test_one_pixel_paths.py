"""The one-pixel rewrites of the testbed's late blocks compute what the plain convolutions compute."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedlora.pointwise import PointwiseConv, is_pointwise_conv, use_pointwise
from fedlora.tasks.effnet import CentreTapDepthwise, replace_depthwise


class PaddedDepthwise(nn.Conv2d):
    """Stands in for the package's TF-"same" convolution: a ZeroPad2d, then an unpadded conv."""

    def __init__(self, channels: int, k: int, pad: tuple[int, int, int, int]) -> None:
        super().__init__(channels, channels, k, groups=channels, bias=False)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, None, self.stride, 0, 1, self.groups)


def _value_and_input_grad(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = module(x)
    (g,) = torch.autograd.grad((y * torch.arange(y.numel()).view_as(y)).sum(), x)
    return y.detach(), g


def test_centre_tap_depthwise_is_the_padded_convolution_bit_for_bit():
    torch.manual_seed(0)
    for k in (3, 5):
        ref = PaddedDepthwise(6, k, (k // 2,) * 4)
        holder = nn.Sequential(ref)
        assert replace_depthwise(holder) == 1
        fast = holder[0]
        assert isinstance(fast, CentreTapDepthwise) and fast.centre == (k // 2, k // 2)
        for size in (1, 4):  # one pixel: the centre tap; larger maps: the padded convolution
            x = torch.randn(3, 6, size, size)
            y_ref, g_ref = _value_and_input_grad(ref, x)
            y, g = _value_and_input_grad(fast, x)
            assert torch.equal(y, y_ref) and torch.equal(g, g_ref)


def test_centre_tap_needs_symmetric_padding():
    holder = nn.Sequential(PaddedDepthwise(4, 5, (1, 3, 1, 3)))
    replace_depthwise(holder)
    assert holder[0].centre is None  # an off-centre pad: always the padded convolution
    x = torch.randn(2, 4, 1, 1)
    torch.testing.assert_close(holder[0](x), F.conv2d(F.pad(x, (1, 3, 1, 3)), holder[0].weight, groups=4))


def test_pointwise_conv_matches_the_convolution_and_keeps_its_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(7, 5, 1)
    fast = nn.Conv2d(7, 5, 1)
    fast.load_state_dict(conv.state_dict())
    assert use_pointwise(nn.Sequential(fast)) == 1 and type(fast) is PointwiseConv
    for size in (1, 3):
        x = torch.randn(4, 7, size, size)
        torch.testing.assert_close(fast(x), conv(x))
        gw_fast = torch.autograd.grad(fast(x).square().sum(), fast.weight)[0]
        gw = torch.autograd.grad(conv(x).square().sum(), conv.weight)[0]
        torch.testing.assert_close(gw_fast, gw)
    assert list(fast.state_dict()) == list(conv.state_dict())


def test_use_pointwise_swaps_plain_pointwise_convolutions_only():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 1, stride=2),
                          nn.Conv2d(4, 4, 1, groups=2), PaddedDepthwise(3, 1, (0, 0, 0, 0)))
    assert use_pointwise(model) == 1
    assert [type(m).__name__ for m in model] == ["PointwiseConv", "Conv2d", "Conv2d", "Conv2d", "PaddedDepthwise"]
    assert is_pointwise_conv(model[0]) and not is_pointwise_conv(model[4])
