"""Round checkpoints: the global adapter in PEFT format plus the whole federation state.

Written to a temporary folder and renamed into place, so a crash mid-write never leaves a
half checkpoint under ``round_<k>``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedlora.errors import FedloraError

if TYPE_CHECKING:
    from fedlora.federation.simulation import Simulation

STATE_FILE = "federation.pt"


def federation_state(sim: Simulation) -> dict[str, Any]:
    return {
        "round": sim.round,
        "config": sim.cfg.model_dump(mode="json"),
        "global_state": {k: v.cpu() for k, v in sim.global_state.items()},
        "clients": [{"local": {k: v.cpu() for k, v in c.local.items()}, "dp_steps": c.dp_steps} for c in sim.clients],
        "memory": sim.memory,
    }


def save_checkpoint(sim: Simulation, directory: Path) -> None:
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(federation_state(sim), tmp / STATE_FILE)
    sim.save_adapter(tmp / "adapter")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def load_checkpoint(directory: Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FedloraError(f"no checkpoint at '{directory}'; expected {STATE_FILE} there")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001  (truncated or corrupted file)
        raise FedloraError(f"checkpoint '{path}' is corrupted or truncated ({type(err).__name__}); resume from an earlier round") from None
