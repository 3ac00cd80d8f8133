"""Seeds derived from (run seed, purpose, indices): order-independent and resumable."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def derive_seed(*parts: object) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


@contextmanager
def seeded_torch(*parts: object, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run a block with torch's global RNG seeded from ``parts`` (e.g. LoRA dropout masks of one
    (client, round, attempt, step)), restoring the global state afterwards."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(*parts))
        yield
