"""``train.lr_schedule``: the per-round factor on every learning rate, in both engines."""

from __future__ import annotations

import copy

import pytest
import torch

from fedlora.federation.batched import run_batched
from fedlora.federation.client import round_lr_scale, run_client
from fedlora.federation.simulation import Simulation


def test_cosine_runs_from_lr_to_the_final_fraction(tiny_cfg):
    cfg = tiny_cfg(train={"lr_schedule": "cosine", "lr_final_fraction": 0.2}).train
    scales = [round_lr_scale(cfg, r, 5) for r in range(1, 6)]
    assert scales[0] == pytest.approx(1.0) and scales[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(scales, scales[1:], strict=False))  # strictly decreasing
    assert scales[2] == pytest.approx(0.6)  # halfway: the mean of both ends
    assert round_lr_scale(tiny_cfg().train, 3, 5) == 1.0  # constant (the default)
    assert round_lr_scale(cfg, 1, 1) == 1.0  # a single round keeps lr


def _round(sim: Simulation, r: int, batched: bool):
    plan = sim.method.plan(sim.plan_context(r))
    download = {k: sim.global_state[k] for k in plan.download}
    seed, steps = sim.cfg.train.seed, sim.cfg.federation.local_steps
    states = [copy.deepcopy(s) for s in sim.clients]
    if batched:
        return run_batched(sim.rt, sim.method, plan, download, sim.specs, states, local_steps=steps, seed=seed), download
    return [run_client(sim.rt, sim.method, plan, download, spec, st, local_steps=steps, seed=seed)
            for spec, st in zip(sim.specs, states, strict=True)], download


@pytest.mark.parametrize("batched", [False, True])
def test_the_last_round_moves_by_the_final_fraction(tiny_cfg, batched):
    """Plain SGD, no DP, one local step: a round's move is lr x scale x gradient, so the last round of
    a cosine schedule moves exactly lr_final_fraction of what the same round moves under constant."""
    sections = {"task": {"cache_prefix": False}, "privacy": {"enabled": False},
                "federation": {"num_clients": 2, "local_steps": 1, "rounds": 4},
                "train": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0}}
    moves = {}
    for schedule in ("constant", "cosine"):
        sim = Simulation(tiny_cfg(**{**sections, "train": {**sections["train"], "lr_schedule": schedule,
                                                             "lr_final_fraction": 0.25}}))
        results, download = _round(sim, 4, batched)
        moves[schedule] = torch.cat([(res.upload[k].double() - download[k].double()).flatten()
                                     for res in results for k in sorted(res.upload) if k in download])
    assert float(moves["constant"].norm()) > 1e-6
    torch.testing.assert_close(moves["cosine"], 0.25 * moves["constant"], rtol=1e-4, atol=1e-9)
