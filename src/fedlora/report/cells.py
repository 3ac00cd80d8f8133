"""One cell of a grid: an ordinary run directory, skipped when finished, redone when half-finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fedlora.config import ExperimentConfig
from fedlora.report.runtime_pool import RuntimePool


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run_cell(cfg: ExperimentConfig, pool: RuntimePool) -> dict[str, Any]:
    """One cell: skipped when finished, redone from scratch when half-finished."""
    from fedlora.experiment import run_experiment  # noqa: PLC0415

    run_dir = Path(cfg.output.root) / str(cfg.output.name)
    done = read_summary(run_dir)
    if done is not None:
        return done
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return run_experiment(cfg, progress=False, runtime=pool.get(cfg))
