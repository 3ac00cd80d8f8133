"""The task registry: `fedlora tasks` lists every task and whether it runs offline here."""

from __future__ import annotations

from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.tasks import available_tasks, idx
from fedlora.tasks.base import offline_status, register_task


def test_cli_lists_tasks_with_offline_status():
    out = CliRunner().invoke(app, ["tasks"])
    assert out.exit_code == 0
    lines = {line.split()[0]: line for line in out.output.splitlines() if line.strip()}
    assert set(available_tasks()) <= set(lines)
    assert "offline: yes" in lines["text-classification"]  # make install ships both offline defaults
    assert "offline: yes" in lines["image-classification"]


def test_missing_offline_data_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(idx, "SEARCH", (str(tmp_path),))
    assert offline_status()["image-classification"] == "offline: no (Debian dataset-fashion-mnist)"


def test_tasks_without_a_check_are_online_only(monkeypatch):
    from fedlora.tasks import base

    monkeypatch.setattr(base, "_TASKS", dict(base._TASKS))
    register_task("by-name-only", "a task with no offline default")(lambda cfg, seed: None)
    assert offline_status()["by-name-only"] == "online only"
