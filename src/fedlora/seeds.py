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
    device, seed = torch.device(device), derive_seed(*parts)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.manual_seed(seed)
        else:  # the CPU generator only: torch.manual_seed also queues lazy seeds for CUDA, XPU and MTIA,
            torch.default_generator.manual_seed(seed)  # each formatting a stack trace (most of the cost)
        yield
