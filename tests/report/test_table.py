"""The compare tables from run directories: mean ± std over seeds, aggregation error, partial grids."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedlora.report.compare import Cell, Grid
from fedlora.report.table import collect, headline_key, mean_curves, write_tables


def _finished(root: Path, cell: Cell, acc: float, agg: list[float], majority: float = 0.55) -> None:
    d = root / cell.name
    d.mkdir(parents=True)
    records = [{"round": r + 1, "accuracy": acc - 0.01 * (len(agg) - r - 1), "epsilon": 0.5, "aggregation_error": a}
               for r, a in enumerate(agg)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in records))
    (d / "summary.json").write_text(json.dumps({"final": {"accuracy": acc, "epsilon": 0.9}, "rounds": len(agg),
                                                "majority_rate": majority, "seconds": {"total": 10.0}}))


def test_rows_over_seeds_and_a_missing_cell(tmp_path: Path) -> None:
    cells = [Cell("dp-lora", 1.0, s) for s in (0, 1)] + [Cell("ffa-lora", 1.0, s) for s in (0, 1)]
    grid = Grid(tmp_path, {"methods": ["dp-lora", "ffa-lora"], "seeds": 2}, [(c, None) for c in cells])
    _finished(tmp_path, cells[0], 0.60, [0.2, 0.4])
    _finished(tmp_path, cells[1], 0.70, [0.1, 0.1])
    (tmp_path / cells[2].name).mkdir()  # started, never finished: not counted
    rows, _, baselines = collect(grid)
    dp, ffa = rows
    assert dp["seeds"] == 2 and dp["accuracy_mean"] == pytest.approx(0.65)
    assert dp["accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)  # ddof 1
    assert dp["aggregation_error"] == pytest.approx((0.3 + 0.1) / 2)
    assert ffa["seeds"] == 0 and math.isnan(ffa["accuracy_mean"])
    assert baselines == {"majority": {0: 0.55, 1: 0.55}, "client_majority": {}}
    out = write_tables(grid)
    md = (tmp_path / "results.md").read_text()
    assert "| dp-lora | 1 | 0.6500 ± 0.0707 | - | 0.90 | 2.00e-01 | 2 | 10 | 2/2 |" in md
    assert "| ffa-lora | 1 | - |" in md and "0/2" in md and "| 0.7000 |" not in md and "0.5500" in md and out["markdown"] == md
    assert [r["method"] for r in csv.DictReader((tmp_path / "results.csv").open())] == ["dp-lora", "ffa-lora"]
    for name in ("accuracy_per_round.png", "accuracy_vs_epsilon.png", "figures/eps1/accuracy.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_baselines_per_seed(tmp_path: Path) -> None:
    """Each seed draws its own test split: the table lists every seed's majority rate and the
    personal-accuracy yardstick that FedSA runs log in setup.json."""
    cells = [Cell("fedsa-lora", 3.0, s) for s in (0, 1)]
    grid = Grid(tmp_path, {"methods": ["fedsa-lora"], "seeds": 2}, [(c, None) for c in cells])
    for cell, majority, own in ((cells[0], 0.596, 0.78), (cells[1], 0.602, 0.79)):
        _finished(tmp_path, cell, 0.6, [0.0], majority=majority)
        (tmp_path / cell.name / "setup.json").write_text(json.dumps({"client_majority_rate": own}))
    _, _, baselines = collect(grid)
    assert baselines == {"majority": {0: 0.596, 1: 0.602}, "client_majority": {0: 0.78, 1: 0.79}}
    md = write_tables(grid)["markdown"]
    assert "Majority-class rate of the test set: 0.5960 (seed 0), 0.6020 (seed 1); mean 0.5990." in md
    assert "majority label (the yardstick for personal accuracy): 0.7800 (seed 0), 0.7900 (seed 1); mean 0.7850." in md


def test_personal_methods_are_drawn_with_their_personal_accuracy(tmp_path: Path) -> None:
    """FedSA's global model carries the initial head: its curve is the personal accuracy."""
    plain, personal = Cell("dp-lora", 3.0, 0), Cell("fedsa-lora", 3.0, 0)
    grid = Grid(tmp_path, {"methods": ["dp-lora", "fedsa-lora"], "seeds": 1}, [(plain, None), (personal, None)])
    _finished(tmp_path, plain, 0.6, [0.1, 0.1])
    _finished(tmp_path, personal, 0.5, [0.0, 0.0])
    records = [{"round": r, "accuracy": 0.5, "personal_accuracy": 0.7 + 0.1 * r} for r in (1, 2)]
    (tmp_path / personal.name / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in records))
    assert headline_key([tmp_path / plain.name]) == "accuracy"
    assert headline_key([tmp_path / personal.name]) == "personal_accuracy"
    assert mean_curves([tmp_path / personal.name], "personal_accuracy") == ([1, 2], [pytest.approx(0.8), pytest.approx(0.9)])
    write_tables(grid)
    assert (tmp_path / "accuracy_vs_epsilon.png").stat().st_size > 1000


def test_rows_of_runs_with_reproducible_noise_are_marked_not_private(tmp_path: Path) -> None:
    cells = [Cell("dp-lora", 3.0, 0), Cell("ffa-lora", 3.0, 0)]
    grid = Grid(tmp_path, {"methods": ["dp-lora", "ffa-lora"], "seeds": 1}, [(c, None) for c in cells])
    for cell in cells:
        _finished(tmp_path, cell, 0.6, [0.1])
    seeded = tmp_path / cells[1].name / "summary.json"
    seeded.write_text(json.dumps({**json.loads(seeded.read_text()), "reproducible_noise": True}))
    md = write_tables(grid)["markdown"]
    assert "| ffa-lora (†) | 3 |" in md and "| dp-lora | 3 |" in md
    assert "(†) reproducible noise: NOT private against anyone who holds the config" in md
