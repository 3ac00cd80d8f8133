"""Transformers image classifiers (ViT, Swin, ...) by name or local folder, for the image task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedlora.errors import DataError
from fedlora.tasks.text import resolve_model_path


@dataclass
class Processor:
    size: int
    mean: list[float]
    std: list[float]


def load_processor(name: str) -> Processor:
    """Image side and normalisation from the model's image processor (or its config)."""
    from transformers import AutoConfig, AutoImageProcessor  # noqa: PLC0415

    path = resolve_model_path(name)
    try:
        proc = AutoImageProcessor.from_pretrained(path)
        size = proc.size.get("height") or proc.size.get("shortest_edge")
        return Processor(int(size), list(proc.image_mean), list(proc.image_std))
    except (OSError, ValueError):
        pass
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise DataError(f"could not load image model '{name}' ({str(err).splitlines()[0][:120]}); check the name or path") from None
    return Processor(int(getattr(config, "image_size", 224)), [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


class HFImageClassifier(nn.Module):
    """``forward(pixel_values)`` -> logits; the head stays reachable as ``model.classifier``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits  # (batch, labels)


def load_image_model(name: str, num_labels: int) -> nn.Module:
    from transformers import AutoModelForImageClassification  # noqa: PLC0415
    from transformers.utils import logging  # noqa: PLC0415

    path = resolve_model_path(name)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the re-initialised head is intended
    try:
        model = AutoModelForImageClassification.from_pretrained(path, num_labels=num_labels, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as err:
        raise DataError(f"could not load image model '{name}' ({str(err).splitlines()[0][:120]}); check the name or path") from None
    finally:
        logging.set_verbosity(verbosity)
    if not hasattr(model, "classifier"):
        raise DataError(f"image model '{name}' has no 'classifier' head; use a ViT/Swin-style classification model")
    for module in model.modules():  # the backbone is a frozen feature map: no dropout
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return HFImageClassifier(model)
