"""A real `fedlora run` killed with SIGKILL at a random round, then `--resume`: the final adapter
is bitwise identical to an uninterrupted run's (CPU), also when the newest checkpoint was
half-written (a leftover temporary folder, a truncated federation.pt)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import tiny_tree

ROUNDS = 6


def _cli(*args: str, wait: bool = True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-c", "from fedlora.cli import app; app()", *args]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_at_a_random_round_then_resume_is_bitwise_identical(tiny_model_dir, tiny_csv, tmp_path):
    runs = tmp_path / "runs"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree(tiny_model_dir, tiny_csv, runs, federation={"rounds": ROUNDS},
                                            train={"device": "cpu", "threads": 1}, eval={"diagnostics": False})))
    full = _cli("run", str(cfg), "--name", "full", "-q")
    assert full.returncode == 0, full.stderr

    kill_at = random.Random().randint(3, ROUNDS - 1)  # the newest checkpoint has a complete one before it
    proc = _cli("run", str(cfg), "--name", "killed", "-q", wait=False)
    killed = runs / "killed"
    deadline = time.time() + 600
    while _lines(killed / "metrics.jsonl") < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"run ended before round {kill_at}"
    assert not (killed / "summary.json").exists()

    # as if the kill had also hit a checkpoint write: a temporary folder, a truncated newest checkpoint
    ckpts = sorted((killed / "checkpoints").glob("round_*"), key=lambda p: int(p.name.split("_")[1]))
    newest = ckpts[-1] / "federation.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    (killed / "checkpoints" / f".round_{int(ckpts[-1].name.split('_')[1]) + 1}.tmp").mkdir(exist_ok=True)

    resumed = _cli("run", "--resume", str(killed), "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert "truncated" in resumed.stdout and "resumed after round" in resumed.stdout
    a, b = _adapter(runs / "full"), _adapter(killed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f"killed at round {kill_at}"
    metrics = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
