"""Batched multi-client simulation: K clients' local steps in one pass over the shared backbone.

Every adapter tensor owned by an ``nn.Linear`` (LoRA's A and B, the head) is held per client
and stacked into one batched weight (A: (K, r, k), B: (K, d, r)); at each local step the K
clients' Poisson batches (each its own size) are concatenated, the frozen backbone runs once,
and each linear layer applies client c's weights to client c's rows. One backward pass gives
the output gradient of every active layer; the per-example gradient of each active tensor is
an ``einsum`` of that layer's input and output gradient (as in ``privacy/dpsgd.py``). Each
client then goes through :func:`fedlora.privacy.dpsgd.privatize` on its own rows (flat
clip per example, sum, Gaussian noise with its own sigma drawn from its own RNG stream,
divided by its expected batch), its schedule transform, and its own optimizer state (Adam's
moments are per parameter, and every client has its own parameters). Row sampling and noise
use the same derived generators, in the same order, as :func:`~fedlora.federation.client.run_client`,
so the result equals running the clients one after another (tests/federation/test_batched.py).

``federation.batched_clients``: 0 (off, default), K (at most K clients per pass), or ``auto``
(K from free memory, :func:`auto_k`). What cannot be batched (see :func:`unbatchable`) runs
sequentially under ``auto`` and is refused with a ConfigError when K was given explicitly.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedlora.errors import ConfigError
from fedlora.federation.client import (
    ClientResult,
    ClientSpec,
    ClientState,
    _optimizer,
    poisson_batch,
)
from fedlora.federation.faults import ClientsFailed, finite
from fedlora.federation.seeds import generator
from fedlora.methods.base import ClientTrace, Method, RoundPlan, State
from fedlora.methods.la_lora import AlternateSteps
from fedlora.methods.seams import AlternateRounds, Joint
from fedlora.privacy.dpsgd import privatize

if TYPE_CHECKING:
    from fedlora.federation.runtime import Runtime
    from fedlora.federation.simulation import Simulation

STATELESS_SCHEDULES = (Joint, AlternateRounds, AlternateSteps)  # exact types: no per-client history
CPU_PASS_BYTES = 128 << 20  # most activation bytes of one batched pass on CPU (auto)


def unbatchable(sim: Simulation) -> str | None:
    """Why this run's clients cannot share a pass (None: they can)."""
    cfg, rt = sim.cfg, sim.rt
    if cfg.federation.faults.fraction > 0:
        return "federation.faults injects failures client by client"
    if cfg.federation.client_timeout_s is not None:
        return "federation.client_timeout_s times each client on its own"
    if cfg.adapter.type != "lora":
        return f"adapter.type={cfg.adapter.type} (only LoRA factors and the head batch)"
    if cfg.train.precision != "fp32":
        return f"train.precision={cfg.train.precision} (the batched pass runs in fp32 only)"
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


def auto_k(sim: Simulation) -> int:
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


def engine_k(sim: Simulation) -> int:
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


class _Batched:
    """Per-client weights of the adapted linear layers, applied to each client's rows."""

    def __init__(self, rt: Runtime, values: list[State]) -> None:
        self.modules: dict[int, tuple[nn.Linear, str | None, str | None]] = {}
        for name in rt.adapted.params:
            module, attr = rt.hooks.linear[name]
            _, w, b = self.modules.get(id(module), (module, None, None))
            self.modules[id(module)] = (module, name if attr == "weight" else w, name if attr == "bias" else b)
        self.values = values  # per client: name -> leaf tensor (updated in place by the optimizers)
        self.counts: list[int] = []
        self.records: list[tuple[tuple[str | None, str | None], torch.Tensor, torch.Tensor]] = []

    def run(self, loss_fn, counts: list[int], active: set[str]) -> torch.Tensor:
        self.counts, self.records = counts, []
        stacked = {n: torch.stack([v[n] for v in self.values]).detach().requires_grad_(n in active)
                   for n in self.values[0]}
        for module, w, b in self.modules.values():
            module.forward = self._forward(module, w, b, stacked, bool({w, b} & active))
        try:
            return loss_fn()
        finally:
            for module, _, _ in self.modules.values():
                del module.forward

    def _forward(self, module: nn.Linear, w: str | None, b: str | None, stacked: State, record: bool):
        def forward(x: torch.Tensor) -> torch.Tensor:
            outs = []
            for c, xc in enumerate(torch.split(x, self.counts)):
                weight = stacked[w][c] if w else module.weight
                bias = stacked[b][c] if b else module.bias
                outs.append(nn.functional.linear(xc, weight, bias))
            out = torch.cat(outs)
            if record:
                self.records.append(((w, b), x.detach(), out))
            return out

        return forward

    def per_sample(self, losses: torch.Tensor, active: list[str]) -> State:
        """Per-example gradients (rows, *shape) of the active tensors, all clients' rows."""
        grads = torch.autograd.grad(losses.sum(), [out for _, _, out in self.records], allow_unused=True)
        out: State = {}
        for ((w, b), x, o), g in zip(self.records, grads, strict=True):
            g = torch.zeros_like(o) if g is None else g
            n = x.shape[0]
            x3, g3 = x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])
            pieces = {}
            if w in active:
                pieces[w] = torch.einsum("bto,bti->boi", g3, x3)  # (rows, out, in)
            if b in active:
                pieces[b] = g3.sum(1)  # (rows, out)
            for name, piece in pieces.items():
                out[name] = piece if name not in out else out[name] + piece
        self.records = []
        return out


def run_batched(rt: Runtime, method: Method, plan: RoundPlan, download: State, specs: list[ClientSpec],
                states: list[ClientState], *, local_steps: int, seed: int) -> list[ClientResult]:
    """:func:`~fedlora.federation.client.run_client` for K clients in one pass per local step."""
    adapted, task = rt.adapted, rt.task
    adapted.load(download)
    start = adapted.state()  # every adapter tensor as downloaded
    values = [{k: v.clone().requires_grad_(True) for k, v in {**start, **s.local}.items() if k in start} for s in states]
    trainable = sorted(plan.trainable)
    before = [{k: v[k].detach().clone() for k in trainable} for v in values]
    optimizer = _optimizer([v[k] for v in values for k in trainable], rt.cfg.train)  # per-parameter state
    gens = [generator(seed, "client", s.cid, plan.round, device=rt.device) for s in specs]
    batched = _Batched(rt, values)
    adapted.model.train()
    last: list[State] = [{} for _ in specs]
    losses: list[list[float]] = [[] for _ in specs]
    examples = [0] * len(specs)
    for step in range(local_steps):
        active = sorted(method.schedule.active(plan, step))
        rows = [poisson_batch(len(s.indices), s.sample_rate, g) for s, g in zip(specs, gens, strict=True)]
        counts = [len(r) for r in rows]
        if sum(counts):
            idx = np.concatenate([s.indices[r] for s, r in zip(specs, rows, strict=True)])
            batch = task.batch(task.train, idx, rt.device)
            loss = batched.run(lambda b=batch: task.loss(adapted.model, b), counts, set(active))
            per_sample = batched.per_sample(loss, active)
            loss = loss.detach()
        else:
            per_sample = {k: torch.zeros((0, *values[0][k].shape), device=rt.device, dtype=values[0][k].dtype) for k in active}
            loss = torch.zeros(0)
        optimizer.zero_grad(set_to_none=True)  # inactive tensors keep grad=None: no state advance
        split = {k: torch.split(g, counts) for k, g in per_sample.items()}
        for c, (spec, n, part_loss) in enumerate(zip(specs, counts, torch.split(loss, counts), strict=True)):
            mine = {k: split[k][c] for k in active}
            if spec.dp is not None:
                grads = privatize(mine, spec.dp, gens[c])
            else:
                grads = {k: g.mean(0) if n else torch.zeros_like(values[c][k]) for k, g in mine.items()}
            grads = method.schedule.transform(grads, plan, step)
            for k, g in grads.items():
                values[c][k].grad = g
            last[c], examples[c] = grads, examples[c] + n
            if n:
                losses[c].append(float(part_loss.mean()))
        optimizer.step()
    results = []
    for c, (spec, state) in enumerate(zip(specs, states, strict=True)):
        after = {k: values[c][k].detach().clone() for k in trainable}
        noise_std = spec.dp.noise_multiplier * spec.dp.clip_norm / spec.dp.expected_batch_size if spec.dp else 0.0
        trace = ClientTrace(last[c], noise_std, local_steps)
        if hasattr(trace, "lr"):
            trace.lr = rt.cfg.train.lr
        upload = method.upload(plan, before[c], after, trace)
        local = {**state.local, **{k: after[k] for k in state.local if k in after}}
        new_state = ClientState(local, state.dp_steps + (local_steps if spec.dp else 0))
        loss_c = float(np.mean(losses[c])) if losses[c] else float("nan")
        results.append(ClientResult(upload, new_state, local_steps, loss_c, examples[c]))
    adapted.load({k: v.detach() for k, v in values[-1].items()})  # as the sequential engine leaves it
    adapted.set_active(set(adapted.params))
    return results


def train_batched(sim: Simulation, plan: RoundPlan, download: State, sampled: list[int],
                  k: int) -> tuple[list[int], list[ClientResult], dict[str, Any]]:
    """The round's clients, K per pass; a non-finite upload drops its client (its steps count)."""
    fed = sim.cfg.federation
    ok: dict[int, ClientResult] = {}
    failures: list[dict[str, Any]] = []
    for i in range(0, len(sampled), k):
        chunk = sampled[i:i + k]
        results = run_batched(sim.rt, sim.method, plan, download, [sim.specs[c] for c in chunk],
                              [sim.clients[c] for c in chunk], local_steps=fed.local_steps, seed=sim.cfg.train.seed)
        for c, res in zip(chunk, results, strict=True):
            sim.clients[c] = res.state  # every DP step that ran is charged
            if finite(res.upload):
                ok[c] = res
            else:
                steps = fed.local_steps if sim.specs[c].dp else 0
                failures.append({"client": c, "attempt": 0, "steps": steps, "reason": "non-finite upload rejected"})
    if len(ok) < min(fed.min_clients, len(sampled)):
        raise ClientsFailed(f"stopped in round {plan.round}: {len(ok)} of {len(sampled)} clients uploaded finite values, "
                            f"fewer than federation.min_clients={fed.min_clients}; lower train.lr or federation.min_clients")
    order = [c for c in sampled if c in ok]
    info = {"failed_clients": [f["client"] for f in failures], "client_failures": failures, "attempts": 1,
            "batched_clients": min(k, len(sampled))}
    return order, [ok[c] for c in order], info
