"""seeds.py: seeded_torch seeds the CPU generator as torch.manual_seed did, and restores it."""

from __future__ import annotations

import torch

from fedlora.seeds import derive_seed, seeded_torch


def test_seeded_torch_draws_as_manual_seed_and_restores_the_global_state() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with seeded_torch(0, "client", 3, 1, "dropout"):
        inside = torch.rand(5)
        masks = torch.nn.functional.dropout(torch.ones(8), p=0.5, training=True)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    torch.manual_seed(derive_seed(0, "client", 3, 1, "dropout"))  # what the block used to call
    assert torch.equal(inside, torch.rand(5))
    assert torch.equal(masks, torch.nn.functional.dropout(torch.ones(8), p=0.5, training=True))
