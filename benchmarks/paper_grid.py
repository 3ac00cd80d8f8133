"""The papers' protocol on one task, every method, epsilon in {1, 3, 6}: one resumable table.

Protocol: 6 clients, label-Dirichlet(0.5), 100 rounds of 10 local steps, LoRA rank 8, C = 2,
delta = 1e-5 per client, epsilon in {1, 3, 6}, plus the non-private reference per method. It is
``fedlora compare`` with these settings fixed on top of a task config; rerunning with the same
``--name`` resumes (finished cells are skipped). ``--rounds`` reduces the grid for a CPU (state it).

    python benchmarks/paper_grid.py --task image --name paper-image            # GPU: full grid
    python benchmarks/paper_grid.py --task image --rounds 10 --methods dp-lora,ffa-lora,fedsa-lora
    python benchmarks/paper_grid.py --config my.yaml --set task.max_train_examples=2000
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from fedlora.config import parse_override

TASK_CONFIGS = {"text": "configs/demo.yaml", "image": "configs/fashion-mnist.yaml"}
PROTOCOL: dict[str, Any] = {
    "federation.num_clients": 6,
    "federation.clients_per_round": 1.0,
    "federation.partition": "dirichlet",
    "federation.dirichlet_alpha": 0.5,
    "federation.rounds": 100,
    "federation.local_steps": 10,
    "adapter.rank": 8,
    "privacy.clip_norm": 2.0,
    "privacy.delta": 1e-5,
}
EPSILONS = "1,3,6"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def protocol_overrides(rounds: int | None, extra: list[str]) -> dict[str, Any]:
    """The protocol, a reduced round count if asked, then the user's -s overrides (they win)."""
    out = dict(PROTOCOL)
    if rounds is not None:
        out["federation.rounds"] = rounds
    out.update(dict(parse_override(s) for s in extra))
    return out


def plan(args: argparse.Namespace):
    from fedlora.report.compare import plan_grid  # noqa: PLC0415

    config = args.config or TASK_CONFIGS[args.task]
    return plan_grid(config, methods=args.methods, epsilons=args.epsilons, seeds=args.seeds,
                     overrides=protocol_overrides(args.rounds, args.set), out=args.out,
                     name=args.name or f"paper-{args.task}", no_dp_reference=args.no_dp_reference)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASK_CONFIGS), default="image", help="offline task config to start from")
    p.add_argument("--config", help="a task config instead of --task")
    p.add_argument("--methods", help="comma-separated methods (default: every registered method)")
    p.add_argument("--epsilons", default=EPSILONS)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--rounds", type=int, help="reduce the 100 rounds (CPU runs; say so with the table)")
    p.add_argument("--set", "-s", action="append", default=[], help="extra override key.path=value")
    p.add_argument("--out", default="runs")
    p.add_argument("--name", help="compare directory name (rerun with it to resume)")
    p.add_argument("--no-dp-reference", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from fedlora.report.compare import run_compare  # noqa: PLC0415

    args = parse(argv)
    grid = plan(args)
    t0 = time.perf_counter()
    result = run_compare(grid, progress=True)
    wall = time.perf_counter() - t0
    info = {"protocol": protocol_overrides(args.rounds, args.set), "task": args.config or TASK_CONFIGS[args.task],
            "device": device_name(), "wall_seconds_this_invocation": round(wall, 1), "cells": len(grid.cells)}
    (Path(grid.root) / "paper_grid.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(result["markdown"])
    print(f"\n{len(grid.cells)} runs on {info['device']}, {wall / 60:.1f} min this invocation; table in {grid.root}")


if __name__ == "__main__":
    main()
