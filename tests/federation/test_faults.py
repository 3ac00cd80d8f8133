"""Client faults: dropped clients, retries, a clear stop, and an exact ledger."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.federation.faults import crash_step, finite, injected_faults
from fedlora.federation.simulation import Simulation


def _recount(sim: Simulation, metrics: list[dict]) -> list[int]:
    """Each client's DP steps from the records alone: T per success, the recorded steps per failure."""
    steps = [0] * len(sim.clients)
    t = sim.cfg.federation.local_steps
    for m in metrics:
        for c in m["clients"]:
            steps[c] += t
        for f in m["client_failures"]:
            steps[f["client"]] += f["steps"]
    return steps


@pytest.mark.parametrize("kind", ["exception", "timeout", "nonfinite"])
def test_thirty_percent_failures_complete_with_an_exact_ledger(tiny_cfg, kind):
    cfg = tiny_cfg(federation={"num_clients": 10, "min_client_size": 10, "rounds": 3, "local_steps": 2,
                               "faults": {"fraction": 0.3, "kind": kind}, "min_clients": 5},
                   train={"batch_size": 8}, eval={"diagnostics": False})
    sim = Simulation(cfg)
    out = sim.run()
    assert out.rounds_done == 3 and out.stop_reason is None
    for m in out.metrics:
        assert len(m["failed_clients"]) == 3 and len(m["clients"]) == 7
        assert not set(m["failed_clients"]) & set(m["clients"])
        assert all(kind.replace("nonfinite", "non-finite") in f["reason"] for f in m["client_failures"])
        assert math.isfinite(m["accuracy"])
    assert all(bool(torch.isfinite(v).all()) for v in out.global_state.values())
    ledger = [c.dp_steps for c in sim.clients]
    assert ledger == _recount(sim, out.metrics) == [row["steps"] for row in out.metrics[-1]["privacy"]]
    if kind == "exception":  # an injected crash counts exactly the steps that ran before it
        expected = [0] * 10
        for rnd, m in enumerate(out.metrics, start=1):
            for c in m["clients"]:
                expected[c] += 2
            for c in injected_faults(sim.cfg, rnd, 0, list(range(10))):
                expected[c] += crash_step(cfg.train.seed, c, rnd, 0, 2)
        assert ledger == expected
    else:  # a timed-out or non-finite client ran (and is charged for) all its steps
        assert ledger == [2 * 3] * 10


def test_too_few_clients_retries_then_stops_with_a_reason(tiny_cfg):
    cfg = tiny_cfg(federation={"rounds": 2, "min_clients": 3, "retries": 1, "faults": {"fraction": 0.9, "kind": "timeout"}},
                   eval={"diagnostics": False})
    sim = Simulation(cfg)
    out = sim.run()
    assert out.rounds_done == 0 and out.metrics == []
    assert "stopped in round 1" in out.stop_reason and "2 attempt(s)" in out.stop_reason
    assert "federation.min_clients=3" in out.stop_reason and "timeout" in out.stop_reason
    assert [c.dp_steps for c in sim.clients] == [2 * 2] * 3  # both attempts ran and are charged


def test_retry_recovers_a_round(tiny_cfg):
    cfg = tiny_cfg(federation={"rounds": 2, "min_clients": 3, "retries": 3, "faults": {"fraction": 0.34}},
                   eval={"diagnostics": False})
    out = Simulation(cfg).run()
    assert out.rounds_done == 2
    assert all(m["attempts"] >= 2 and m["failed_clients"] == [] and len(m["clients"]) == 3 for m in out.metrics)


def test_non_finite_values_are_detected():
    assert finite({"a": torch.ones(2), "n": torch.tensor([1, 2])})
    assert not finite({"a": torch.tensor([1.0, math.inf])})
    assert not finite({"a": torch.tensor([math.nan])})


def test_no_faults_configured_means_no_failures(tiny_cfg):
    out = Simulation(tiny_cfg(federation={"rounds": 1})).run()
    assert out.metrics[0]["failed_clients"] == [] and out.metrics[0]["attempts"] == 1


def test_a_retry_draws_new_batches_so_a_deterministic_failure_need_not_recur(tiny_cfg):
    sim = Simulation(tiny_cfg(eval={"diagnostics": False}))
    spec = sim.specs[0]
    from fedlora.federation.client import poisson_batch
    from fedlora.seeds import generator

    first = poisson_batch(len(spec.indices), spec.sample_rate, generator(*spec.stream(0, 1, 0)))
    retry = poisson_batch(len(spec.indices), spec.sample_rate, generator(*spec.stream(0, 1, 1)))
    assert spec.stream(0, 1, 0) == (0, "client", 0, 1)  # the first attempt keeps the round's stream
    assert not (len(first) == len(retry) and (first == retry).all())


def test_client_timeout_s_was_removed_with_a_reason(tiny_cfg):
    from fedlora.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="client_timeout_s was removed"):
        tiny_cfg(federation={"client_timeout_s": 5.0})
    assert tiny_cfg(federation={"client_timeout_s": None}).federation.num_clients == 3  # older config.yaml files load
