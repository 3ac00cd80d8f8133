"""The client function: global download + local state in, upload + local state out.

One round on one client: load what the server sent and what the client kept, run the
method's local schedule for T DP-SGD steps (Poisson sampling, per-sample clipping of the
active tensors, Gaussian noise), and return the method's upload. The in-process engine and
the Flower ClientApp call this same function.

:class:`ClientNode` is the client's side of the trust boundary: one object per client (in a
deployment it lives only on its node) holding its spec (its data rows, its own sigma from its
own size and privacy config), its kept state and step budget. It checks every request before
running it (downloads: only declared adapter keys, exact shapes, floating dtypes, never a
backbone weight or a local-only tensor; plans: trainable keys of this adapter only; budget: no
round past it) and lets only the method's declared upload keys leave. Under DP nothing else
leaves: no training loss, no realised batch sizes (docs/privacy.md lists what is released).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedlora.devices import non_finite
from fedlora.errors import Refused
from fedlora.federation.runtime import Runtime
from fedlora.federation.signal import SignalMeter, signal_groups
from fedlora.methods.base import ClientTrace, Method, RoundPlan, State
from fedlora.privacy.dpsgd import DPParams, privatize, sum_by_record
from fedlora.privacy.noise import NoiseSource, noise_stream
from fedlora.schedule import round_scale
from fedlora.seeds import generator, seeded_torch


@dataclass(frozen=True)
class ClientSpec:
    """A client's fixed facts: its data indices and its public DP parameters."""

    cid: int
    indices: np.ndarray  # rows of the task's training set
    sample_rate: float  # Poisson rate q
    dp: DPParams | None  # None: non-private
    step_budget: int  # most DP steps within its (epsilon, delta) target
    reproducible_noise: bool = False  # True: noise seeded from the config (NOT private against its holders)

    def stream(self, seed: int, rnd: int, attempt: int = 0) -> tuple[object, ...]:
        """The seed parts of this client's round (attempt 0 is the first try; a retry draws new batches)."""
        return (seed, "client", self.cid, rnd, *((("attempt", attempt),) if attempt else ()))

    def noise(self, seed: int, rnd: int, attempt: int = 0) -> NoiseSource:
        """The DP noise of this client's round: secure randomness unless reproducible noise was asked for.

        A reproducible stream is drawn on the CPU whatever the model's device (each draw then moves to
        the tensor's device, privacy/noise.py), so a seeded run gives the same noise on cuda and on cpu."""
        return noise_stream(self.reproducible_noise, *self.stream(seed, rnd, attempt))

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
    loss: float  # mean training loss over the round's batches (never released under DP)
    examples: int  # examples the round touched (sum of batch sizes; never released under DP)
    signal: dict[str, float] | None = None  # eval.signal_diagnostics (federation/signal.py); None when off


def round_lr_scale(cfg, round_: int, rounds: int) -> float:
    """The factor ``train.lr_schedule`` (``cfg``: the train section) puts on every local learning
    rate in round ``round_`` (1-based) of ``rounds`` (fedlora/schedule.py)."""
    return round_scale(cfg.lr_schedule, round_, rounds, cfg.lr_final_fraction)


def _optimizer(params: list[torch.nn.Parameter], cfg, head: list[bool] | None = None,
               scale: float = 1.0) -> torch.optim.Optimizer:
    """The local optimizer; with ``train.head_lr`` the head's tensors (``head``: one flag per
    parameter) form a second parameter group at that rate (post-processing: no privacy cost).
    ``scale``: this round's factor on every rate (:func:`round_lr_scale`)."""
    lr = cfg.lr * scale
    groups: list | list[dict] = params
    if cfg.head_lr is not None and head is not None and any(head):
        rest = [p for p, h in zip(params, head, strict=True) if not h]
        heads = [p for p, h in zip(params, head, strict=True) if h]
        groups = ([{"params": rest}] if rest else []) + [{"params": heads, "lr": cfg.head_lr * scale}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)


def head_names(rt: Runtime) -> frozenset[str]:
    return frozenset(f.name for f in rt.adapted.factors if f.role == "head")


def clip_groups(rt: Runtime) -> dict[str, str]:
    """Tensor name -> its per-group clipping group ('head' | 'adapter'; privacy/dpsgd.py)."""
    return {f.name: "head" if f.role == "head" else "adapter" for f in rt.adapted.factors}


def dp_step_options(rt: Runtime, spec: ClientSpec, signal: dict[str, float] | None) -> dict:
    """privatize's keyword options for this client: the group map under per-group clipping, the
    exact signal's sink, the compiled clip + sum under train.compile; none in the default flat step (whose
    call is exactly privatize(g, dp, noise))."""
    kw: dict = {}
    if rt.kernels is not None:
        kw["kernels"] = rt.kernels
    if spec.dp is not None and spec.dp.head_clip_fraction is not None:
        kw["groups"] = clip_groups(rt)
    if signal is not None:
        kw["signal"] = signal
    return kw


def poisson_batch(n: int, rate: float, gen: torch.Generator) -> np.ndarray:
    """Indices 0..n-1 each kept independently with probability ``rate``.

    Sampling stays on the CPU (``gen`` is a CPU generator, the same stream on every device):
    the rows index the task's host-side examples, and no device sync is needed to know them."""
    return torch.nonzero(torch.rand(n, generator=gen) < rate).flatten().numpy()


def local_gradients(rt: Runtime, spec: ClientSpec, rows: np.ndarray, active: list[str], noise: NoiseSource,
                    dropout: tuple[object, ...] = (), signal: dict[str, float] | None = None,
                    ) -> tuple[State, torch.Tensor | None]:
    """One step's gradient of the active tensors: privatised with DP, plain mean without.
    ``dropout``: the seed parts of this step's dropout masks (client, round, attempt, step).
    ``signal``: filled with the clipped sum's squared norms (NOT private; eval.signal_diagnostics=exact).

    The second value is the batch's mean loss as a 0-d tensor on the device, without DP only
    (None under DP, where the loss is never released, and for an empty batch): no host sync."""
    with seeded_torch(*dropout, "dropout", device=rt.device):
        return _local_gradients(rt, spec, rows, active, noise, signal)


def _local_gradients(rt: Runtime, spec: ClientSpec, rows: np.ndarray, active: list[str],
                     noise: NoiseSource, signal: dict[str, float] | None = None) -> tuple[State, torch.Tensor | None]:
    adapted, task = rt.adapted, rt.task
    params = {k: adapted.params[k] for k in active}
    kw = dp_step_options(rt, spec, signal)
    if len(rows) == 0:
        zero = {k: torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype) for k, p in params.items()}
        return (privatize(zero, spec.dp, noise, **kw) if spec.dp
                else {k: torch.zeros_like(p) for k, p in params.items()}), None
    batch = task.batch(task.train, spec.indices[rows], rt.device)
    if spec.dp is None:
        with rt.autocast():
            losses = task.loss(adapted.model, batch)
        grads = torch.autograd.grad(losses.mean(), list(params.values()))
        return dict(zip(params, grads, strict=True)), losses.detach().mean()
    rt.hooks.enabled = True
    try:
        with rt.autocast():
            losses = task.loss(adapted.model, batch)  # (batch,)
        hooked = [k for k in active if k in rt.hooks.fused]
        torch.autograd.grad(losses.sum(), list(params.values()))  # fills the hooks
        per_sample = rt.hooks.fused_grads(hooked, rt.kernels)
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

        per_sample.update(loop_per_sample(sub, loss_of, len(losses)))
    if "record" in batch:  # several rows per example (QA windows): one clipped contribution per example
        per_sample = sum_by_record(per_sample, batch["record"], len(rows))
    return privatize(per_sample, spec.dp, noise, **kw), None  # the loss is not released under DP


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
    attempt: int = 0,
) -> ClientResult:
    adapted = rt.adapted
    adapted.load(download)
    adapted.load(state.local)
    adapted.model.train()
    before = adapted.state(sorted(plan.trainable))
    trainable = [adapted.params[k] for k in sorted(plan.trainable)]
    heads = head_names(rt)
    scale = round_lr_scale(rt.cfg.train, plan.round, rt.cfg.federation.rounds)
    optimizer = _optimizer(trainable, rt.cfg.train, [k in heads for k in sorted(plan.trainable)], scale)  # fresh every round
    stream = spec.stream(seed, plan.round, attempt)
    gen = generator(*stream)  # Poisson sampling (CPU stream)
    noise = spec.noise(seed, plan.round, attempt)
    last: State = {}
    losses: list[torch.Tensor] = []  # device scalars, without DP only: one host sync per round
    examples = 0
    noise_std = spec.dp.noise_multiplier * spec.dp.clip_norm / spec.dp.expected_batch_size if spec.dp else 0.0
    meter = signal_meter(rt)
    for step in range(local_steps):
        active = sorted(method.schedule.active(plan, step))
        adapted.set_active(set(active))
        rows = poisson_batch(len(spec.indices), spec.sample_rate, gen)
        exact = {} if meter is not None and meter.mode == "exact" and spec.dp else None
        grads, loss = local_gradients(rt, spec, rows, active, noise, (*stream, "step", step), exact)
        if meter is not None:  # before the schedule's transform: the DP step's own output
            meter.step(grads, noise_std, exact, spec.expected_batch if spec.dp else 1.0)
        grads = method.schedule.transform(grads, plan, step)
        optimizer.zero_grad(set_to_none=True)  # inactive tensors keep grad=None: no state advance
        for k, g in grads.items():
            adapted.params[k].grad = g
        if method.reads_private_data and step == local_steps - 1:  # NOT covered by DP (private_probe.py)
            probe_point = (spec.indices[rows], adapted.state(active))
        optimizer.step()
        last, examples = grads, examples + len(rows)
        if loss is not None:
            losses.append(loss)
    adapted.set_active(set(adapted.params))
    after = adapted.state(sorted(plan.trainable))
    trace = ClientTrace(last, noise_std, local_steps, rt.cfg.train.lr)
    if method.reads_private_data:
        from fedlora.federation.private_probe import loss_probe  # noqa: PLC0415

        trace.probe = loss_probe(rt, *probe_point)
    upload = method.upload(plan, before, after, trace)
    local = {**state.local, **{k: after[k] for k in state.local if k in after}}
    new_state = ClientState(local, state.dp_steps + (local_steps if spec.dp else 0))
    mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
    return ClientResult(upload, new_state, local_steps, mean_loss, examples,
                        meter.result() if meter is not None else None)


def signal_meter(rt: Runtime) -> SignalMeter | None:
    """The round's signal diagnostic (eval.signal_diagnostics), or None when it is off."""
    mode = rt.cfg.eval.signal_diagnostics
    return None if mode == "off" else SignalMeter(mode, signal_groups(rt.adapted.factors))


def weaker_privacy(own, asked) -> str | None:
    """Why the privacy config ``asked`` (e.g. the one a server sends) is weaker than a node's ``own``
    (both :class:`~fedlora.config.PrivacyConfig`); None when it is at least as strong."""
    if not own.enabled:
        return None
    if not asked.enabled:
        return "privacy.enabled=false"
    if asked.epsilon > own.epsilon:
        return f"privacy.epsilon={asked.epsilon:g} > {own.epsilon:g}"
    if asked.delta > own.delta:
        return f"privacy.delta={asked.delta:g} > {own.delta:g}"
    if asked.clip_norm > own.clip_norm:
        return f"privacy.clip_norm={asked.clip_norm:g} > {own.clip_norm:g}"
    if asked.max_sample_rate > own.max_sample_rate:
        return f"privacy.max_sample_rate={asked.max_sample_rate:g} > {own.max_sample_rate:g}"
    if asked.reproducible_noise and not own.reproducible_noise:
        return "privacy.reproducible_noise=true"
    if own.noise_multiplier is not None and (asked.noise_multiplier or 0.0) < own.noise_multiplier:
        return f"privacy.noise_multiplier={asked.noise_multiplier} < {own.noise_multiplier:g}"
    return None


class ClientNode:
    """One client's side of the trust boundary: its data rows, privacy, kept state and budget."""

    def __init__(self, rt: Runtime, method: Method, spec: ClientSpec, init_local: State, *,
                 downloadable: State, local_steps: int, seed: int) -> None:
        """``downloadable``: the tensors (name -> value, for shape and dtype) this client accepts from the
        server: the adapter's shared tensors, plus the frozen base weights only for methods that share them."""
        self.rt, self.method, self.spec = rt, method, spec
        self.local_steps, self.seed = local_steps, seed
        self.shapes = {k: (tuple(v.shape), v.dtype) for k, v in downloadable.items()}
        self.local_keys = frozenset(init_local)
        self.state = ClientState({k: v.clone() for k, v in init_local.items()})

    @property
    def cid(self) -> int:
        return self.spec.cid

    # ------------------------------------------------------------------ checks of what comes in
    def check_download(self, download: State) -> None:
        bad = non_finite(download)  # one host sync for the whole download
        for k, v in download.items():
            if k in self.local_keys:
                raise Refused(f"client {self.cid} refused the download: '{k}' is kept on the client")
            if k not in self.shapes:
                raise Refused(f"client {self.cid} refused the download: '{k}' is not a shared adapter tensor")
            shape, dtype = self.shapes[k]
            if tuple(v.shape) != shape or v.dtype != dtype or k in bad:
                raise Refused(f"client {self.cid} refused the download: '{k}' is {tuple(v.shape)} {v.dtype} "
                              f"(expected {shape} {dtype}, finite)")

    def check_plan(self, plan: RoundPlan) -> None:
        trainable = set(self.rt.adapted.params)
        if not set(plan.trainable) <= trainable:
            bad = sorted(set(plan.trainable) - trainable)[0]
            raise Refused(f"client {self.cid} refused the plan: '{bad}' is not a trainable adapter tensor")
        sent_back = sorted(set(plan.download) & self.local_keys)
        if sent_back:
            raise Refused(f"client {self.cid} refused the plan: it would upload '{sent_back[0]}', which is kept on the client")
        if self.spec.dp is not None and self.state.dp_steps + self.local_steps > self.spec.step_budget:
            raise Refused(f"client {self.cid} refused round {plan.round}: {self.local_steps} more steps would pass its "
                          f"privacy budget ({self.state.dp_steps} of {self.spec.step_budget} steps spent)")

    def check_upload(self, upload: State) -> None:
        side = self.method.side_uploads
        for k in upload:
            if k in self.local_keys or (k not in self.shapes and not k.startswith(side or ("\0",))):
                raise Refused(f"client {self.cid} will not upload '{k}': the method does not declare it uploadable")

    # ------------------------------------------------------------------ one round
    def train(self, plan: RoundPlan, download: State, *, local_steps: int | None = None, commit: bool = True,
              attempt: int = 0) -> ClientResult:
        """Check the request, run the round, keep the new state (``commit``) and return what may leave.

        Under DP the result's loss is NaN and its example count 0: neither is released."""
        self.check_plan(plan)
        self.check_download(download)
        res = run_client(self.rt, self.method, plan, download, self.spec, self.state,
                         local_steps=self.local_steps if local_steps is None else local_steps, seed=self.seed,
                         attempt=attempt)
        self.check_upload(res.upload)
        if commit:
            self.state = res.state
        if self.spec.dp is not None:
            res = ClientResult(res.upload, res.state, res.steps, float("nan"), 0, res.signal)
        return res

    def charge(self, steps: int) -> None:
        """Count DP steps that ran in a failed attempt (a noisy step touched the data, used or not)."""
        if self.spec.dp is not None:
            self.state = ClientState(self.state.local, self.state.dp_steps + steps)

    def personal_accuracy(self, global_state: State, share) -> tuple[float, int]:
        """This client's model (global + its local tensors) on its test share: (accuracy, examples)."""
        if not len(share):
            return 0.0, 0
        acc = self.rt.evaluate({**global_state, **self.state.local}, self.rt.task.test.subset(share))["accuracy"]
        return float(acc), len(share)
