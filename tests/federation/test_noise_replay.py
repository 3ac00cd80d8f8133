"""Noise amplification: the cross term of noise on both factors grows like sigma^2 (issue 9, item 2)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedlora.federation.noise_replay import replay_step
from fedlora.federation.simulation import Simulation

SIGMAS = [0.5, 1.0, 2.0, 4.0]
DRAWS = 4


@pytest.fixture
def sim(tiny_cfg) -> Simulation:
    return Simulation(tiny_cfg(federation={"rounds": 1}, privacy={"noise_multiplier": 1.0, "epsilon": 50.0}))


def test_cross_term_grows_quadratically(sim: Simulation) -> None:
    spec = sim.specs[0]
    plan = sim.method.plan(sim.plan_context(1))  # DP-LoRA: A, B and the head jointly
    active = sorted(plan.trainable)
    cross, linear = [], []
    for sigma in SIGMAS:
        s = replace(spec, dp=replace(spec.dp, noise_multiplier=sigma))
        splits = [replay_step(sim.rt, s, sim.global_state, active, lr=0.1, seed=100 * i + int(8 * sigma))
                  for i in range(DRAWS)]  # fresh noise (and batch) for every draw and sigma
        assert all(x.residual < 1e-12 for x in splits)  # noisy = clean + linear + cross, exactly
        cross.append(np.mean([x.cross for x in splits]))
        linear.append(np.mean([x.linear for x in splits]))
    slope_cross = np.polyfit(np.log(SIGMAS), np.log(cross), 1)[0]
    slope_linear = np.polyfit(np.log(SIGMAS), np.log(linear), 1)[0]
    assert slope_cross == pytest.approx(2.0, abs=0.2)  # tolerance: 4 draws per sigma, 4 modules
    assert slope_linear == pytest.approx(1.0, abs=0.2)


def test_single_factor_step_has_no_cross_term(sim: Simulation) -> None:
    b_only = sorted(f.name for f in sim.rt.adapted.factors if f.role == "B")  # FFA / RoLoRA / LA-LoRA step
    split = replay_step(sim.rt, sim.specs[0], sim.global_state, b_only, lr=0.1, seed=3)
    assert split.cross == 0.0 and split.linear > 0
