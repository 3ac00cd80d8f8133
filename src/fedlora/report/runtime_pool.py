"""Reuse one loaded model and dataset across the runs of a grid, reset to bitwise the fresh state."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch

from fedlora.config import ExperimentConfig
from fedlora.federation.runtime import Runtime


class RuntimePool:
    """Holds the :class:`Runtime` of the last (task, adapter, seed, device) key.

    A runtime is snapshotted right after it is built (every parameter and buffer, which
    tensors train, the modules' train/eval modes, the global RNG states) and restored before
    each reuse, so a run on a reused runtime equals a run on a fresh one bit for bit.
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._rt: Runtime | None = None
        self._snap: dict[str, Any] = {}
        self._task: tuple[str, Any] | None = None  # (task key, Task): the data, shared across adapters
        self.built = 0

    @staticmethod
    def task_key(cfg: ExperimentConfig) -> str:
        return json.dumps([cfg.task.model_dump(mode="json"), cfg.train.seed], sort_keys=True)

    @staticmethod
    def key(cfg: ExperimentConfig) -> str:
        return json.dumps([cfg.task.model_dump(mode="json"), cfg.adapter.model_dump(mode="json"), cfg.train.seed,
                           cfg.train.device, cfg.train.threads], sort_keys=True)

    def get(self, cfg: ExperimentConfig) -> Runtime:
        key = self.key(cfg)
        if key != self._key or self._rt is None:
            self.close()
            tkey = self.task_key(cfg)
            task = self._task[1] if self._task is not None and self._task[0] == tkey else None
            self._rt = Runtime(cfg, task=task)  # a shared task keeps its tokenised data and prefix cache
            self._task = (tkey, self._rt.task)
            self._key, self._snap = key, snapshot(self._rt)
            self.built += 1
        else:
            restore(self._rt, self._snap)
        self._rt.cfg = cfg  # optimizer and evaluation settings of this run
        return self._rt

    def close(self) -> None:
        if self._rt is not None:
            self._rt.hooks.remove()
        self._rt, self._key, self._snap = None, None, {}


def snapshot(rt: Runtime) -> dict[str, Any]:
    model = rt.adapted.model
    return {
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "buffers": {k: b.detach().clone() for k, b in model.named_buffers()},
        "training": {k: m.training for k, m in model.named_modules()},
        "rng": (torch.get_rng_state(), np.random.get_state(), random.getstate()),
    }


def restore(rt: Runtime, snap: dict[str, Any]) -> None:
    model = rt.adapted.model
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(snap["params"][k])
            p.requires_grad_(snap["grad"][k])
            p.grad = None
        for k, b in model.named_buffers():
            b.copy_(snap["buffers"][k])
    for k, m in model.named_modules():
        m.training = snap["training"][k]
    rt.hooks.clear()
    rt.hooks.enabled = False
    torch_state, np_state, py_state = snap["rng"]
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)
