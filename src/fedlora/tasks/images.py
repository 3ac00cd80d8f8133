"""Image sources: Fashion-MNIST IDX files, image folders, Hugging Face image datasets.

Every loader returns ``{"train": (images, labels), "test": ...}`` with images as one uint8
array ``(channels, H, W)`` per example (all the same size) and int64 labels, plus label names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import DataError
from fedlora.tasks.idx import (
    FASHION_LABELS,
    FASHION_MNIST,
    fashion_mnist_dir,
    is_idx_folder,
    load_idx_folder,
)

Split = tuple[list[np.ndarray], np.ndarray]
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def to_chw(image: Any, size: int | None) -> np.ndarray:
    """A PIL image (or array) -> uint8 (3, size, size), RGB."""
    from PIL import Image  # noqa: PLC0415

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def _read_image(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(path) as img:
            return to_chw(img, size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:  # SyntaxError: PIL's broken PNG chunks
        raise DataError(f"image '{path}' cannot be read ({type(err).__name__}); replace or remove the file") from None


def _folder_split(root: Path, classes: list[str], size: int | None) -> Split:
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*")) if (root / name).is_dir() else []:
            if path.suffix.lower() in _IMAGE_SUFFIXES:
                images.append(_read_image(path, size))
                labels.append(label)
    return images, np.asarray(labels, dtype=np.int64)


def load_image_folder(root: Path, size: int | None) -> tuple[dict[str, Split], list[str]]:
    """``root/<class>/*.png``, or ``root/train/<class>/...`` and ``root/test/<class>/...``."""
    has_splits = (root / "train").is_dir()
    base = root / "train" if has_splits else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"image folder '{base}' needs one subfolder per class (at least two); found {len(classes)}")
    splits = {"train": _folder_split(base, classes, size)}
    if has_splits and (root / "test").is_dir():
        splits["test"] = _folder_split(root / "test", classes, size)
    if len(splits["train"][1]) == 0:
        raise DataError(f"image folder '{base}' has no .png/.jpg images in its class subfolders")
    present = sorted({classes[i] for i in splits["train"][1].tolist()})
    if len(present) < 2:
        raise DataError(f"image folder '{base}' has images of a single class ('{present[0]}'); classification needs "
                        f"images in at least two class subfolders")
    return splits, classes


def load_hub_images(name: str, config: str | None, image_column: str, label_column: str,
                    size: int | None) -> tuple[dict[str, Split], list[str]]:
    try:
        import datasets  # noqa: PLC0415  (optional, online only)
    except ImportError:
        raise DataError(f"'{name}' is not a local folder; loading it by name needs `pip install fedlora[online]`") from None
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as err:  # noqa: BLE001  (network, unknown name, ...)
        raise DataError(f"could not load image dataset '{name}' ({type(err).__name__}); check the name or network") from None
    splits: dict[str, Split] = {}
    for split in ("train", "test", "validation", "valid"):
        if split not in ds or (split != "train" and "test" in splits):
            continue
        part = ds[split]
        for col in (image_column, label_column):
            if col not in part.column_names:
                key = "task.image_column" if col == image_column else "task.label_column"
                raise DataError(f"dataset '{name}' has no column '{col}' ({', '.join(part.column_names)}); set {key}")
        labels = np.asarray(part[label_column], dtype=np.int64)
        if (labels < 0).any():
            continue
        splits["train" if split == "train" else "test"] = ([to_chw(im, size) for im in part[image_column]], labels)
    feature = ds["train"].features[label_column]
    names = list(getattr(feature, "names", None) or [str(i) for i in range(int(splits["train"][1].max()) + 1)])
    return splits, names


def load_images(cfg: Any, size: int | None) -> tuple[dict[str, Split], list[str]]:
    """Dispatch on ``cfg.dataset``: 'fashion-mnist', an IDX folder, an image folder, a datasets name."""
    if cfg.dataset == FASHION_MNIST:
        data = load_idx_folder(fashion_mnist_dir())
        return {s: (list(x[:, None]), y) for s, (x, y) in data.items()}, list(FASHION_LABELS)
    path = Path(cfg.dataset).expanduser()
    if path.exists():
        if is_idx_folder(path):
            data = load_idx_folder(path)
            if len(np.unique(data["train"][1])) < 2:
                raise DataError(f"IDX folder '{path}' has training labels of a single class; classification needs at least two")
            n = int(max(y.max() for _, y in data.values())) + 1
            return {s: (list(x[:, None]), y) for s, (x, y) in data.items()}, [str(i) for i in range(n)]
        if path.is_dir():
            return load_image_folder(path, size)
        raise DataError(f"image data '{path}' must be a folder (IDX files or one subfolder per class)")
    if cfg.dataset.startswith((".", "/", "~")):
        raise DataError(f"image folder '{cfg.dataset}' does not exist; check task.dataset")
    return load_hub_images(cfg.dataset, cfg.dataset_config, cfg.image_column, cfg.label_column, size)
