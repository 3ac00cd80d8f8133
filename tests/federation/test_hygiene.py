"""Long-run hygiene: checkpoint retention, a known per-round growth of the run directory, and
memory that does not grow with the rounds."""

from __future__ import annotations

import gc
import os
import warnings
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from fedlora.federation.simulation import Simulation
from fedlora.report.rundir import RunDir


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_retention_keeps_last_n_and_every_mth_and_growth_is_known(tiny_cfg, tmp_path):
    cfg = tiny_cfg(federation={"rounds": 5, "local_steps": 1}, output={"keep_checkpoints": 1, "keep_every": 2},
                   eval={"every": 5, "diagnostics": False})
    sim = Simulation(cfg, RunDir.create(tmp_path, "run", "x"))
    rd = sim.run_dir
    rd.write_config(cfg.to_yaml())
    fixed = _size(rd.path)  # config.yaml: written once
    seen: list[tuple[int, list[int], int, int, list[int]]] = []

    def on_round(m):
        kept = sorted(int(p.name.split("_")[1]) for p in rd.checkpoints.glob("round_*"))
        sizes = [_size(rd.checkpoint_dir(r)) for r in kept]
        seen.append((m["round"], kept, _size(rd.path), rd.metrics_path.stat().st_size, sizes))

    sim.run(on_round)
    per_ckpt = seen[0][4][0]
    for rnd, kept, total, metrics, sizes in seen:
        assert kept == sorted({r for r in range(1, rnd + 1) if r == rnd or r % 2 == 0}), rnd
        assert all(abs(s - per_ckpt) <= 64 for s in sizes), sizes  # a checkpoint does not grow with the rounds
        assert abs(total - (fixed + metrics + len(kept) * per_ckpt)) <= 64 * len(kept)
    assert [k for _, k, *_ in seen][-1] == [2, 4, 5]
    metrics_sizes = [0] + [s[3] for s in seen]
    assert all(0 < b - a < 20_000 for a, b in pairwise(metrics_sizes))  # one bounded line per round


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> tuple[int, int]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() touches deprecated torch module proxies
        warnings.simplefilter("ignore")
        ts = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(ts), sum(t.numel() * t.element_size() for t in ts if not t.is_meta)


@pytest.mark.slow
def test_memory_does_not_grow_over_many_rounds(tiny_cfg):
    rounds = 25
    cfg = tiny_cfg(federation={"rounds": rounds, "local_steps": 1}, eval={"every": 5, "diagnostics": False},
                   privacy={"enabled": False})
    sim = Simulation(cfg)
    marks: dict[int, tuple[int, int, int]] = {}

    def on_round(m):
        if m["round"] in (5, rounds):
            marks[m["round"]] = (*_live_tensors(), _rss_bytes())

    out = sim.run(on_round)
    assert out.rounds_done == rounds
    (n10, b10, rss10), (n40, b40, rss40) = marks[5], marks[rounds]
    assert n40 <= n10 + 5 and b40 <= b10 + 4096, (n10, n40, b10, b40)  # no tensor kept per round
    assert rss40 - rss10 < 48 * 2**20, (rss10, rss40)  # 20 more rounds: well under 48 MiB
