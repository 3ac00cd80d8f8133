"""`fedlora flower up | sim`: user errors are one line and exit code 2, before any process starts."""

from __future__ import annotations

from typer.testing import CliRunner

from fedlora.cli import app


def test_flower_commands_refuse_a_bad_config_in_one_line(tmp_path):
    runner = CliRunner()
    for command in ("up", "sim"):
        res = runner.invoke(app, ["flower", command, str(tmp_path / "missing.yaml")])
        assert res.exit_code == 2, res.output
        assert res.output.count("\n") == 1 and "error:" in res.output
        res = runner.invoke(app, ["flower", command, "-s", "federation.rounds=zero"])
        assert res.exit_code == 2, res.output
    assert not list(tmp_path.iterdir())  # nothing written, nothing started
