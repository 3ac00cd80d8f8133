"""benchmarks/paper_grid.py plans the papers' protocol through fedlora compare (nothing is run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper_grid():
    spec = importlib.util.spec_from_file_location("paper_grid", ROOT / "benchmarks" / "paper_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_cell_follows_the_protocol(paper_grid, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = paper_grid.parse(["--task", "image", "--methods", "dp-lora,ffa-lora", "--out", str(tmp_path)])
    grid = paper_grid.plan(args)
    cells = {(c.method, c.epsilon) for c, _ in grid.cells}
    assert cells == {(m, e) for m in ("dp-lora", "ffa-lora") for e in (1.0, 3.0, 6.0, None)}
    for cell, cfg in grid.cells:
        assert (cfg.federation.num_clients, cfg.federation.rounds, cfg.federation.local_steps) == (6, 100, 10)
        assert cfg.federation.partition == "dirichlet" and cfg.federation.dirichlet_alpha == 0.5
        assert (cfg.adapter.rank, cfg.privacy.clip_norm, cfg.privacy.delta) == (8, 2.0, 1e-5)
        assert cfg.task.name == "image-classification"
        assert cfg.privacy.enabled == (cell.epsilon is not None)
    assert grid.root == tmp_path / "paper-image"


def test_reduced_rounds_and_user_overrides_win(paper_grid, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = paper_grid.parse(["--task", "text", "--methods", "dp-lora", "--rounds", "5", "--no-dp-reference",
                             "-s", "adapter.rank=4", "--out", str(tmp_path)])
    grid = paper_grid.plan(args)
    assert len(grid.cells) == 3
    assert {(cfg.federation.rounds, cfg.adapter.rank, cfg.task.name) for _, cfg in grid.cells} == {
        (5, 4, "text-classification")}
