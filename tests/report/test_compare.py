"""`fedlora compare`: the grid, its tables and figures, resuming, runtime reuse, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.errors import FedloraError
from fedlora.experiment import run_experiment
from fedlora.federation.simulation import Simulation
from fedlora.report.compare import METHOD_DEFAULTS, plan_grid, run_compare
from fedlora.report.runtime_pool import RuntimePool
from tests.helpers import tiny_tree

runner = CliRunner()


@pytest.fixture
def cfg_file(tiny_model_dir, tiny_csv, tmp_path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_tree(tiny_model_dir, tiny_csv, tmp_path / "runs")))
    return path


def _png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compare_grid_tables_figures_and_resume(cfg_file: Path, tmp_path: Path) -> None:
    args = ["compare", str(cfg_file), "--methods", "dp-lora,fedsa-lora", "--epsilons", "2", "--seeds", "2",
            "--out", str(tmp_path / "cmp"), "--name", "g", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    root = tmp_path / "cmp" / "g"
    runs = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "figures")
    assert len(runs) == 2 * 2 * 2  # methods x (epsilon + no-DP reference) x seeds
    for r in runs:
        assert {"config.yaml", "metrics.jsonl", "summary.json"} <= {p.name for p in (root / r).iterdir()}
    grid = yaml.safe_load((root / "grid.yaml").read_text())
    assert grid["methods"] == ["dp-lora", "fedsa-lora"] and grid["epsilons"] == [2.0] and grid["seeds"] == 2
    assert grid["dp_reference_runs"] is True  # the no-DP run per method was made (no --no-dp-reference)
    assert grid["base"]["federation"]["rounds"] == 2
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert {(r["method"], r["epsilon"]) for r in rows} == {(m, e) for m in ("dp-lora", "fedsa-lora")
                                                           for e in ("2", "no DP")}
    assert all(r["seeds"] == "2" for r in rows)
    fedsa = next(r for r in rows if r["method"] == "fedsa-lora" and r["epsilon"] == "2")
    assert float(fedsa["personal_accuracy_mean"]) > 0 and float(fedsa["epsilon_spent"]) <= 2.0 + 1e-6
    dp = next(r for r in rows if r["method"] == "dp-lora" and r["epsilon"] == "2")
    accs = [json.loads((root / f"dp-lora-eps2-seed{s}" / "summary.json").read_text())["final"]["accuracy"] for s in (0, 1)]
    assert float(dp["accuracy_mean"]) == pytest.approx(sum(accs) / 2)
    md = (root / "results.md").read_text()
    # the tiny config draws reproducible noise: rows are marked (†); dp-lora is the paired baseline
    assert "| dp-lora (†) | 2 |" in md and "NOT private against anyone who holds the config" in md and "±" in md and md.splitlines()[0] in result.output
    assert "vs dp-lora: points (95% CI) | verdict |" in md and "| baseline | baseline |" in md
    assert "the DP noise too (reproducible noise)" in md
    fedsa_row = next(line for line in md.splitlines() if line.startswith("| fedsa-lora (†) | 2 |"))
    assert "(2 seeds) |" in fedsa_row  # paired over both seeds
    _png(root / "paired_differences.png")
    _png(root / "accuracy_per_round.png")
    _png(root / "accuracy_vs_epsilon.png")
    _png(root / "figures" / "eps2" / "accuracy.png")  # `fedlora plot` over the seed-0 runs

    # Resume: a finished cell is kept, a half-finished one (no summary.json) is redone.
    keep = root / "dp-lora-eps2-seed0" / "summary.json"
    stamp = keep.stat().st_mtime_ns
    half = root / "fedsa-lora-nodp-seed1"
    (half / "summary.json").unlink()
    (half / "metrics.jsonl").write_text("garbage\n")
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert keep.stat().st_mtime_ns == stamp
    assert (half / "summary.json").is_file()
    assert len((half / "metrics.jsonl").read_text().splitlines()) == 2  # redone from scratch
    # A different grid under the same name is refused.
    other = runner.invoke(app, [*args[:-5], "--seeds", "1", "--out", str(tmp_path / "cmp"), "--name", "g", "-q"])
    assert other.exit_code == 2 and "different grid" in other.output


def test_reused_runtime_is_bitwise_a_fresh_run(tiny_cfg) -> None:
    pool = RuntimePool()
    first = tiny_cfg(method={"name": "rolora"}, output={"name": "a"})
    second = tiny_cfg(method={"name": "dp-lora"}, output={"name": "b"})
    run_experiment(first, progress=False, runtime=pool.get(first))
    reused = pool.get(second)
    assert pool.built == 1
    sim_reused = Simulation(second, runtime=reused)
    res_reused = sim_reused.run()
    res_fresh = Simulation(second).run()
    assert res_reused.global_state.keys() == res_fresh.global_state.keys()
    for k in res_fresh.global_state:
        assert torch.equal(res_reused.global_state[k], res_fresh.global_state[k]), k
    strip = [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in res_fresh.metrics]
    assert [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in res_reused.metrics] == strip
    # Another seed (or adapter) is another runtime.
    pool.get(tiny_cfg(train={"seed": 1}))
    assert pool.built == 2


def test_task_shared_across_adapters_gives_a_fresh_result(tiny_cfg) -> None:
    pool = RuntimePool()
    lora = tiny_cfg(federation={"rounds": 1})
    vera = tiny_cfg(adapter={"type": "vera"}, method={"name": "fedsa-vera"}, federation={"rounds": 1})
    first = pool.get(lora)
    shared = pool.get(vera)
    assert pool.built == 2 and shared.task is first.task  # data loaded once
    reused = Simulation(vera, runtime=shared).run().global_state
    fresh = Simulation(vera).run().global_state
    assert all(torch.equal(reused[k], fresh[k]) for k in fresh)


def test_method_defaults_set_adapter_needs(cfg_file: Path, tmp_path: Path) -> None:
    grid = plan_grid(cfg_file, methods="fedsa-vera,fedsa-rslora,dp-lora", epsilons="3", seeds=1, out=str(tmp_path),
                     name="x", no_dp_reference=True)
    assert grid.spec["dp_reference_runs"] is False and all(cell.epsilon == 3.0 for cell, _ in grid.cells)
    adapters = {cell.method: cfg.adapter for cell, cfg in grid.cells}
    assert adapters["fedsa-vera"].type == "vera" and adapters["fedsa-rslora"].rslora
    assert adapters["dp-lora"].type == "lora" and not adapters["dp-lora"].rslora
    assert set(METHOD_DEFAULTS) <= {"fedsa-vera", "fedsa-rslora"}
    assert not (tmp_path / "x").exists()  # planning writes nothing


def test_first_seed_shifts_the_seeds(cfg_file: Path, tmp_path: Path) -> None:
    grid = plan_grid(cfg_file, methods="dp-lora", epsilons="3", seeds=2, out=str(tmp_path), name="x",
                     no_dp_reference=True, first_seed=5)
    assert [(cell.seed, cfg.train.seed) for cell, cfg in grid.cells] == [(5, 5), (6, 6)]
    assert grid.spec["first_seed"] == 5
    assert "first_seed" not in plan_grid(cfg_file, methods="dp-lora", epsilons="3", seeds=1, out=str(tmp_path)).spec


def test_a_grid_written_before_a_new_config_field_resumes(cfg_file: Path, tmp_path: Path) -> None:
    from fedlora.report.compare import prepare_dir

    grid = plan_grid(cfg_file, methods="dp-lora", epsilons="3", seeds=1, out=str(tmp_path), name="old", no_dp_reference=True)
    prepare_dir(grid)
    path = grid.root / "grid.yaml"
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    del spec["base"]["train"]["lr_schedule"]  # as an older fedlora wrote it
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    prepare_dir(grid)  # same grid
    spec["base"]["train"]["lr"] = 0.123  # a field set differently is another grid
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    with pytest.raises(FedloraError, match="different grid"):
        prepare_dir(grid)


def test_composed_methods_are_grid_rows(cfg_file: Path, tmp_path: Path) -> None:
    """``NAME+KIND=SEAM`` in --methods sets the seams, and the run names the method the same way."""
    from fedlora.federation.simulation import build_method_for

    grid = plan_grid(cfg_file, methods="la-lora+aggregate=fedex,dp-lora", epsilons="3", seeds=1, out=str(tmp_path),
                     name="x", no_dp_reference=True)
    cfgs = {cell.method: cfg for cell, cfg in grid.cells}
    assert (cfgs["la-lora+aggregate=fedex"].method.name, cfgs["la-lora+aggregate=fedex"].method.aggregate) == ("la-lora", "fedex")
    assert cfgs["dp-lora"].method.aggregate is None
    assert build_method_for(cfgs["la-lora+aggregate=fedex"]).name == "la-lora+aggregate=fedex"


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--methods", "dp-lora,fedsa-lorax"], "unknown method 'fedsa-lorax'"),
    (["--methods", "la-lora+aggregate"], "must be +KIND=SEAM"),
    (["--methods", "la-lora+scheme=fedex"], "must be +KIND=SEAM"),
    (["--methods", "la-lora+aggregate=fedexx"], "unknown method.aggregate 'fedexx'"),
    (["--methods", "ffa-lora+schedule=alternate-steps"], "needs"),
    (["--epsilons", "1,0"], "--epsilons"),
    (["--epsilons", "-3"], "--epsilons"),
    (["--epsilons", "a"], "--epsilons"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--first-seed", "-1"], "--first-seed must be >= 0"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cfg_file: Path, tmp_path: Path, flags, fragment) -> None:
    result = runner.invoke(app, ["compare", str(cfg_file), *flags, "--out", str(tmp_path / "cmp"), "--name", "n"])
    assert result.exit_code == 2, result.output
    out = result.output.strip()
    assert len(out.splitlines()) == 1 and out.startswith("error: ") and fragment in out, out
    assert not (tmp_path / "cmp").exists()


def test_compare_without_progress_runs_in_process(cfg_file: Path, tmp_path: Path) -> None:
    grid = plan_grid(cfg_file, methods="ffa-lora", epsilons="4", seeds=1, out=str(tmp_path), name="one",
                     no_dp_reference=True)
    result = run_compare(grid, progress=False)
    assert [r["method"] for r in result["rows"]] == ["ffa-lora"]
    assert "| ffa-lora (†) | 4 |" in result["markdown"]  # reproducible noise in the tiny config
