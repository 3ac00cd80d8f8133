"""The client function: global download + local state in, upload + local state out.

One round on one client: load what the server sent and what the client kept, run the
method's local schedule for T DP-SGD steps (Poisson sampling, per-sample clipping of the
active tensors, Gaussian noise), and return the method's upload. The in-process engine and
the Flower ClientApp call this same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedlora.federation.runtime import Runtime
from fedlora.seeds import generator
from fedlora.methods.base import ClientTrace, Method, RoundPlan, State
from fedlora.privacy.dpsgd import DPParams, privatize
from fedlora.privacy.noise import NoiseSource, noise_stream


@dataclass(frozen=True)
class ClientSpec:
    """A client's fixed facts: its data indices and its public DP parameters."""

    cid: int
    indices: np.ndarray  # rows of the task's training set
    sample_rate: float  # Poisson rate q
    dp: DPParams | None  # None: non-private
    step_budget: int  # most DP steps within its (epsilon, delta) target
    reproducible_noise: bool = False  # True: noise seeded from the config (NOT private against its holders)

    def noise(self, seed: int, rnd: int, device: torch.device | str = "cpu") -> NoiseSource:
        """The DP noise of this client's round: secure randomness unless reproducible noise was asked for."""
        return noise_stream(self.reproducible_noise, seed, "client", self.cid, rnd, device=device)

    @property
    def expected_batch(self) -> float:
        return self.sample_rate * len(self.indices)


@dataclass
class ClientState:
    """What stays on the client between rounds (never sent)."""

    local: State = field(default_factory=dict)  # e.g. FedSA's B and head
    dp_steps: int = 0  # noisy steps taken so far (the accountant's history)


@dataclass
class ClientResult:
    upload: State
    state: ClientState
    steps: int
    loss: float  # mean training loss over the round's batches
    examples: int  # examples the round touched (sum of batch sizes)


def _optimizer(params: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def poisson_batch(n: int, rate: float, gen: torch.Generator) -> np.ndarray:
    """Indices 0..n-1 each kept independently with probability ``rate``."""
    return torch.nonzero(torch.rand(n, generator=gen) < rate).flatten().numpy()


def local_gradients(rt: Runtime, spec: ClientSpec, rows: np.ndarray, active: list[str], noise: NoiseSource) -> tuple[State, float]:
    """One step's gradient of the active tensors: privatised with DP, plain mean without."""
    adapted, task = rt.adapted, rt.task
    params = {k: adapted.params[k] for k in active}
    if len(rows) == 0:
        zero = {k: torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype) for k, p in params.items()}
        return (privatize(zero, spec.dp, noise) if spec.dp else {k: torch.zeros_like(p) for k, p in params.items()}), float("nan")
    batch = task.batch(task.train, spec.indices[rows], rt.device)
    if spec.dp is None:
        with rt.autocast():
            losses = task.loss(adapted.model, batch)
        grads = torch.autograd.grad(losses.mean(), list(params.values()))
        return dict(zip(params, grads, strict=True)), float(losses.detach().mean())
    rt.hooks.enabled = True
    try:
        with rt.autocast():
            losses = task.loss(adapted.model, batch)  # (batch,)
        hooked = [k for k in active if k in rt.hooks.fused]
        torch.autograd.grad(losses.sum(), list(params.values()))  # fills the hooks
        per_sample = rt.hooks.fused_grads(hooked)
    finally:
        rt.hooks.enabled = False
        rt.hooks.clear()
    others = [k for k in active if k not in rt.hooks.fused]
    if others:  # exact fallback, one example at a time
        from fedlora.privacy.dpsgd import loop_per_sample  # noqa: PLC0415

        sub = {k: adapted.params[k] for k in others}

        def loss_of(i: torch.Tensor) -> torch.Tensor:
            with rt.autocast():
                return task.loss(adapted.model, {k: v[i] for k, v in batch.items()})

        per_sample.update(loop_per_sample(sub, loss_of, len(rows)))
    return privatize(per_sample, spec.dp, noise), float(losses.detach().float().mean())


def run_client(
    rt: Runtime,
    method: Method,
    plan: RoundPlan,
    download: State,
    spec: ClientSpec,
    state: ClientState,
    *,
    local_steps: int,
    seed: int,
) -> ClientResult:
    adapted = rt.adapted
    adapted.load(download)
    adapted.load(state.local)
    adapted.model.train()
    before = adapted.state(sorted(plan.trainable))
    trainable = [adapted.params[k] for k in sorted(plan.trainable)]
    optimizer = _optimizer(trainable, rt.cfg.train)  # fresh every round
    gen = generator(seed, "client", spec.cid, plan.round)  # Poisson sampling (CPU stream)
    noise = spec.noise(seed, plan.round, rt.device)
    last: State = {}
    losses, examples = [], 0
    for step in range(local_steps):
        active = sorted(method.schedule.active(plan, step))
        adapted.set_active(set(active))
        rows = poisson_batch(len(spec.indices), spec.sample_rate, gen)
        grads, loss = local_gradients(rt, spec, rows, active, noise)
        grads = method.schedule.transform(grads, plan, step)
        optimizer.zero_grad(set_to_none=True)  # inactive tensors keep grad=None: no state advance
        for k, g in grads.items():
            adapted.params[k].grad = g
        if method.reads_private_data and step == local_steps - 1:  # NOT covered by DP (private_probe.py)
            probe_point = (spec.indices[rows], adapted.state(active))
        optimizer.step()
        last, examples = grads, examples + len(rows)
        if not np.isnan(loss):
            losses.append(loss)
    adapted.set_active(set(adapted.params))
    after = adapted.state(sorted(plan.trainable))
    noise_std = spec.dp.noise_multiplier * spec.dp.clip_norm / spec.dp.expected_batch_size if spec.dp else 0.0
    trace = ClientTrace(last, noise_std, local_steps, rt.cfg.train.lr)
    if method.reads_private_data:
        from fedlora.federation.private_probe import loss_probe  # noqa: PLC0415

        trace.probe = loss_probe(rt, *probe_point)
    upload = method.upload(plan, before, after, trace)
    local = {**state.local, **{k: after[k] for k in state.local if k in after}}
    new_state = ClientState(local, state.dp_steps + (local_steps if spec.dp else 0))
    return ClientResult(upload, new_state, local_steps, float(np.mean(losses)) if losses else float("nan"), examples)
