"""A loss probe on a client's last private batch, for methods that read private data outside DP.

Only AS-LoRA's ``curvature: finite-difference`` (the reference code's, behind
``allow_non_private_curvature``) uses it: the probe evaluates the loss on the last step's
Poisson batch *without* clipping or noise, so whatever depends on it is NOT covered by the
DP-SGD accounting. The engine hands a probe to a method's upload only when the method declares
``Method.reads_private_data``, and such a run is marked in its metrics, summary and config.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedlora.methods.base import State


def loss_probe(rt, indices: np.ndarray, point: State) -> Callable[[State], float]:
    """``probe(offsets)``: mean loss on the training rows ``indices`` with the parameters at
    ``point`` (the tensors where the last gradient was taken) plus ``offsets``; eval mode, no
    grad; the model's parameters and train/eval mode are restored afterwards."""
    adapted, task = rt.adapted, rt.task
    batch: dict[str, torch.Tensor] = {}

    def probe(offsets: State) -> float:
        if len(indices) == 0:
            return 0.0
        if not batch:
            batch.update(task.batch(task.train, indices, rt.device))
        keys = sorted(set(point) | set(offsets))
        saved = {k: adapted.params[k].detach().clone() for k in keys}
        was_training = adapted.model.training
        adapted.model.eval()
        try:
            with torch.no_grad():
                for k in keys:
                    base = point.get(k, saved[k])
                    adapted.params[k].copy_(base + offsets[k].to(base) if k in offsets else base)
                return float(task.loss(adapted.model, batch).mean())
        finally:
            with torch.no_grad():
                for k in keys:
                    adapted.params[k].copy_(saved[k])
            adapted.model.train(was_training)

    return probe
