"""The summary line states which guarantees hold; AS-LoRA with user-level DP is refused up front."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.errors import ConfigError
from fedlora.experiment import summary_line
from fedlora.federation.simulation import RunResult, Simulation
from tests.helpers import tiny_tree


def _result(epsilon: float | None) -> RunResult:
    return RunResult(rounds_done=2, metrics=[{"round": 2, "accuracy": 0.5, "epsilon": epsilon}],
                     global_state={}, stop_reason=None, seconds=1.0)


def test_user_level_only_summary_states_the_user_level_guarantee(tiny_cfg):
    sim = Simulation(tiny_cfg(privacy={"enabled": False, "user_level": {"enabled": True, "epsilon": 2.0}}))
    line = summary_line(_result(None), sim)
    assert "no DP" not in line
    assert f"guarantees: {sim.guarantees(2)}" in line
    assert "user-level (epsilon" in line and "sample-level" not in line


def test_both_guarantees_in_the_summary(tiny_cfg):
    sim = Simulation(tiny_cfg(privacy={"user_level": {"enabled": True}}))
    line = summary_line(_result(2.5), sim)
    assert "epsilon spent 2.50 <= target 3" in line
    assert "sample-level" in line and "user-level" in line


def test_no_dp_and_sample_level_only_lines_are_unchanged(tiny_cfg):
    assert "no DP" in summary_line(_result(None), Simulation(tiny_cfg(privacy={"enabled": False})))
    line = summary_line(_result(2.5), Simulation(tiny_cfg()))
    assert "epsilon spent 2.50" in line and "guarantees" not in line


def test_as_lora_with_user_level_dp_is_refused_before_loading(tmp_path):
    # a dataset and model that do not exist: the refusal must come first
    tree = tiny_tree(tmp_path / "no-model", tmp_path / "no-data.csv", tmp_path / "runs",
                     method={"name": "as-lora"}, privacy={"user_level": {"enabled": True}})
    from fedlora.config import build_config

    with pytest.raises(ConfigError, match="user-level DP cannot wrap 'as-lora'"):
        Simulation(build_config(tree))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["run", str(path), "-q"])
    assert result.exit_code == 2, result.output
    out = result.output.strip()
    assert len(out.splitlines()) == 1 and out.startswith("error: user-level DP cannot wrap 'as-lora'"), out
    assert "privacy.user_level.enabled=false" in out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
