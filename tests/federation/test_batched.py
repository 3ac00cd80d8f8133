"""Batched multi-client engine (federation/batched.py): equal to the clients run one after another."""

from __future__ import annotations

import copy

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.federation.batched import run_batched
from fedlora.federation.client import run_client
from fedlora.federation.clients_per_pass import auto_k, engine_k
from fedlora.federation.runtime import Runtime
from fedlora.federation.simulation import Simulation


def f64_sim(cfg) -> Simulation:
    rt = Runtime(cfg)
    rt.adapted.model.double()
    return Simulation(cfg, runtime=rt)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    return float((a - b).norm()) <= rel * float(b.norm()) + 1e-12


def cfg_for(tiny_cfg, name: str, batched=0, **extra):
    sections = {"method": {"name": name}, "task": {"cache_prefix": False},
                "federation": {"num_clients": 4, "local_steps": 3, "batched_clients": batched},
                "train": {"batch_size": 12, "optimizer": "adam", "lr": 0.05},
                "privacy": {"accountant": "rdp", "noise_multiplier": 1.0, "epsilon": 50.0}}  # no calibration: fast
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    return tiny_cfg(**sections)


@pytest.mark.parametrize("method", ["dp-lora", "la-lora", "ffa-lora"])
def test_batched_round_equals_clients_one_after_another(tiny_cfg, method):
    sim = f64_sim(cfg_for(tiny_cfg, method))
    plan = sim.method.plan(sim.plan_context(1))
    download = {k: sim.global_state[k] for k in plan.download}
    seed, steps = sim.cfg.train.seed, sim.cfg.federation.local_steps
    states = [copy.deepcopy(s) for s in sim.clients]
    seq = [run_client(sim.rt, sim.method, plan, download, spec, st, local_steps=steps, seed=seed)
           for spec, st in zip(sim.specs, states, strict=True)]
    bat = run_batched(sim.rt, sim.method, plan, download, sim.specs, [copy.deepcopy(s) for s in sim.clients],
                      local_steps=steps, seed=seed)
    assert len(bat) == len(seq) == 4
    for s, b in zip(seq, bat, strict=True):
        assert sorted(s.upload) == sorted(b.upload) and s.upload
        for k in s.upload:
            assert s.upload[k].dtype == torch.float64
            assert close(b.upload[k], s.upload[k]), (method, k)
        assert (b.steps, b.examples, b.state.dp_steps) == (s.steps, s.examples, s.state.dp_steps)
        assert b.loss == pytest.approx(s.loss, rel=1e-6, nan_ok=True)  # NaN under DP: the loss is not computed
    # the round moved the factors: the comparison is not between two untouched states
    moved = [k for k in seq[0].upload if not torch.equal(seq[0].upload[k], download.get(k, seq[0].upload[k]))]
    assert moved


@pytest.mark.slow
def test_batched_run_equals_sequential_run(tiny_cfg):
    """Two rounds of FedSA-LoRA (B and head kept on each client), 2 clients per pass: global state,
    every client's local tensors and the privacy ledger equal the sequential engine's."""
    seq = f64_sim(cfg_for(tiny_cfg, "fedsa-lora", 0))
    bat = f64_sim(cfg_for(tiny_cfg, "fedsa-lora", 2))
    assert (seq.batched_k, bat.batched_k) == (0, 2)
    r_seq, r_bat = seq.run(), bat.run()
    assert r_bat.rounds_done == r_seq.rounds_done == 2
    for k, v in r_seq.global_state.items():
        assert close(r_bat.global_state[k], v), k
    for a, b in zip(seq.clients, bat.clients, strict=True):
        assert a.dp_steps == b.dp_steps > 0
        for k in a.local:
            assert close(b.local[k], a.local[k]), k
    assert [(r["client"], r["steps"], r["epsilon"]) for r in seq.ledger()] == \
        [(r["client"], r["steps"], r["epsilon"]) for r in bat.ledger()]
    assert all(m["batched_clients"] == 2 for m in r_bat.metrics)
    assert r_bat.metrics[-1]["accuracy"] == pytest.approx(r_seq.metrics[-1]["accuracy"])


def test_non_private_batched_equals_sequential(tiny_cfg):
    sim = f64_sim(cfg_for(tiny_cfg, "dp-lora", privacy={"enabled": False}))
    plan = sim.method.plan(sim.plan_context(1))
    download = {k: sim.global_state[k] for k in plan.download}
    seq = [run_client(sim.rt, sim.method, plan, download, spec, copy.deepcopy(st), local_steps=2, seed=0)
           for spec, st in zip(sim.specs, sim.clients, strict=True)]
    bat = run_batched(sim.rt, sim.method, plan, download, sim.specs, copy.deepcopy(sim.clients), local_steps=2, seed=0)
    for s, b in zip(seq, bat, strict=True):
        assert b.state.dp_steps == 0
        for k in s.upload:
            assert close(b.upload[k], s.upload[k]), k


def test_what_cannot_batch_falls_back_under_auto_and_is_refused_when_explicit(tiny_cfg):
    fd = {"curvature": "secant"}  # as-lora's secant schedule keeps each client's last two gradients
    auto = Simulation(cfg_for(tiny_cfg, "as-lora", "auto", method={"options": fd}))
    assert auto.batched_k == 0
    with pytest.raises(ConfigError, match="batched_clients=3 cannot be used: .*schedule keeps history"):
        Simulation(cfg_for(tiny_cfg, "as-lora", 3, method={"options": fd}))
    with pytest.raises(ConfigError, match="adapter.dropout"):
        Simulation(cfg_for(tiny_cfg, "dp-lora", 2, adapter={"dropout": 0.1}))


def test_auto_picks_k_from_free_memory(tiny_cfg, monkeypatch):
    sim = Simulation(cfg_for(tiny_cfg, "dp-lora", "auto"))
    assert sim.batched_k == 4  # the tiny model fits every client of the round
    import fedlora.federation.clients_per_pass as batched

    monkeypatch.setattr(batched, "_available_bytes", lambda device: 0)
    assert auto_k(sim) == 1 and engine_k(sim) == 0  # no room for two: one after another
    with pytest.raises(ConfigError, match="batched_clients"):
        cfg_for(tiny_cfg, "dp-lora", -1)


def test_auto_on_cpu_keeps_a_pass_within_its_activation_budget(tiny_cfg, monkeypatch):
    import fedlora.federation.clients_per_pass as batched

    sim = Simulation(cfg_for(tiny_cfg, "dp-lora", "auto"))
    per_client = max(s.expected_batch for s in sim.specs) * batched.activation_bytes(sim.rt)
    monkeypatch.setattr(batched, "CPU_PASS_BYTES", 2 * per_client + 1)
    assert auto_k(sim) == 2
