"""Mixed precision: the forward passes under bf16 autocast, everything trainable in fp32.

With ``train.precision=bf16`` the frozen backbone's matrix products run in bfloat16 through
:func:`torch.autocast` on the model's device type (CUDA or CPU). The LoRA factors and head stay
float32 parameters; autocast casts them to bf16 for the product only, so their gradients come
back float32. The fused per-sample gradients (``privacy/dpsgd.py``) cast each layer's recorded
input and output gradient to the parameter's dtype before the ``einsum``, so clipping, noise,
the optimizer state and the uploads stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """The forward-pass context for ``train.precision`` (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield
