"""``fedlora account``: sigma from a target and back, and one-line errors for bad input."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.privacy.accounting import calibrate_noise, epsilon

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, ["account", *args])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def _number(line: str, name: str) -> float:
    match = re.search(rf"{name} ([0-9.e+-]+)", line)
    assert match, line
    return float(match.group(1))


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_sigma_meets_the_target_and_round_trips(accountant):
    line = _ok(["--epsilon", "3", "--sample-rate", "0.05", "--steps", "60", "--accountant", accountant])
    sigma = _number(line, "sigma")
    exact = calibrate_noise(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.05, steps=60, accountant=accountant)
    assert sigma == pytest.approx(exact, abs=5e-5)
    assert _number(line, "epsilon spent") <= 3.0
    back = _ok(["--sigma", repr(exact), "--sample-rate", "0.05", "--steps", "60", "--accountant", accountant])
    assert _number(back, "epsilon") == pytest.approx(epsilon([(exact, 0.05, 60)], delta=1e-5, accountant=accountant), abs=1e-4)
    assert _number(back, "epsilon") <= 3.0


def test_batch_and_rounds_derive_the_schedule():
    derived = _ok(["--epsilon", "2", "--batch-size", "64", "--dataset-size", "1280", "--rounds", "10",
                   "--local-steps", "5", "--accountant", "rdp", "--delta", "1e-6"])
    direct = _ok(["--epsilon", "2", "--sample-rate", "0.05", "--steps", "50", "--accountant", "rdp", "--delta", "1e-6"])
    assert derived == direct
    assert "sampling rate 0.05, 50 steps" in derived and "delta 1e-06" in derived


def test_full_batch_prv_gives_a_sigma():  # q = 1: no subsampling, Opacus warns about log(0); the line stays clean
    assert _number(_ok(["--epsilon", "3", "--sample-rate", "1", "--steps", "3"]), "sigma") > 1


@pytest.mark.parametrize("args,fragment", [
    (["--epsilon", "3", "--sigma", "1", "--sample-rate", "0.1", "--steps", "10"], "exactly one of --epsilon or --sigma"),
    (["--sample-rate", "0.1", "--steps", "10"], "exactly one of --epsilon or --sigma"),
    (["--epsilon", "3", "--steps", "10"], "--sample-rate"),
    (["--epsilon", "3", "--sample-rate", "0.1", "--batch-size", "8", "--dataset-size", "80", "--steps", "10"], "exactly one of --sample-rate"),
    (["--epsilon", "3", "--batch-size", "8", "--steps", "10"], "go together"),
    (["--epsilon", "3", "--batch-size", "100", "--dataset-size", "80", "--steps", "10"], "exceeds the dataset size"),
    (["--epsilon", "3", "--sample-rate", "1.5", "--steps", "10"], "sampling rate must be in (0, 1]"),
    (["--epsilon", "3", "--sample-rate", "0.1", "--rounds", "10"], "go together"),
    (["--epsilon", "3", "--sample-rate", "0.1", "--steps", "0"], "steps must be > 0"),
    (["--epsilon", "0", "--sample-rate", "0.1", "--steps", "10"], "epsilon must be > 0"),
    (["--epsilon", "3", "--delta", "2", "--sample-rate", "0.1", "--steps", "10"], "delta must be in (0, 1)"),
    (["--sigma", "0", "--sample-rate", "0.1", "--steps", "10"], "sigma must be > 0"),
    (["--epsilon", "3", "--sample-rate", "0.1", "--steps", "10", "--accountant", "gdp"], "unknown accountant 'gdp'"),
    (["--epsilon", "0.001", "--sample-rate", "1", "--steps", "100", "--accountant", "rdp"], "cannot be met"),
])
def test_bad_input_is_one_line_and_exit_2(args, fragment):
    result = runner.invoke(app, ["account", *args])
    assert result.exit_code == 2, result.output
    out = result.output.strip()
    assert len(out.splitlines()) == 1 and out.startswith("error: ") and "Traceback" not in out, out
    assert fragment in out, out
