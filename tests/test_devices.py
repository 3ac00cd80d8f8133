"""devices.py: the one-sync finiteness checks used on every download and upload."""

from __future__ import annotations

import torch

from fedlora.devices import all_finite, non_finite, to_device


def test_all_finite_and_non_finite_name_the_bad_tensors() -> None:
    good = {"a": torch.ones(3, 2), "b": torch.zeros(4, dtype=torch.float64), "s": torch.tensor(1.5)}
    assert all_finite(list(good.values())) and non_finite(good) == set() and all_finite([])
    bad = {**good, "c": torch.tensor([1.0, float("nan")]), "d": torch.tensor([[float("inf")]], dtype=torch.float64)}
    assert not all_finite(list(bad.values()))
    assert non_finite(bad) == {"c", "d"}


def test_to_device_on_the_cpu_is_a_plain_move() -> None:
    t = torch.arange(6).reshape(2, 3)
    out = to_device(t, "cpu")
    assert out.device.type == "cpu" and torch.equal(out, t)
