"""benchmarks/peer_pfl.py: its fedlora side runs at a tiny size (so it cannot rot), and the batches
its pfl side trains on are fedlora's own. Nothing here installs or imports pfl."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peer_pfl.py"


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("peer_pfl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["peer_pfl"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["peer_pfl"]


def test_fedlora_side_runs_at_a_tiny_size(tiny_model_dir: Path, tiny_csv: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out, pfl_env = tmp_path / "peer.json", tmp_path / "pfl-env"
    cmd = [sys.executable, str(SCRIPT), "--only", "fedlora", "--clients", "20:4", "--env", str(pfl_env),
           "--out", str(out), "-s", "federation.rounds=3", "-s", f"task.model={tiny_model_dir}",
           "-s", f"task.dataset={tiny_csv}", "-s", "task.max_length=16", "-s", "task.max_test_examples=64"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "N = 20, K = 4 per round, 1 repeat(s), 1 timed rounds a side" in proc.stdout
    assert "| fedlora |" in proc.stdout and "| pfl |" not in proc.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["pfl"] is None and result["overrides"]["train.threads"] == 1
    (side,) = result["sides"]
    assert (side["name"], side["clients"], side["per_round"], side["timed_rounds"]) == ("fedlora", 20, 4, 1)
    assert side["s_per_round"] > 0 and side["s_per_client_update"] == pytest.approx(side["s_per_round"] / 4)
    assert 0.0 <= side["accuracy"] <= 1.0 and side["sigma"] > 0
    assert len(side["runs"][0]["seconds"]) == 3
    assert not pfl_env.exists()  # --only fedlora never installs pfl


def test_pfl_side_trains_on_fedlora_clients_own_batches(peer, tiny_cfg, monkeypatch) -> None:
    """The rows the pfl datasets yield (round_rows) are the rows fedlora's client draws, step by step."""
    import fedlora.federation.client as client
    from fedlora.federation.simulation import Simulation

    cfg = tiny_cfg(federation={"num_clients": 4, "rounds": 2, "local_steps": 3, "min_client_size": 20,
                               "clients_per_round": 0.5})
    drawn = []
    real = client.poisson_batch

    def record(n, rate, gen):
        rows = real(n, rate, gen)
        drawn.append(rows)
        return rows

    monkeypatch.setattr(client, "poisson_batch", record)
    sim = Simulation(cfg)
    record_of_round = sim.run_round(1)
    want = [rows for c in record_of_round["clients"]
            for rows in peer.round_rows(sim.specs[c], cfg.train.seed, 1, 3, sim.specs[c].sample_rate)]
    assert len(drawn) == len(want) == 2 * 3
    assert all((a == b).all() for a, b in zip(drawn, want, strict=True))


@pytest.mark.parametrize("text,want", [("1000", (1000, None)), ("10:10", (10, 10))])
def test_clients_argument(peer, text, want) -> None:
    assert peer.size_arg(text) == want


def test_refuses_a_job_the_pfl_side_does_not_reproduce(peer, tiny_cfg) -> None:
    cfg = tiny_cfg(train={"optimizer": "adam"})  # and no user-level DP
    with pytest.raises(SystemExit, match="user_level.enabled must be true.*optimizer must be sgd"):
        peer.check_job(cfg)
