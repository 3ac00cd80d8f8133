"""`fedlora plot`: figures from metrics.jsonl files, absent keys skipped, factor-choice heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.report.plots import (
    choice_matrix,
    heatmap,
    layer_ticks,
    load_runs,
    plot_runs,
    run_label,
    single_points,
)

runner = CliRunner()


def _run(root: Path, name: str, method: str, epsilon: float, records: list[dict]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method}, "privacy": {"epsilon": epsilon}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def _png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _records(rounds: int, **extra) -> list[dict]:
    out = []
    for r in range(1, rounds + 1):
        rec = {"round": r, "accuracy": 0.5 + 0.02 * r, "epsilon": 0.3 * r}
        rec.update({k: (v(r) if callable(v) else v) for k, v in extra.items()})
        out.append(rec)
    return out


def test_all_figures_from_written_metrics(tmp_path: Path) -> None:
    as_lora = _run(tmp_path, "as", "as-lora", 1.0, _records(
        6, aggregation_error=lambda r: 0.1 / r, plan_modes=lambda r: "AB" if r % 2 else "BB",
        sharpness=lambda r: 5.0 + r if r % 3 == 0 else None))
    rolora = _run(tmp_path, "ro", "rolora", 3.0, _records(6, plan_factor=lambda r: "B" if r % 2 else "A",
                                                           aggregation_error=0.0))
    fedsa = _run(tmp_path, "sa", "fedsa-lora", 3.0, _records(6, personal_accuracy=lambda r: 0.6 + 0.01 * r))
    made = plot_runs([as_lora, rolora, fedsa], tmp_path / "fig")
    names = {p.name for p in made}
    assert names == {"accuracy.png", "epsilon.png", "aggregation_error.png", "sharpness.png", "factor_choices.png"}
    for p in made:
        _png(p)
    assert run_label(as_lora) == "as-lora eps=1"


def test_absent_keys_are_skipped(tmp_path: Path) -> None:
    plain = _run(tmp_path, "dp", "dp-lora", 6.0, _records(3))
    made = {p.name for p in plot_runs([plain], tmp_path / "fig")}
    assert made == {"accuracy.png", "epsilon.png"}


def test_choice_matrix_layers_by_rounds() -> None:
    rounds, grid = choice_matrix([{"round": 1, "plan_modes": "AB"}, {"round": 2, "plan_modes": "BJ"},
                                  {"round": 3}])
    assert rounds == [1, 2] and grid == [[0, 1], [1, 2]]  # layer x round; A=0 B=1 both=2
    rounds, grid = choice_matrix([{"round": 1, "plan_factor": "B"}, {"round": 2, "plan_factor": "A"}])
    assert grid == [[1, 0]]
    assert choice_matrix([{"round": 1, "accuracy": 0.5}]) is None


def test_plot_cli(tmp_path: Path) -> None:
    run = _run(tmp_path, "r", "ffa-lora", 3.0, _records(2))
    result = runner.invoke(app, ["plot", str(run), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "accuracy.png").is_file()
    missing = runner.invoke(app, ["plot", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no metrics.jsonl" in missing.output


def test_heatmap_rows_are_the_adapted_layers(tmp_path: Path) -> None:
    # plan_modes has one letter per adapted layer: with adapter.layers [1, 3] its rows are layers 1 and 3
    run = _run(tmp_path, "as", "as-lora", 3.0, _records(2, plan_modes=lambda r: "AB"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "adapter": {"layers": [3, 1]}}))
    assert layer_ticks(run, 2) == ["1", "3"]
    assert layer_ticks(run, 3) == ["0", "1", "2"]  # not the logged shape: plain row numbers
    assert layer_ticks(tmp_path / "missing", 1) == ["0"]
    _png(heatmap(load_runs([run]), tmp_path / "h.png", [run]))


def test_single_measurement_per_run_is_drawn_as_bars(tmp_path: Path) -> None:
    once = [_run(tmp_path, m, m, 3.0, _records(7, sharpness=lambda r, v=v: v if r == 7 else None))
            for m, v in (("flora", 7.75), ("dp-lora", 8.66))]
    runs = load_runs(once)
    assert single_points(runs, "sharpness") == [("flora eps=3", 7, 7.75), ("dp-lora eps=3", 7, 8.66)]
    assert single_points(runs, "accuracy") is None  # logged every round: lines
    made = {p.name: p for p in plot_runs(once, tmp_path / "fig")}
    _png(made["sharpness.png"])
    several = _run(tmp_path, "many", "as-lora", 3.0, _records(4, sharpness=lambda r: 5.0 + r))
    assert single_points(load_runs([*once, several]), "sharpness") is None  # one run with a curve: lines for all


def test_signal_against_noise_is_drawn_per_group(tmp_path: Path) -> None:
    sig = {f"signal/{g}": (lambda r, g=g: 0.1 * r if g != "head" else 2.0) for g in ("A", "B", "head")}
    noi = {f"noise/{g}": 0.5 for g in ("A", "B", "head")}
    d = _run(tmp_path, "sig", "dp-lora", 3.0, _records(3, **sig, **noi, **{"signal/A.0": 0.1}))
    made = {p.name: p for p in plot_runs([d], tmp_path / "fig")}
    assert "signal_noise.png" in made
    _png(made["signal_noise.png"])
