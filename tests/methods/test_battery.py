"""One table of methods, one shared battery; then each method's own invariants."""

from __future__ import annotations

import pytest
import torch

from fedlora.federation.client import run_client
from fedlora.federation.simulation import Simulation
from fedlora.methods import available_methods
from tests.helpers import NEEDS, UPLOAD_ROLES


def role_of(roles: dict[str, str], key: str) -> str:
    return "score" if key.startswith("score/") else roles[key]


def test_every_registered_method_is_in_the_table():
    assert set(available_methods()) == set(UPLOAD_ROLES)


def _one_round_uploads(sim: Simulation, rnd: int = 1):
    plan = sim.method.plan(sim.plan_context(rnd))
    download = {k: sim.global_state[k] for k in plan.download}
    res = run_client(sim.rt, sim.method, plan, download, sim.specs[0], sim.clients[0],
                     local_steps=sim.cfg.federation.local_steps, seed=sim.cfg.train.seed)
    return plan, res


@pytest.mark.parametrize("name", sorted(UPLOAD_ROLES))
def test_battery(tiny_cfg, name):
    cfg = tiny_cfg(method={"name": name}, federation={"rounds": 1}, **NEEDS.get(name, {}))
    sim = Simulation(cfg)
    roles = {f.name: f.role for f in sim.rt.adapted.factors}
    # uploads only its declared keys, and never a key kept local
    plan, res = _one_round_uploads(sim)
    assert res.upload, name
    assert {role_of(roles, k) for k in res.upload} <= UPLOAD_ROLES[name]
    assert not set(res.upload) & sim.local_keys
    assert set(plan.download) <= set(sim.global_state)
    # advances the accountant
    assert res.state.dp_steps == cfg.federation.local_steps
    # one round runs and is deterministic under a seed
    a = Simulation(cfg).run()
    b = Simulation(cfg).run()
    assert a.rounds_done == 1 and a.metrics[0]["epsilon"] <= cfg.privacy.epsilon
    assert all(torch.equal(a.global_state[k], b.global_state[k]) for k in a.global_state)


def test_ffa_lora_keeps_a_bitwise_unchanged(tiny_cfg):
    sim = Simulation(tiny_cfg(method={"name": "ffa-lora"}, federation={"rounds": 3}))
    a_names = sim.rt.adapted.names(roles=("A",))
    init = {k: sim.rt.adapted.params[k].detach().clone() for k in a_names}
    sim.run()
    assert all(torch.equal(init[k], sim.rt.adapted.params[k]) for k in a_names)
    assert all(k in sim.global_state and torch.equal(init[k], sim.global_state[k]) for k in a_names)
    assert not set(a_names) & set(sim.method.plan(sim.plan_context(1)).download)


def test_rolora_trains_b_in_round_one_and_a_in_round_two(tiny_cfg):
    sim = Simulation(tiny_cfg(method={"name": "rolora"}, federation={"rounds": 2}))
    roles = {f.name: f.role for f in sim.rt.adapted.factors}
    s0 = dict(sim.global_state)
    sim.run_round(1)
    s1 = dict(sim.global_state)
    sim.run_round(2)
    s2 = dict(sim.global_state)

    def changed(x, y):
        return {roles[k] for k in x if not torch.equal(x[k], y[k])}

    assert changed(s0, s1) == {"B", "head"}
    assert changed(s1, s2) == {"A", "head"}


def test_fedsa_never_sends_b_or_head_and_keeps_them_per_client(tiny_cfg):
    sim = Simulation(tiny_cfg(method={"name": "fedsa-lora"}, federation={"rounds": 2}))
    roles = {f.name: f.role for f in sim.rt.adapted.factors}
    assert {roles[k] for k in sim.global_state} == {"A"}
    result = sim.run()
    assert all(m["bytes_up"] > 0 for m in result.metrics)
    b_name = sim.rt.adapted.names(roles=("B",))[0]
    b0, b1 = sim.clients[0].local[b_name], sim.clients[1].local[b_name]
    assert not torch.equal(b0, b1)  # personal B per client
    assert b0.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(UPLOAD_ROLES))
def test_battery_resume(tiny_cfg, tmp_path, name):
    """Every method: 2 rounds == 1 round, checkpoint, restore into a fresh simulation, 1 more round (bitwise)."""
    from fedlora.federation.checkpoint import load_checkpoint
    from fedlora.report.rundir import RunDir

    cfg = tiny_cfg(method={"name": name}, federation={"rounds": 2}, **NEEDS.get(name, {}))
    full = Simulation(cfg).run()
    first = Simulation(cfg, RunDir.create(tmp_path, "part", name))
    first.metrics.append(first.run_round(1))
    first.round = 1
    first.checkpoint(1)
    resumed = Simulation(cfg)
    resumed.restore(load_checkpoint(first.run_dir.checkpoint_dir(1)))
    out = resumed.run()
    assert set(out.global_state) == set(full.global_state)
    assert all(torch.equal(out.global_state[k], full.global_state[k]) for k in full.global_state), name
    assert out.metrics[-1]["accuracy"] == full.metrics[-1]["accuracy"]
    assert [c.dp_steps for c in resumed.clients] == [r["steps"] for r in full.metrics[-1]["privacy"]]
