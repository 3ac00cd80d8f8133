"""Sharpness: power iteration with Hessian-vector products (issue 9, item 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlora.federation.sharpness import hessian_vector, top_eigenvalue
from fedlora.federation.simulation import Simulation


def quadratic(h: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """0.5 z^T H z over z = (x, y), split into two chunks of weight 1/2 each (loss = their weighted sum)."""
    def terms():
        z = torch.cat([x, y])
        for _ in range(2):
            yield 0.5 * z @ h @ z, 0.5
    return terms


def test_power_iteration_finds_known_top_eigenvalue() -> None:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    eig = torch.tensor([9.0, 4.0, 3.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    h = q @ torch.diag(eig) @ q.T
    x = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    v = [torch.ones(3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]
    hv = torch.cat(hessian_vector(quadratic(h, x, y), [x, y], v))
    assert torch.allclose(hv, h[:, :3].sum(1))
    lam = top_eigenvalue(quadratic(h, x, y), [x, y], iters=200, tol=1e-10)
    assert lam == pytest.approx(9.0, rel=1e-6)


def test_sharpness_is_logged_on_schedule(tiny_cfg, monkeypatch) -> None:
    import fedlora.federation.sharpness as sharpness

    monkeypatch.setattr(sharpness, "global_sharpness", lambda sim: 1.5)  # the schedule only; the value below
    cfg = tiny_cfg(federation={"rounds": 3, "local_steps": 1}, eval={"sharpness_every": 2})
    records = Simulation(cfg).run().metrics
    assert ["sharpness" in r for r in records] == [False, True, True]  # every 2 rounds and at the end
    assert all(r["sharpness"] == 1.5 for r in records[1:])
    off = Simulation(tiny_cfg(federation={"rounds": 1, "local_steps": 1})).run().metrics
    assert "sharpness" not in off[0]  # opt-in


def test_sharpness_uses_server_data_only(tiny_cfg, monkeypatch) -> None:
    sim = Simulation(tiny_cfg(federation={"rounds": 1}, eval={"sharpness_every": 1, "sharpness_examples": 40}))
    seen = []
    original = sim.rt.task.batch

    def spy(examples, indices, device):
        seen.append((examples is sim.rt.task.test, np.asarray(indices).copy()))
        return original(examples, indices, device)

    sim.run_round(1)  # training batches come from the train split
    seen.clear()
    monkeypatch.setattr(sim.rt.task, "batch", spy)
    from fedlora.federation.sharpness import global_sharpness

    value = global_sharpness(sim)
    assert math.isfinite(value) and value > 0  # tiny BERT: finite and positive
    assert seen and all(is_test for is_test, _ in seen)
    assert sorted(np.concatenate([i for _, i in seen]).tolist()) == list(range(40))
