"""The compare tables from run directories: mean ± std over seeds, aggregation error, partial grids."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
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


def test_paired_interval_is_computed_from_per_seed_differences(tmp_path: Path) -> None:
    """Seeds shift every method alike (same partition, test split, sampling): the per-seed
    differences decide, not the methods' own spread over seeds."""
    from fedlora.report.table import paired_interval

    accs = {"dp-lora": [0.50, 0.70, 0.60], "ffa-lora": [0.52, 0.72, 0.62],  # +2 points in every seed
            "la-lora": [0.53, 0.74, 0.60], "head-only": [0.45, 0.66, 0.57]}
    methods = list(accs)
    cells = [Cell(m, 3.0, s) for m in methods for s in range(3)]
    grid = Grid(tmp_path, {"methods": methods, "seeds": 3}, [(c, None) for c in cells])
    for c in cells:
        _finished(tmp_path, c, accs[c.method][c.seed], [0.0])
    summary = json.loads((tmp_path / cells[3].name / "summary.json").read_text())
    (tmp_path / cells[3].name / "summary.json").write_text(json.dumps({**summary, "variant": "ffa-lora (x on)"}))
    rows = {r["method"]: r for r in collect(grid, "dp-lora")[0]}
    assert rows["dp-lora"]["verdict"] == "baseline"
    ffa = rows["ffa-lora"]
    assert ffa["paired_seeds"] == 3 and ffa["paired_diff_mean"] == pytest.approx(0.02)
    assert ffa["paired_ci_low"] == pytest.approx(0.02) and ffa["paired_ci_high"] == pytest.approx(0.02)
    assert ffa["verdict"] == "better" and ffa["variant"] == "ffa-lora (x on)"
    assert ffa["accuracy_std"] > 0.09  # unpaired, the spread over seeds would hide the gap
    diffs = [0.03, 0.04, 0.0]  # la-lora - dp-lora per seed
    mean, low, high = paired_interval(diffs)
    half = 4.302652729911275 * float(np.std(diffs, ddof=1)) / math.sqrt(3)  # t(0.975, 2)
    assert (mean, low, high) == (pytest.approx(0.07 / 3), pytest.approx(0.07 / 3 - half), pytest.approx(0.07 / 3 + half))
    la = rows["la-lora"]
    assert (la["paired_ci_low"], la["paired_ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert la["verdict"] == "no difference" and rows["head-only"]["verdict"] == "worse"
    out = write_tables(grid, "dp-lora")
    md = out["markdown"]
    assert "vs dp-lora: points (95% CI) | verdict |" in md
    assert "| ffa-lora (x on) | 3 |" in md and "+2.0 [+2.0, +2.0] (3 seeds) | better |" in md
    assert "not the DP noise" in md
    assert (tmp_path / "paired_differences.png").stat().st_size > 1000
    row = next(r for r in csv.DictReader((tmp_path / "results.csv").open()) if r["method"] == "head-only")
    assert row["verdict"] == "worse" and float(row["paired_diff_mean"]) == pytest.approx(-0.04)


def test_paired_columns_need_a_baseline_in_the_grid(tmp_path: Path) -> None:
    from fedlora.errors import ConfigError

    cells = [Cell("ffa-lora", 1.0, 0), Cell("rolora", 1.0, 0)]
    grid = Grid(tmp_path, {"methods": ["ffa-lora", "rolora"], "seeds": 1}, [(c, None) for c in cells])
    for c in cells:
        _finished(tmp_path, c, 0.6, [0.0])
    with pytest.raises(ConfigError, match="--baseline 'dp-lora' is not among"):
        write_tables(grid, "dp-lora")
    md = write_tables(grid)["markdown"]  # no dp-lora in the grid: no paired columns
    assert "verdict" not in md
    rows = {r["method"]: r for r in collect(grid, "ffa-lora")[0]}
    assert rows["rolora"]["paired_seeds"] == 1 and rows["rolora"]["verdict"].startswith("n/a")
