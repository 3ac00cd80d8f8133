"""``fedlora run --resume RUN_DIR``: the run's own config, its latest readable checkpoint.

Resume is a variant of :func:`fedlora.experiment.run_experiment`: the run directory is
reopened instead of created, the simulation is restored from the newest checkpoint that loads
(an unreadable newer one is skipped and named), metrics.jsonl is rewritten atomically to the
checkpoint's rounds, and the round loop continues to the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fedlora.config import ExperimentConfig, build_config, load_config
from fedlora.errors import ConfigError, FedloraError
from fedlora.federation.checkpoint import _differences, latest_checkpoint
from fedlora.federation.simulation import Simulation
from fedlora.report.rundir import RunDir


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_config(run_dir: str | Path, config: str | Path | None = None,
                  overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """The run's saved config; refused in one line if CONFIG or overrides contradict it."""
    saved_file = Path(run_dir) / "config.yaml"
    if not saved_file.is_file():
        raise FedloraError(f"'{run_dir}' is not a run directory (no config.yaml); pass a folder that `fedlora run` wrote")
    saved = load_config(saved_file)
    explicit: dict[str, Any] = {}
    if config is not None:
        load_config(config)  # validates the file, with the usual one-line errors
        explicit.update(_leaves(yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}))
    explicit.update(overrides or {})
    if explicit:
        asked = build_config(saved.model_dump(mode="json"), explicit).model_dump(mode="json")
        kept = saved.model_dump(mode="json")
        key = next(_differences(asked, kept), None)
        if key is not None:
            raise ConfigError(f"--resume: '{key}' differs from the run's {saved_file}; drop it to continue the run "
                              "as configured, or start a new run")
    return saved


def reopen(cfg: ExperimentConfig, run_dir: str | Path, runtime: Any = None) -> tuple[Simulation, list[str]]:
    """A simulation restored from the run's latest readable checkpoint (round 0 when none)."""
    rd = RunDir.open(Path(run_dir))
    state, notes = latest_checkpoint(rd.checkpoints)  # before minutes of loading: fail fast
    rows = first_records(rd.metrics_path, state["metrics_rows"] if state is not None else 0)
    sim = Simulation(cfg, rd, runtime)
    if state is not None:
        sim.restore(state, rows)
    rd.rewrite_metrics(rows)  # drops rounds after the checkpoint and a half-written last line
    return sim, notes


def first_records(path: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` records of metrics.jsonl (those the checkpoint had seen)."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    try:
        rows = [json.loads(line) for line in lines[:n]]
    except json.JSONDecodeError:
        rows = []
    if len(rows) < n:
        raise FedloraError(f"'{path}' holds fewer than the checkpoint's {n} records (edited or lost); start a new run")
    return rows
