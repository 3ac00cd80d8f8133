"""Whether and how many clients share one batched pass (``federation.batched_clients``).

0 or 1: the sequential engine. K: at most K clients per pass, refused with a ConfigError when the
run cannot be batched (:func:`unbatchable`). ``auto``: K from free memory (:func:`auto_k`), and the
sequential engine whenever the run cannot be batched. The pass itself is ``federation/batched.py``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedlora.errors import ConfigError
from fedlora.methods.la_lora import AlternateSteps
from fedlora.methods.seams import AlternateRounds, Joint

if TYPE_CHECKING:
    from fedlora.federation.runtime import Runtime

STATELESS_SCHEDULES = (Joint, AlternateRounds, AlternateSteps)  # exact types: no per-client history
CPU_PASS_BYTES = 128 << 20  # most activation bytes of one batched pass on CPU (auto)


def unbatchable(sim: Any) -> str | None:
    """Why this run's clients cannot share a pass (None: they can)."""
    cfg, rt = sim.cfg, sim.rt
    if cfg.federation.faults.fraction > 0:
        return "federation.faults injects failures client by client"
    if cfg.adapter.dropout > 0:
        return f"adapter.dropout={cfg.adapter.dropout:g} (dropout masks are drawn per client and step)"
    if "windows" in rt.task.train.features:
        return f"task {cfg.task.name}: an example spans several rows (its windows)"
    if cfg.adapter.type != "lora":
        return f"adapter.type={cfg.adapter.type} (only LoRA factors and the head batch)"
    if getattr(sim.method, "reads_private_data", ""):
        return f"method {sim.method.name} re-reads a client's private batch after its steps"
    if type(sim.method.schedule) not in STATELESS_SCHEDULES:
        return f"method {sim.method.name}'s schedule keeps history across a client's steps"
    for name in rt.adapted.params:
        owner = rt.hooks.linear.get(name)
        if owner is None or type(owner[0]) is not nn.Linear:
            return f"adapter tensor {name} is not owned by an nn.Linear"
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in rt.adapted.model.modules()):
        return "the model has BatchNorm layers in training mode (batch statistics would mix clients)"
    return None


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def activation_bytes(rt: Runtime, row: int = 0) -> int:
    """Bytes of every leaf module's output for one training example (one forward, no grad)."""
    total = 0

    def count(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal total
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in rt.adapted.model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            rt.task.loss(rt.adapted.model, rt.task.batch(rt.task.train, np.array([row]), rt.device))
    finally:
        for h in handles:
            h.remove()
    return total


def auto_k(sim: Any) -> int:
    """K = floor(0.5 x free memory / per-client bytes), in [1, clients per round].

    Per-client bytes = expected batch (largest client) x (3 x activation bytes of one example
    + bytes of one per-example gradient of every adapter tensor) + 4 x adapter bytes (weights,
    gradient, two optimizer moments). Free memory: CUDA's free memory, else the OS's available RAM.
    On CPU also K x expected batch x activation bytes <= 128 MiB: larger passes are bound by memory
    bandwidth there and ran slower than one client at a time (docs/PERFORMANCE.md, "Batched clients")."""
    rt = sim.rt
    adapter = sum(p.numel() * p.element_size() for p in rt.adapted.params.values())
    batch = max(s.expected_batch for s in sim.specs)
    act = activation_bytes(rt)
    per_client = batch * (3 * act + adapter) + 4 * adapter
    cap = max(1, round(sim.cfg.federation.clients_per_round * sim.cfg.federation.num_clients))
    if rt.device.type == "cpu":
        cap = min(cap, int(CPU_PASS_BYTES // max(batch * act, 1)))
    return int(max(1, min(cap, 0.5 * _available_bytes(rt.device) // max(per_client, 1))))


def engine_k(sim: Any) -> int:
    """The clients per pass for ``federation.batched_clients`` (0: sequential)."""
    want = sim.cfg.federation.batched_clients
    if want == 0 or want == 1:
        return 0
    reason = unbatchable(sim)
    if reason is not None:
        if want == "auto":
            return 0
        raise ConfigError(f"federation.batched_clients={want} cannot be used: {reason}; "
                          "set federation.batched_clients=0 (or auto to fall back silently)")
    k = auto_k(sim) if want == "auto" else int(want)
    return k if k > 1 else 0
