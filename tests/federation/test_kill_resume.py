"""Crash windows of a run directory. A real `fedlora run` is killed with SIGKILL halfway through
writing round k's checkpoint (a seeded k; a test seam in checkpoint.py pauses inside the write of
federation.pt): `--resume` ignores the half-written temporary folder, continues from round k - 1
(the only kept checkpoint, keep_checkpoints=1) and ends with the adapter of an uninterrupted run,
bit for bit (CPU). And every checkpoint and run-directory write is fsynced, file and folder."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from fedlora.federation.checkpoint import PAUSE_ENV, save_checkpoint
from fedlora.federation.simulation import Simulation
from fedlora.report.rundir import RunDir
from tests.helpers import tiny_tree

ROUNDS = 6
SEED = 16  # the kill point is derived from it, not from the clock


def _cli(*args: str, wait: bool = True, env: dict[str, str] | None = None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = [sys.executable, "-c", "from fedlora.cli import app; app()", *args]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_then_resume_uses_the_previous_one_bitwise(tiny_model_dir, tiny_csv, tmp_path):
    runs = tmp_path / "runs"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree(tiny_model_dir, tiny_csv, runs, federation={"rounds": ROUNDS},
                                            train={"device": "cpu", "threads": 1}, eval={"diagnostics": False},
                                            output={"keep_checkpoints": 1})))
    full = _cli("run", str(cfg), "--name", "full", "-q")
    assert full.returncode == 0, full.stderr

    kill_at = random.Random(SEED).randint(2, ROUNDS - 1)  # round kill_at - 1 has a finished checkpoint
    proc = _cli("run", str(cfg), "--name", "killed", "-q", wait=False, env={PAUSE_ENV: str(kill_at)})
    guard = threading.Timer(600, proc.kill)  # never hang the suite
    guard.start()
    try:
        lines = []
        for line in proc.stderr:  # wait until the run is inside the write of round kill_at's federation.pt
            lines.append(line)
            if f"paused inside the checkpoint write of round {kill_at}" in line:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        guard.cancel()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-2000:]

    killed = runs / "killed"
    ckpts = killed / "checkpoints"
    assert not (killed / "summary.json").exists()
    assert sorted(p.name for p in ckpts.iterdir()) == [f".round_{kill_at}.tmp", f"round_{kill_at - 1}"]
    half = ckpts / f".round_{kill_at}.tmp" / "federation.pt"
    whole = ckpts / f"round_{kill_at - 1}" / "federation.pt"
    assert 0 < half.stat().st_size < whole.stat().st_size  # killed mid-file, not between files

    resumed = _cli("run", "--resume", str(killed), "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed after round {kill_at - 1}" in resumed.stdout, resumed.stdout
    a, b = _adapter(runs / "full"), _adapter(killed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f"killed in round {kill_at}'s checkpoint"
    metrics = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    assert not (ckpts / f".round_{kill_at}.tmp").exists()  # the resumed run wrote round kill_at again


def _record_fsyncs(monkeypatch) -> list[str]:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_a_checkpoint_is_fsynced_file_by_file_and_folder_by_folder_around_the_rename(tiny_cfg, tmp_path, monkeypatch):
    sim = Simulation(tiny_cfg())
    synced = _record_fsyncs(monkeypatch)
    target = tmp_path / "checkpoints" / "round_1"
    save_checkpoint(sim, target)
    tmp = str(tmp_path / "checkpoints" / ".round_1.tmp")
    written = {str(p).replace(str(target), tmp) for p in target.rglob("*")}
    assert written | {tmp} <= set(synced)  # every file and folder before the rename, under its temporary name
    assert synced[-2:] == [str(tmp_path / "checkpoints"), str(tmp_path)]  # the rename, then the new checkpoints/


def test_run_directory_writes_are_fsynced_file_and_folder(tmp_path, monkeypatch):
    rd = RunDir.create(tmp_path, "run", "x")
    synced = _record_fsyncs(monkeypatch)
    rd.write_config("a: 1\n")
    rd.write_json("setup.json", {"a": 1})
    rd.append_metrics({"round": 1})
    rd.append_metrics({"round": 2})
    rd.rewrite_metrics([{"round": 1}])
    run = str(rd.path)
    assert synced == [f"{run}/.config.yaml.tmp", run, f"{run}/.setup.json.tmp", run,
                      f"{run}/metrics.jsonl", run, f"{run}/metrics.jsonl", f"{run}/.metrics.jsonl.tmp", run]
