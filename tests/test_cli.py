"""CLI errors: one line naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fedlora.cli import app
from tests.helpers import tiny_tree

runner = CliRunner()


def _write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def cfg_file(tiny_model_dir, tiny_csv, tmp_path):
    def make(**sections):
        return _write(tmp_path, tiny_tree(tiny_model_dir, tiny_csv, tmp_path / "runs", **sections))

    return make


def _fails(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    out = result.output.strip()
    assert len(out.splitlines()) == 1, out
    assert out.startswith("error: ")
    assert "Traceback" not in out
    for f in fragments:
        assert f in out, out


def test_unknown_method(cfg_file):
    _fails(runner.invoke(app, ["run", str(cfg_file()), "--method", "dp-lorra", "-q"]), "unknown method 'dp-lorra'", "dp-lora")


@pytest.mark.parametrize("eps", ["0", "-1"])
def test_epsilon_must_be_positive(cfg_file, eps):
    _fails(runner.invoke(app, ["run", str(cfg_file()), "--epsilon", eps, "-q"]), "epsilon must be > 0", "--no-dp")


@pytest.mark.parametrize("delta", ["0", "1", "1.5"])
def test_delta_out_of_range(cfg_file, delta):
    _fails(runner.invoke(app, ["run", str(cfg_file()), "-s", f"privacy.delta={delta}", "-q"]), "delta must be in (0, 1)")


def test_more_clients_than_examples(cfg_file):
    _fails(runner.invoke(app, ["run", str(cfg_file()), "--clients", "5000", "-q"]), "clients")


def test_data_file_without_label_column(tiny_model_dir, tmp_path):
    data = tmp_path / "nolabel.csv"
    pd.DataFrame({"text": ["a b", "c d"], "stars": [1, 2]}).to_csv(data, index=False)
    path = _write(tmp_path, tiny_tree(tiny_model_dir, data, tmp_path / "runs"))
    _fails(runner.invoke(app, ["run", str(path), "-q"]), "no label column 'label'", "task.label_column")


def test_model_path_that_does_not_exist(tiny_csv, tmp_path):
    path = _write(tmp_path, tiny_tree(tmp_path / "missing-model", tiny_csv, tmp_path / "runs"))
    _fails(runner.invoke(app, ["run", str(path), "-q"]), "model path", "does not exist")


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task:\n  name: [unclosed\n")
    _fails(runner.invoke(app, ["run", str(bad), "-q"]), "not valid YAML", "line")


def test_unknown_key_suggests_the_right_one(cfg_file):
    _fails(runner.invoke(app, ["run", str(cfg_file()), "-s", "federation.num_client=3", "-q"]),
           "unknown config key 'federation.num_client'", "did you mean 'num_clients'")


def test_wrong_type(cfg_file):
    _fails(runner.invoke(app, ["run", str(cfg_file()), "-s", "federation.rounds=many", "-q"]), "federation.rounds")


def test_existing_run_directory_is_never_overwritten(cfg_file, tmp_path):
    path = cfg_file()
    ok = runner.invoke(app, ["run", str(path), "--name", "keep", "-q", "--rounds", "1"])
    assert ok.exit_code == 0, ok.output
    metrics = (tmp_path / "runs" / "keep" / "metrics.jsonl").read_text()
    again = runner.invoke(app, ["run", str(path), "--name", "keep", "-q", "--rounds", "1"])
    _fails(again, "already exists")
    assert (tmp_path / "runs" / "keep" / "metrics.jsonl").read_text() == metrics


def test_run_prints_a_summary_line(cfg_file):
    result = runner.invoke(app, ["run", str(cfg_file()), "-q", "--rounds", "1"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "epsilon spent" in result.output and "majority class" in result.output


def test_methods_and_tasks_are_listed():
    assert "dp-lora" in runner.invoke(app, ["methods"]).output
    assert "text-classification" in runner.invoke(app, ["tasks"]).output


@pytest.mark.parametrize(("method", "key", "value"), [("fedsa-vera", "type", "vera"), ("fedsa-rslora", "rslora", True)])
def test_run_method_flag_sets_what_the_method_needs_from_the_adapter(cfg_file, tmp_path, method, key, value):
    result = runner.invoke(app, ["run", str(cfg_file()), "--method", method, "--rounds", "1", "--out", str(tmp_path),
                                 "--name", "m", "-q"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())
    assert saved["adapter"][key] == value
