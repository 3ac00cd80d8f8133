"""Personalised evaluation (local roles), fedsa-rslora's check, and W0 in the global state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.federation.simulation import Simulation, split_test_set
from fedlora.methods import MethodSetup, build_method


def test_split_test_set_deals_every_example_once_following_the_training_mix():
    labels = np.array([0] * 50 + [1] * 30)
    hist = [[10, 0], [30, 10], [0, 20]]  # client 0 never saw label 1, client 2 never saw label 0
    shares = split_test_set(labels, hist, seed=0)
    assert sorted(np.concatenate(shares).tolist()) == list(range(80))
    assert set(labels[shares[0]]) == {0} and set(labels[shares[2]]) == {1}
    assert np.bincount(labels[shares[1]], minlength=2).tolist() == [38, 10]  # floor(50*30/40) + the remainder; 30*10/30
    assert all(np.array_equal(a, b) for a, b in zip(shares, split_test_set(labels, hist, seed=0), strict=True))


def test_fedsa_reports_personal_accuracy_beside_the_global_figure(tiny_cfg):
    sim = Simulation(tiny_cfg(method={"name": "fedsa-lora"}, federation={"rounds": 1}))
    rec = sim.run().metrics[-1]
    assert rec["accuracy"] == sim.rt.evaluate(sim.global_state)["accuracy"]  # the global figure: the global state alone
    test = sim.rt.task.test  # the personal one: each client's own model on its own share, weighted by share size
    own = [sim.rt.evaluate({**sim.global_state, **c.local}, test.subset(s))["accuracy"] * len(s)
           for s, c in zip(sim.shares, sim.clients, strict=True) if len(s)]
    assert rec["personal_accuracy"] == pytest.approx(sum(own) / len(test), abs=1e-12)
    sim.rt.adapted.load(sim.init_local)
    assert sum(len(s) for s in sim.shares) == len(sim.rt.task.test)
    # the personal figure uses each client's own B: a client's local B differs from the initial one
    b = sim.rt.adapted.names(roles=("B",))[0]
    assert not torch.equal(sim.clients[0].local[b], sim.init_local[b])
    assert torch.equal(sim.rt.adapted.params[b], sim.init_local[b])  # restored after evaluation
    labels = sim.rt.task.test.labels  # the yardstick: every client predicts its own share's majority label
    expected = sum(np.bincount(labels[s]).max() for s in sim.shares) / len(labels)
    assert sim.describe()["client_majority_rate"] == pytest.approx(expected)


def test_summary_line_states_personal_accuracy_and_its_yardstick(tiny_cfg):
    from fedlora.experiment import run_experiment

    line = run_experiment(tiny_cfg(method={"name": "fedsa-lora"}, federation={"rounds": 1}), progress=False)["line"]
    assert "personal accuracy" in line and "clients' own majority labels" in line


def test_methods_without_local_roles_report_no_personal_figure(tiny_cfg):
    sim = Simulation(tiny_cfg(federation={"rounds": 1}))
    assert "personal_accuracy" not in sim.evaluate()
    assert "client_majority_rate" not in sim.describe()


def test_fedsa_variants_refuse_the_wrong_adapter(tiny_cfg):
    with pytest.raises(ConfigError, match="adapter.rslora=true"):
        build_method("fedsa-rslora", MethodSetup({}, True, 2, 0, adapter=tiny_cfg().adapter))
    assert build_method("fedsa-rslora", MethodSetup({}, True, 2, 0, adapter=tiny_cfg(adapter={"rslora": True}).adapter))
    with pytest.raises(ConfigError, match="adapter.type=vera"):
        build_method("fedsa-vera", MethodSetup({}, True, 2, 0, adapter=tiny_cfg().adapter))


@pytest.mark.parametrize("name", ["fedex-lora", "flora"])
def test_exact_baselines_carry_w0_in_the_global_state(tiny_cfg, name):
    sim = Simulation(tiny_cfg(method={"name": name}, federation={"rounds": 1}))
    bases = sim.rt.adapted.base_weight_names()
    assert len(bases) == len(sim.rt.adapted.names(roles=("A",))) and set(bases) <= set(sim.global_state)
    w0 = {k: sim.global_state[k].clone() for k in bases}
    sim.run()
    assert all(not torch.equal(w0[k], sim.global_state[k]) for k in bases)
    assert all(torch.equal(sim.rt.adapted.named[k], sim.global_state[k]) for k in bases)  # evaluated with new W0
    if name == "flora":
        assert not any(sim.global_state[k].any() for k in sim.rt.adapted.names(roles=("B",)))
