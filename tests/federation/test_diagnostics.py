"""Aggregation error and factor-choice diagnostics (issue 9, items 1 and 4)."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.federation.diagnostics import factor_error, lowrank_fro, module_error
from fedlora.federation.simulation import Simulation


def test_lowrank_norm_matches_dense() -> None:
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    assert lowrank_fro(left, right) == pytest.approx(float(torch.linalg.matrix_norm(left.double() @ right.double())), rel=1e-12)


def test_module_error_fedavg_vs_exact() -> None:
    g = torch.Generator().manual_seed(1)
    bs = [torch.randn(12, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    as_ = [torch.randn(2, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    mean = sum(wi * b @ a for wi, b, a in zip(w, bs, as_, strict=True))
    b_bar, a_bar = sum(wi * b for wi, b in zip(w, bs, strict=True)), sum(wi * a for wi, a in zip(w, as_, strict=True))
    dense = float(torch.linalg.matrix_norm(mean - b_bar @ a_bar) / torch.linalg.matrix_norm(mean))
    assert module_error(bs, as_, w, b_bar, a_bar, None) == pytest.approx(dense, rel=1e-10)
    assert dense > 0.1
    # FedEx: the residual folded into the base weight makes it exact (base_change = residual)
    assert module_error(bs, as_, w, b_bar, a_bar, mean - b_bar @ a_bar) < 1e-14
    # a shared A (FFA): the mean of B times A is exact, found without forming the product
    assert module_error(bs, [as_[0]] * 3, w, b_bar, as_[0], None) < 1e-14
    assert factor_error(as_, w, a_bar) < 1e-15
    assert math.isnan(module_error([torch.zeros(4, 2)], [torch.ones(2, 3)], [1.0], torch.ones(4, 2), torch.ones(2, 3), None))


EXACT = ["fedex-lora", "flora", "fedsvd", "ffa-lora", "rolora", "as-lora", "fedsa-lora"]


@pytest.mark.parametrize("method", [*EXACT, "dp-lora", "la-lora"])
def test_aggregation_error_per_method(tiny_cfg, method: str) -> None:
    rounds = 2 if method == "rolora" else 1  # round 2 trains RoLoRA's A (B from the download)
    sim = Simulation(tiny_cfg(method={"name": method}, federation={"rounds": rounds}))
    records = sim.run().metrics
    for rec in records:
        errs = rec["aggregation_error_modules"]
        assert len(errs) == 4 and all(isinstance(v, float) for v in errs.values())  # 2 layers x query, value
        if method in EXACT:
            assert rec["aggregation_error"] < 1e-10, (method, errs)
        else:
            assert rec["aggregation_error"] > 1e-6, (method, errs)


def test_diagnostics_opt_out(tiny_cfg) -> None:
    rec = Simulation(tiny_cfg(federation={"rounds": 1}, eval={"diagnostics": False})).run().metrics[0]
    assert "aggregation_error" not in rec and rec["plan_schedule"] == "JJ"


@pytest.mark.parametrize(("method", "modes", "schedule"), [
    ("dp-lora", ["JJ", "JJ"], ["JJ", "JJ"]),
    ("ffa-lora", ["BB", "BB"], ["BB", "BB"]),
    ("rolora", ["BB", "AA"], ["BB", "AA"]),
    ("la-lora", ["JJ", "JJ"], ["BABA", "BABA"]),
])
def test_factor_choices_recorded(tiny_cfg, method, modes, schedule) -> None:
    steps = len(schedule[0])
    cfg = tiny_cfg(method={"name": method}, federation={"local_steps": steps}, eval={"diagnostics": False})
    records = Simulation(cfg).run().metrics
    assert [r["plan_modes"] for r in records] == modes
    assert [r["plan_schedule"] for r in records] == schedule


def test_as_lora_modes_and_schedule_same_shape(tiny_cfg) -> None:
    cfg = tiny_cfg(method={"name": "as-lora"}, eval={"diagnostics": False})
    for rec in Simulation(cfg).run().metrics:
        assert len(rec["plan_modes"]) == 2 and set(rec["plan_modes"]) <= {"A", "B"}
        letters = set(rec["plan_modes"])
        assert rec["plan_schedule"] == (letters.pop() if len(letters) == 1 else "M") * 2
        assert set(rec["factor_scores"]) <= {f"{lay}/{f}" for lay in (0, 1) for f in "AB"}
        assert rec["factor_scores"] and all(v >= 0 for v in rec["factor_scores"].values())
