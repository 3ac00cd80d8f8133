"""Round checkpoints: the global adapter in PEFT format plus the whole federation state.

Written to a temporary folder, every file and folder fsynced, then renamed into place (and the
parent fsynced), so neither a crash mid-write nor a power loss leaves a half checkpoint under
``round_<k>``. ``federation.pt`` is read with ``weights_only=True``: it holds only tensors and
plain values, and a file carrying any other object (a pickle that would run code) is refused as
corrupted. The state holds everything a round depends on that is
not re-derived from (seed, client, round): the global state, every client's local tensors and
DP step count (its accountant's history), the method's server memory (e.g. AS-LoRA's score
EMA), and how many metrics records metrics.jsonl holds at this point (the records themselves
stay in metrics.jsonl, so a checkpoint's size does not grow with the rounds). All random streams (client batches and noise, server sampling,
AS-LoRA's modes, user-level DP noise, injected faults) are derived from the seed and the
round, so a restored round draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.config import with_current_defaults
from fedlora.errors import FedloraError

STATE_FILE = "federation.pt"
PAUSE_ENV = "FEDLORA_TEST_PAUSE_IN_CHECKPOINT"  # tests only: "<round>" -> stop halfway through its federation.pt


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's bytes (a folder: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):  # files before their folders
        _fsync(path)
    _fsync(root)


def _test_pause(rnd: int) -> None:
    """A seam for the kill test: with ``PAUSE_ENV`` set to this round, the process announces on
    stderr that half of federation.pt is written and waits there to be killed."""
    if os.environ.get(PAUSE_ENV) == str(rnd):
        import sys  # noqa: PLC0415
        import time  # noqa: PLC0415

        print(f"paused inside the checkpoint write of round {rnd}", file=sys.stderr, flush=True)
        while True:
            time.sleep(1.0)


def _plain(value: Any) -> Any:
    """The method's server memory as what ``weights_only`` loading accepts: dicts, lists, numbers,
    strings and CPU tensors (numpy scalars and arrays become Python numbers and tensors)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    return value


def _cpu(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if state is None else {k: v.cpu() for k, v in state.items()}


def federation_state(sim: Any) -> dict[str, Any]:
    return {
        "round": sim.round,
        "config": sim.cfg.model_dump(mode="json"),
        "global_state": {k: v.cpu() for k, v in sim.global_state.items()},
        "clients": [{"local": {k: v.cpu() for k, v in c.local.items()}, "dp_steps": c.dp_steps} for c in sim.clients],
        "memory": _plain(sim.memory),
        "server_ema": _cpu(sim.server.ema),
        "metrics_rows": len(sim.metrics),
    }


def server_state(engine: Any) -> dict[str, Any]:
    """The federation state the server side alone holds (Flower: client tensors stay on the nodes)."""
    server = engine.server
    return {
        "round": server.round,
        "config": server.cfg.model_dump(mode="json"),
        "global_state": {k: v.cpu() for k, v in server.global_state.items()},
        "clients": [{"local": {}, "dp_steps": steps} for steps in server.steps],
        "memory": _plain(server.memory),
        "server_ema": _cpu(server.ema),
        "metrics_rows": len(server.metrics),
        "engine": "flower",
    }


def save_server_checkpoint(engine: Any, directory: Path) -> None:
    """A checkpoint of the server's side only (the Flower engine)."""
    _write_checkpoint(server_state(engine), engine.save_adapter, directory)


def save_checkpoint(sim: Any, directory: Path) -> None:
    _write_checkpoint(federation_state(sim), sim.save_adapter, directory)


def _write_checkpoint(state: dict[str, Any], save_adapter: Any, directory: Path) -> None:
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getbuffer()
        with open(tmp / STATE_FILE, "wb") as f:  # noqa: PTH123
            f.write(data[: len(data) // 2])
            f.flush()
            _test_pause(int(state["round"]))
            f.write(data[len(data) // 2 :])
        save_adapter(tmp / "adapter")
        _fsync_tree(tmp)  # every byte on disk before the rename makes it the newest checkpoint
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints stay the latest
        raise
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    _fsync(directory.parent)  # the rename itself survives a power loss ...
    _fsync(directory.parent.parent)  # ... and so does a checkpoints/ folder made by the first one


def load_checkpoint(directory: Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FedloraError(f"no checkpoint at '{directory}'; expected {STATE_FILE} there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: no code runs
    except Exception as err:  # noqa: BLE001  (truncated, corrupted, or carrying objects other than data)
        raise FedloraError(f"checkpoint '{path}' is corrupted or truncated ({type(err).__name__}); resume from an earlier round") from None
    if not isinstance(state, dict) or not {"round", "config", "global_state", "clients"} <= set(state):
        raise FedloraError(f"checkpoint '{path}' is not a fedlora federation checkpoint; resume from an earlier round")
    return state


def checkpoint_rounds(checkpoints: Path) -> list[int]:
    """Rounds with a finished checkpoint folder (temporary ``.round_<k>.tmp`` folders are ignored)."""
    if not checkpoints.is_dir():
        return []
    names = (p.name.removeprefix("round_") for p in checkpoints.glob("round_*") if p.is_dir())
    return sorted(int(n) for n in names if n.isdigit())


def latest_checkpoint(checkpoints: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest checkpoint that loads, and one note per newer one skipped as unreadable.

    Returns ``(None, notes)`` when no checkpoint exists (resume starts from round 0); raises
    :class:`FedloraError` when checkpoints exist but none loads.
    """
    rounds, notes = checkpoint_rounds(checkpoints), []
    for rnd in reversed(rounds):
        try:
            return load_checkpoint(checkpoints / f"round_{rnd}"), notes
        except FedloraError as err:
            notes.append(str(err))
    if rounds:
        raise FedloraError(f"no readable checkpoint under '{checkpoints}' ({notes[0]}); start a new run")
    return None, notes


def restore(sim: Any, state: dict[str, Any], metrics: list[dict[str, Any]] | None = None) -> None:
    """Put a loaded checkpoint's federation state into a freshly built simulation; ``metrics``:
    the run's first ``state["metrics_rows"]`` records (None: start the in-memory list empty)."""
    saved, current = with_current_defaults(state["config"]), sim.cfg.model_dump(mode="json")
    if saved != current:
        key = next(_differences(saved, current), "?")
        raise FedloraError(f"checkpoint was written by another config ('{key}' differs); resume with the run's own config.yaml")
    if len(state["clients"]) != len(sim.clients) or set(state["global_state"]) != set(sim.global_state):
        raise FedloraError("checkpoint does not match this run's clients or adapter; resume with the run's own config.yaml")
    if state.get("engine") == "flower" and sim.init_local:
        raise FedloraError("checkpoint was written by the Flower engine: the clients' local tensors (e.g. FedSA's B and "
                           "head) live on their nodes, not in it; start a new run")
    for c, saved_client in enumerate(state["clients"]):
        local = saved_client["local"]
        wrong = sorted(set(local) ^ set(sim.init_local)) or [k for k in local if tuple(local[k].shape) != tuple(sim.init_local[k].shape)]
        if wrong:
            raise FedloraError(f"checkpoint's local state of client {c} does not match method {sim.method.name!r} "
                               f"('{wrong[0]}'); resume with the run's own config.yaml or start a new run")

    def like(ref: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device=ref[k].device, dtype=ref[k].dtype) if k in ref else v for k, v in new.items()}

    from fedlora.federation.client import ClientState  # noqa: PLC0415

    sim.global_state = like(sim.global_state, state["global_state"])
    sim.clients = [ClientState(like(sim.init_local, c["local"]), int(c["dp_steps"])) for c in state["clients"]]
    sim.memory.clear()
    sim.memory.update(state.get("memory", {}))
    ema = state.get("server_ema")  # federation.server_ema's average (absent from older checkpoints)
    sim.server.ema = None if ema is None else like(sim.global_state, ema)
    if metrics is not None and len(metrics) != state.get("metrics_rows", len(metrics)):
        raise FedloraError(f"checkpoint of round {state['round']} expects {state['metrics_rows']} metrics records, "
                           f"got {len(metrics)}; start a new run")
    sim.metrics = list(metrics or [])
    sim.round = int(state["round"])
    sim.rt.adapted.load(sim.init_local)  # the model as an uninterrupted run leaves it after evaluating
    sim.rt.adapted.load(sim.global_state)


def _differences(a: Any, b: Any, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _differences(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")
