"""`fedlora compare --workers N`: cells in N processes give the same results as one process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

import fedlora.report.workers as workers_module
from fedlora.errors import ConfigError, DataError
from fedlora.report.compare import plan_grid, run_compare
from fedlora.report.workers import shards
from tests.helpers import tiny_tree


def test_shards_are_dealt_round_robin_without_empty_ones() -> None:
    assert shards(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert shards([1, 2], 4) == [[1], [2]]  # more workers than cells: no idle process is started
    assert sorted(x for s in shards(list(range(10)), 4) for x in s) == list(range(10))


def _comparable(run_dir: Path) -> tuple[dict, list[dict]]:
    final = {k: v for k, v in json.loads((run_dir / "summary.json").read_text())["final"].items() if not k.endswith("seconds")}
    metrics = [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return final, metrics


@pytest.mark.slow
def test_two_workers_equal_one_process(tiny_model_dir, tiny_csv, tmp_path, monkeypatch) -> None:
    calls = []
    real = workers_module.run_in_workers
    monkeypatch.setattr(workers_module, "run_in_workers", lambda cfgs, n, **kw: (calls.append((len(cfgs), n)), real(cfgs, n, **kw)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree(tiny_model_dir, tiny_csv, tmp_path / "runs", train={"threads": 1})))
    grids = {}
    for workers in (1, 2):
        grid = plan_grid(cfg, methods="dp-lora,ffa-lora,rolora", epsilons="2", seeds=1, no_dp_reference=True,
                         out=str(tmp_path / "cmp"), name=f"w{workers}")
        result = run_compare(grid, progress=workers > 1, workers=workers)  # the bar follows the workers
        grids[workers] = (grid, result)
    assert calls == [(3, 2)]  # the 2-worker grid went through the process pool, the other did not
    (one, r1), (two, r2) = grids[1], grids[2]
    assert [c.name for c, _ in one.cells] == [c.name for c, _ in two.cells]
    for cell, _ in one.cells:
        assert _comparable(one.root / cell.name) == _comparable(two.root / cell.name), cell.name
    strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in r["rows"]] for r in (r1, r2)]
    assert strip[0] == strip[1]

@pytest.mark.slow
def test_a_worker_error_reaches_the_caller(tiny_model_dir, tiny_csv, tmp_path) -> None:
    missing = tmp_path / "gone.csv"
    missing.write_bytes(tiny_csv.read_bytes())
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree(tiny_model_dir, missing, tmp_path / "runs", train={"threads": 1})))
    grid = plan_grid(cfg, methods="dp-lora,ffa-lora", epsilons="2", seeds=1, no_dp_reference=True,
                     out=str(tmp_path / "cmp"), name="err")
    missing.unlink()  # the data vanish after planning: each worker fails when it loads them
    with pytest.raises(DataError):
        run_compare(grid, progress=False, workers=2)
    assert not any(grid.root.glob("*/summary.json"))


def test_workers_below_one_are_refused_before_anything_is_written(tiny_model_dir, tiny_csv, tmp_path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_tree(tiny_model_dir, tiny_csv, tmp_path / "runs")))
    grid = plan_grid(cfg, methods="dp-lora", epsilons="2", seeds=1, out=str(tmp_path / "cmp"), name="zero")
    with pytest.raises(ConfigError, match="--workers must be >= 1"):
        run_compare(grid, progress=False, workers=0)
    assert not grid.root.exists()


def test_a_worker_exits_when_its_parent_is_killed(tmp_path):
    """SIGKILL the parent of a pool (no cleanup runs): its worker does not live on as an orphan."""
    import signal
    import subprocess
    import sys
    import textwrap

    pid_file = tmp_path / "worker.pid"
    script = textwrap.dedent(f"""
        import multiprocessing, os, time
        from fedlora.report.workers import exit_with_parent

        def init():
            exit_with_parent(0.1)

        def work(path):
            open(path, "w").write(str(os.getpid()))
            time.sleep(60)

        if __name__ == "__main__":
            pool = multiprocessing.get_context("spawn").Pool(1, initializer=init)
            pool.apply_async(work, ({str(pid_file)!r},))
            time.sleep(60)
    """)
    import fedlora

    env = {**os.environ, "PYTHONPATH": str(Path(fedlora.__file__).parents[1])}
    (tmp_path / "pool_parent.py").write_text(script)
    parent = subprocess.Popen([sys.executable, "pool_parent.py"], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = Path(f"/proc/{worker}/status")
        try:
            if not status.is_file() or "\tZ" in status.read_text().split("State:")[1].splitlines()[0]:
                return  # gone, or a zombie waiting for init to reap it
        except (OSError, IndexError):
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError("the worker outlived its killed parent by 10 s")
