"""The signal diagnostic (eval.signal_diagnostics): per group, the signal norm against the noise
norm, computed on the client inside the DP step, collected through RoundOutcome.info."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.federation.signal import SignalMeter, round_signal, signal_groups
from fedlora.federation.simulation import Simulation

GROUPS = ("A", "B", "head")


def _cfg(tiny_cfg, mode: str, **extra):
    sections = {"eval": {"signal_diagnostics": mode}, "federation": {"rounds": 2, "local_steps": 3},
                "privacy": {"accountant": "rdp", "noise_multiplier": 1.0, "epsilon": 50.0, "reproducible_noise": True}}
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    return tiny_cfg(**sections)


def test_meter_private_estimate_removes_the_expected_noise_energy():
    groups = {"a": ("A", "A.0"), "h": ("head",)}
    meter = SignalMeter("private", groups)
    g = {"a": torch.full((4, 25), 0.1), "h": torch.full((2, 2), 1.0)}
    meter.step(g, 0.02, None, 64.0)
    out = meter.result()
    assert out["noise/A"] == pytest.approx(0.02 * 10) and out["noise/head"] == pytest.approx(0.02 * 2)
    assert out["signal/A"] == pytest.approx(math.sqrt(100 * 0.01 - 100 * 0.02**2))
    assert out["signal/A.0"] == out["signal/A"]
    exact = SignalMeter("exact", groups)
    exact.step(g, 0.02, {"a": 64.0**2 * 0.25, "h": 0.0}, 64.0)
    assert exact.result()["signal/A"] == pytest.approx(0.5)
    assert round_signal([{"signal/A": 1.0}, None, {"signal/A": 3.0, "noise/A": 2.0}]) == {"noise/A": 2.0, "signal/A": 2.0}


def test_off_by_default_and_no_keys(tiny_cfg):
    sim = Simulation(tiny_cfg(federation={"rounds": 1}))
    assert sim.cfg.eval.signal_diagnostics == "off"
    rec = sim.run().metrics[0]
    assert not any(k.startswith(("signal/", "noise/")) for k in rec)


def test_exact_signal_per_group_and_layer_marks_the_run_not_covered(tiny_cfg):
    sim = Simulation(_cfg(tiny_cfg, "exact"))
    layers = sorted({f.layer for f in sim.rt.adapted.factors if f.role in ("A", "B")})
    rec = sim.run().metrics[-1]
    for g in (*GROUPS, *(f"{r}.{lay}" for r in "AB" for lay in layers)):
        assert rec[f"signal/{g}"] >= 0 and rec[f"noise/{g}"] > 0, g
    spec = sim.specs[0]
    d_head = sum(p.numel() for f, p in ((f, sim.rt.adapted.params[f.name]) for f in sim.rt.adapted.factors) if f.role == "head")
    noise_std = spec.dp.noise_multiplier * spec.dp.clip_norm / spec.dp.expected_batch_size
    assert rec["noise/head"] == pytest.approx(math.sqrt(d_head) * noise_std, rel=0.3)  # clients' B differ a little
    assert rec["signal/head"] <= spec.dp.clip_norm * 1.5  # ||clipped sum|| / B_exp <= C * (batch / B_exp)
    assert "NOT covered by the DP guarantee: eval.signal_diagnostics=exact" in rec["guarantees"]


def test_private_signal_stays_covered(tiny_cfg):
    sim = Simulation(_cfg(tiny_cfg, "private"))
    rec = sim.run().metrics[-1]
    assert all(f"signal/{g}" in rec for g in GROUPS)
    assert "NOT covered" not in rec["guarantees"]


def test_batched_engine_collects_the_same_signal(tiny_cfg):
    fed = {"num_clients": 4, "rounds": 1}
    seq = Simulation(_cfg(tiny_cfg, "exact", task={"cache_prefix": False}, federation=fed)).run().metrics[0]
    bat_sim = Simulation(_cfg(tiny_cfg, "exact", task={"cache_prefix": False}, federation={**fed, "batched_clients": 4}))
    assert bat_sim.batched_k == 4
    bat = bat_sim.run().metrics[0]
    for k in [k for k in seq if k.startswith(("signal/", "noise/"))]:
        assert bat[k] == pytest.approx(seq[k], rel=1e-4), k


def test_groups_of_the_factor_table(tiny_cfg):
    sim = Simulation(tiny_cfg(federation={"rounds": 1}))
    groups = signal_groups(sim.rt.adapted.factors)
    roles = {f.name: f.role for f in sim.rt.adapted.factors}
    assert all(groups[k][0] == roles[k] for k in groups)
