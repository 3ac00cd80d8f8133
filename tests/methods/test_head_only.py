"""The head-only reference (same DP, no adapter trained) and the head's own learning rate."""

from __future__ import annotations

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.federation.client import _optimizer, run_client
from fedlora.federation.simulation import Simulation
from fedlora.methods import MethodSetup, build_method


def test_head_only_trains_downloads_and_uploads_only_the_head(tiny_cfg):
    sim = Simulation(tiny_cfg(method={"name": "head-only"}, federation={"rounds": 2}))
    roles = {f.name: f.role for f in sim.rt.adapted.factors}
    plan = sim.method.plan(sim.plan_context(1))
    assert {roles[k] for k in plan.trainable} == {"head"} and {roles[k] for k in plan.download} == {"head"}
    init = {k: v.clone() for k, v in sim.global_state.items()}
    download = {k: sim.global_state[k] for k in plan.download}
    res = run_client(sim.rt, sim.method, plan, download, sim.specs[0], sim.clients[0],
                     local_steps=sim.cfg.federation.local_steps, seed=sim.cfg.train.seed)
    assert {roles[k] for k in res.upload} == {"head"}
    assert res.state.dp_steps == sim.cfg.federation.local_steps  # the head's steps are DP steps
    result = sim.run()
    moved = {roles[k] for k in init if not torch.equal(init[k], result.global_state[k])}
    assert moved == {"head"}  # A and B bitwise at their initial values (B = 0: the pretrained model)
    assert all(torch.equal(sim.rt.adapted.params[k], init[k]) for k in init if roles[k] in ("A", "B"))
    assert result.metrics[-1]["epsilon"] <= sim.cfg.privacy.epsilon


def test_head_only_needs_a_trained_head(tiny_cfg):
    with pytest.raises(ConfigError, match="train_head=true"):
        build_method("head-only", MethodSetup({}, False, 2, 0, adapter=tiny_cfg(adapter={"train_head": False}).adapter))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_head_lr_is_a_second_parameter_group(tiny_cfg, optimizer):
    cfg = tiny_cfg(train={"optimizer": optimizer, "lr": 0.1, "head_lr": 0.01}).train
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = _optimizer([p, q], cfg, [False, True])
    assert [(g["lr"], len(g["params"])) for g in opt.param_groups] == [(0.1, 1), (0.01, 1)]
    assert [g["lr"] for g in _optimizer([p, q], tiny_cfg(train={"optimizer": optimizer}).train, [False, True]).param_groups] == [0.1]


def test_head_lr_applies_in_a_round(tiny_cfg):
    """A zero head rate leaves the head where it was and still trains the factors."""
    sim = Simulation(tiny_cfg(train={"head_lr": 1e-12, "lr": 0.5}, federation={"rounds": 1}))
    roles = {f.name: f.role for f in sim.rt.adapted.factors}
    init = {k: v.clone() for k, v in sim.global_state.items()}
    result = sim.run()
    for k, v in result.global_state.items():
        step = float((v - init[k]).abs().max())
        if roles[k] == "head":
            assert step < 1e-9
        elif roles[k] == "B":
            assert step > 1e-6
