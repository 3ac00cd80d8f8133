"""The CLI's own behaviour: the summary line, the listings, what --method sets. Its errors (one line,
exit code 2, no traceback) are rows of the table in tests/test_bad_input.py."""

from __future__ import annotations

from pathlib import Path

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
