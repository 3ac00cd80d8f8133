"""Flower simulation: the same ServerApp and ClientApp on Flower's simulation runtime (Ray), one process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedlora.config import ExperimentConfig


def flower_env(home: Path) -> None:
    """Flower's process settings: no telemetry, no runtime installs, a project-local FLWR_HOME."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_HOME"] = str(home)


def run_config_for(cfg: ExperimentConfig, run_dir: Path, *, min_clients: int | None = None,
                   round_timeout: float = 600.0, node_wait: float = 120.0) -> dict[str, Any]:
    """fedlora's config as Flower's run config (the YAML text travels; clients need no file)."""
    return {"config-yaml": cfg.to_yaml(), "run-dir": str(run_dir),
            "min-clients": cfg.federation.min_clients if min_clients is None else min_clients,
            "round-timeout": float(round_timeout), "node-wait": float(node_wait)}


def simulate(cfg: ExperimentConfig, run_dir: Path, *, min_clients: int | None = None, cpus: int = 2,
             server_app: Any = None, node_settings: dict[int, dict[str, Any]] | None = None) -> Path:
    """Run ``cfg`` through ``flwr.simulation.run_simulation`` with one virtual SuperNode per client.
    ``server_app``: a ServerApp to use instead of fedlora's (tests wrap the grid to read every message);
    ``node_settings``: extra node-config keys per partition id (each node's own ``data`` and ``config``)."""
    flower_env(run_dir.parent / ".flwr")
    from flwr.simulation import run_simulation  # noqa: PLC0415

    from fedlora.flower.client_app import build_client_app  # noqa: PLC0415
    from fedlora.flower.server_app import build_server_app  # noqa: PLC0415

    run_config = run_config_for(cfg, run_dir, min_clients=min_clients)
    threads = cfg.train.threads or 1
    backend = {"client_resources": {"num_cpus": threads, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False}}
    run_simulation(server_app or build_server_app(run_config), build_client_app(run_config, node_settings),
                   num_supernodes=cfg.federation.num_clients, backend_config=backend)
    return run_dir
