"""Batched multi-client simulation: K clients' local steps in one pass over the shared backbone.

Every adapter tensor owned by an ``nn.Linear`` (LoRA's A and B, the head) is held per client
and stacked into one batched weight (A: (K, r, k), B: (K, d, r)); at each local step the K
clients' Poisson batches (each its own size) are concatenated, the frozen backbone runs once,
and each linear layer applies client c's weights to client c's rows. One backward pass gives
the output gradient of every active layer; the per-example gradient of each active tensor is
an ``einsum`` of that layer's input and output gradient (as in ``privacy/dpsgd.py``). Each
client then goes through :func:`fedlora.privacy.dpsgd.privatize` on its own rows (flat or
per-group clip per example, sum, Gaussian noise with its own sigma drawn from its own RNG stream,
divided by its expected batch), its schedule transform, and its own optimizer state (Adam's
moments are per parameter, and every client has its own parameters). Row sampling and noise
use the same derived generators, in the same order, as :func:`~fedlora.federation.client.run_client`,
so the result equals running the clients one after another (tests/federation/test_batched.py).

``federation.batched_clients``: 0 (off, default), K (at most K clients per pass), or ``auto``
(K from free memory). The choice, and what cannot be batched, is ``federation/clients_per_pass.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedlora.federation.client import (
    ClientNode,
    ClientResult,
    ClientSpec,
    ClientState,
    _optimizer,
    dp_step_options,
    head_names,
    poisson_batch,
    round_lr_scale,
    signal_meter,
)
from fedlora.federation.faults import finite
from fedlora.federation.server import RoundOutcome
from fedlora.federation.signal import round_signal
from fedlora.methods.base import ClientTrace, Method, RoundPlan, State
from fedlora.privacy.dpsgd import StepMath, linear_per_sample, privatize
from fedlora.seeds import generator

if TYPE_CHECKING:
    from fedlora.federation.runtime import Runtime


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

    def per_sample(self, losses: torch.Tensor, active: list[str], kernels: StepMath | None = None) -> State:
        """Per-example gradients (rows, *shape) of the active tensors, all clients' rows (``kernels``:
        compiled einsums under train.compile)."""
        linear = kernels.linear if kernels is not None else linear_per_sample
        grads = torch.autograd.grad(losses.sum(), [out for _, _, out in self.records], allow_unused=True)
        out: State = {}
        for ((w, b), x, o), g in zip(self.records, grads, strict=True):
            g = torch.zeros_like(o) if g is None else g
            for name, attr in ((w, "weight"), (b, "bias")):
                if name in active:
                    dtype = self.values[0][name].dtype  # bf16 autocast records bf16 tensors: fp32 from here on
                    piece = linear(x.to(dtype), g.to(dtype), attr)
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
    heads = head_names(rt)
    optimizer = _optimizer([v[k] for v in values for k in trainable], rt.cfg.train,
                           [k in heads for _ in values for k in trainable],  # per-parameter state
                           round_lr_scale(rt.cfg.train, plan.round, rt.cfg.federation.rounds))
    meters = [signal_meter(rt) for _ in specs]
    gens = [generator(seed, "client", s.cid, plan.round) for s in specs]  # Poisson sampling, as run_client
    noises = [s.noise(seed, plan.round) for s in specs]
    batched = _Batched(rt, values)
    adapted.model.train()
    last: list[State] = [{} for _ in specs]
    losses: list[list[torch.Tensor]] = [[] for _ in specs]  # device scalars, without DP only (never released under DP)
    examples = [0] * len(specs)
    for step in range(local_steps):
        active = sorted(method.schedule.active(plan, step))
        rows = [poisson_batch(len(s.indices), s.sample_rate, g) for s, g in zip(specs, gens, strict=True)]
        counts = [len(r) for r in rows]
        if sum(counts):
            idx = np.concatenate([s.indices[r] for s, r in zip(specs, rows, strict=True)])
            batch = task.batch(task.train, idx, rt.device)

            def loss_fn(b=batch):
                with rt.autocast():  # train.precision: the backbone's products in bf16, the factors fp32
                    return task.loss(adapted.model, b)

            loss = batched.run(loss_fn, counts, set(active))
            per_sample = batched.per_sample(loss, active, rt.kernels)
            loss = loss.detach()
        else:
            per_sample = {k: torch.zeros((0, *values[0][k].shape), device=rt.device, dtype=values[0][k].dtype) for k in active}
            loss = torch.zeros(0, device=rt.device)
        optimizer.zero_grad(set_to_none=True)  # inactive tensors keep grad=None: no state advance
        split = {k: torch.split(g, counts) for k, g in per_sample.items()}
        for c, (spec, n, part_loss) in enumerate(zip(specs, counts, torch.split(loss, counts), strict=True)):
            mine = {k: split[k][c] for k in active}
            meter = meters[c]
            exact = {} if meter is not None and meter.mode == "exact" and spec.dp else None
            if spec.dp is not None:
                grads = privatize(mine, spec.dp, noises[c], **dp_step_options(rt, spec, exact))
            else:
                grads = {k: g.mean(0) if n else torch.zeros_like(values[c][k]) for k, g in mine.items()}
            if meter is not None:
                std = spec.dp.noise_multiplier * spec.dp.clip_norm / spec.dp.expected_batch_size if spec.dp else 0.0
                meter.step(grads, std, exact, spec.expected_batch if spec.dp else 1.0)
            grads = method.schedule.transform(grads, plan, step)
            for k, g in grads.items():
                values[c][k].grad = g
            last[c], examples[c] = grads, examples[c] + n
            if n and spec.dp is None:  # no host sync, and no loss computed, under DP
                losses[c].append(part_loss.mean())
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
        loss_c = float(torch.stack(losses[c]).mean()) if losses[c] else float("nan")
        results.append(ClientResult(upload, new_state, local_steps, loss_c, examples[c],
                                    meters[c].result() if meters[c] is not None else None))
    adapted.load({k: v.detach() for k, v in values[-1].items()})  # as the sequential engine leaves it
    adapted.set_active(set(adapted.params))
    return results


def train_batched(nodes: list[ClientNode], rt: Runtime, method: Method, cfg, plan: RoundPlan, download: State,
                  sampled: list[int], k: int) -> RoundOutcome:
    """The round's clients, K per pass, each checking the request and its upload as
    :meth:`ClientNode.train` does; a non-finite upload drops its client (its steps count)."""
    fed = cfg.federation
    ok: dict[int, ClientResult] = {}
    failures: list[dict[str, Any]] = []
    charged = dict.fromkeys(sampled, 0)
    for i in range(0, len(sampled), k):
        chunk = [nodes[c] for c in sampled[i:i + k]]
        for node in chunk:
            node.check_plan(plan)
            node.check_download(download)
        results = run_batched(rt, method, plan, download, [n.spec for n in chunk], [n.state for n in chunk],
                              local_steps=fed.local_steps, seed=cfg.train.seed)
        for node, res in zip(chunk, results, strict=True):
            node.check_upload(res.upload)
            node.state = res.state  # every DP step that ran is charged
            charged[node.cid] = fed.local_steps if node.spec.dp else 0
            if finite(res.upload):
                ok[node.cid] = res
            else:
                failures.append({"client": node.cid, "attempt": 0, "steps": charged[node.cid],
                                 "reason": "non-finite upload rejected"})
    order = [c for c in sampled if c in ok]
    losses = [ok[c].loss for c in order if nodes[c].spec.dp is None]
    return RoundOutcome(order, [ok[c].upload for c in order], charged, failures, 1, losses,
                        {"batched_clients": min(k, len(sampled)), **round_signal([ok[c].signal for c in order])})
