"""Fashion-MNIST (and any MNIST-layout folder) from IDX files.

The offline image data come from Debian's ``dataset-fashion-mnist`` package, which puts the four
gzipped IDX files under ``/usr/share/datasets/fashion-mnist``. A folder holding the same four
files (gzipped or not) works as ``task.dataset`` too.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from fedlora.errors import DataError

FASHION_MNIST = "fashion-mnist"
FASHION_LABELS = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle boot"]
SEARCH = ("/usr/share/datasets/fashion-mnist", "/usr/local/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally gzipped) as an array of its declared shape; a malformed file is a
    :class:`DataError` naming it."""
    fix = f"re-download it or reinstall {DEBIAN_PACKAGE}"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"'{path}' cannot be read ({type(err).__name__}: {err}); {fix}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(f"'{path}' is not an IDX file; {fix}")
    ndim, dtype = data[3], np.dtype(_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"IDX file '{path}' is shorter ({len(data)} bytes) than its header ({offset} bytes); {fix}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if (len(data) - offset) % dtype.itemsize:
        raise DataError(f"IDX file '{path}' has a body of {len(data) - offset} bytes, not a multiple of its "
                        f"{dtype.itemsize}-byte values; {fix}")
    body = np.frombuffer(data, dtype=dtype, offset=offset)
    if body.size != int(np.prod(shape)):
        raise DataError(f"IDX file '{path}' is truncated ({body.size} values, header says {shape}); {fix}")
    return body.reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def is_idx_folder(folder: Path) -> bool:
    return folder.is_dir() and all(_find(folder, f) for pair in _FILES.values() for f in pair)


def fashion_mnist_dir() -> Path:
    """The first standard location holding the four Fashion-MNIST IDX files."""
    for folder in SEARCH:
        if is_idx_folder(Path(folder)):
            return Path(folder)
    raise DataError(
        f"Fashion-MNIST IDX files not found (looked in {', '.join(SEARCH)}); run `make install` or "
        f"`apt-get install {DEBIAN_PACKAGE}`, or point task.dataset at a folder with the IDX files"
    )


def load_idx_folder(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images (n, 28, 28) uint8, labels (n,) int64), "test": ...}``."""
    out = {}
    for split, (images, labels) in _FILES.items():
        ip, lp = _find(folder, images), _find(folder, labels)
        if ip is None or lp is None:
            raise DataError(f"folder '{folder}' lacks {images if ip is None else labels}[.gz]; add the IDX files")
        x, y = read_idx(ip), read_idx(lp).astype(np.int64)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"'{ip.name}' has {x.shape[0]} images but '{lp.name}' {y.shape[0]} labels")
        out[split] = (x, y)
    return out
