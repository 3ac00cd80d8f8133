"""The in-process engine: the server's side and every client's side in one process.

The round loop is :class:`~fedlora.federation.server.Server` (plan, sample, validate, aggregate,
evaluate, ledger); each client is a :class:`~fedlora.federation.client.ClientNode` (its rows, its
sigma, its state and budget); :class:`InProcessClients` is the runner between them. This module
builds both sides from one config (the partition is drawn here, where every client's data lives)
and keeps the old single-object view (``sim.specs``, ``sim.clients``, ``sim.global_state``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedlora.config import ExperimentConfig
from fedlora.errors import ConfigError
from fedlora.federation.batched import train_batched
from fedlora.federation.client import ClientNode, ClientSpec, ClientState
from fedlora.federation.clients_per_pass import engine_k
from fedlora.federation.faults import run_clients
from fedlora.federation.partition import label_histograms, partition
from fedlora.federation.runtime import Runtime
from fedlora.federation.server import ClientFacts, RoundOutcome, RunResult, Server, sample_clients
from fedlora.methods import Method, MethodSetup, PlanContext
from fedlora.methods.base import State
from fedlora.methods.compose import compose_method
from fedlora.privacy.accounting import calibrate_noise, step_budget
from fedlora.privacy.dpsgd import DPParams
from fedlora.privacy.user_level import UserLevelPlan, plan_user_level
from fedlora.seeds import derive_seed
from fedlora.tasks import build_task, majority_rate

if TYPE_CHECKING:
    from fedlora.report.rundir import RunDir


def build_method_for(cfg: ExperimentConfig) -> Method:
    setup = MethodSetup(cfg.method.options, cfg.adapter.federate_head, cfg.federation.rounds, cfg.train.seed,
                        adapter=cfg.adapter)
    seams = {"plan": cfg.method.plan, "schedule": cfg.method.schedule, "upload": cfg.method.upload,
             "aggregate": cfg.method.aggregate}
    return compose_method(cfg.method.name, seams, setup)  # the named method, seams replaced where set


def client_specs(cfg: ExperimentConfig, parts: list[np.ndarray]) -> list[ClientSpec]:
    """Poisson rate and calibrated sigma per client (its own size, its own sigma)."""
    fed, dp = cfg.federation, cfg.privacy
    planned = fed.rounds * fed.local_steps  # worst case: sampled every round
    specs = []
    for cid, idx in enumerate(parts):
        q = min(cfg.train.batch_size / len(idx), dp.max_sample_rate)
        if not dp.enabled:
            specs.append(ClientSpec(cid, idx, q, None, planned))
            continue
        common = {"target_epsilon": dp.epsilon, "target_delta": dp.delta, "accountant": dp.accountant}
        if dp.noise_multiplier is None:
            sigma, budget = calibrate_noise(sample_rate=q, steps=planned, **common), planned
        else:
            sigma = dp.noise_multiplier
            budget = step_budget(noise_multiplier=sigma, sample_rate=q, max_steps=planned, **common)
            if budget < fed.local_steps:
                raise ConfigError(f"privacy.epsilon={dp.epsilon:g} is too small for one round of {fed.local_steps} steps at "
                                  f"noise_multiplier={sigma:g} (client {cid} allows {budget}); raise privacy.epsilon or the noise")
        head_f = dp.head_clip_fraction if dp.clipping == "per-group" else None
        specs.append(ClientSpec(cid, idx, q, DPParams(sigma, dp.clip_norm, q * len(idx), head_f), budget,
                                dp.reproducible_noise))
    return specs


def split_test_set(labels: np.ndarray, histograms: list[list[int]], seed: int) -> list[np.ndarray]:
    """Split the test set over clients, each share following its client's training label mix.

    For personalised evaluation (FedSA-LoRA): per label, the test examples are dealt out in
    proportion to the clients' training counts of that label (seeded; the rounding remainder
    goes to the client holding most of that label).
    """
    rng = np.random.default_rng(derive_seed(seed, "test-shares"))
    hist = np.asarray(histograms, dtype=np.float64)  # (clients, labels)
    shares: list[list[np.ndarray]] = [[] for _ in histograms]
    for y in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == y))
        col = hist[:, y] if y < hist.shape[1] and hist[:, y].sum() > 0 else np.ones(len(hist))
        counts = np.floor(len(idx) * col / col.sum()).astype(int)
        counts[np.argmax(col)] += len(idx) - counts.sum()
        for c, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            shares[c].append(chunk)
    return [np.sort(np.concatenate(s)) for s in shares]


def user_level_for(cfg: ExperimentConfig) -> UserLevelPlan | None:
    """User-level DP's sigma_u for the run, or None when it is off."""
    ul, fed = cfg.privacy.user_level, cfg.federation
    if not ul.enabled:
        return None
    k = len(sample_clients(fed.num_clients, fed.clients_per_round, seed=cfg.train.seed, round=1))
    return plan_user_level(clip_norm=ul.clip_norm, target_epsilon=ul.epsilon, noise_multiplier=ul.noise_multiplier,
                           delta=cfg.privacy.delta, clients_per_round=k, num_clients=fed.num_clients, rounds=fed.rounds,
                           server_lr=ul.server_lr)


def method_and_user_dp(cfg: ExperimentConfig) -> tuple[Method, UserLevelPlan | None]:
    """The run's method, wrapped by user-level DP (which privatises every upload before the method
    aggregates) when that is on, and the user-level plan (None: off)."""
    method, user_dp = build_method_for(cfg), user_level_for(cfg)
    if user_dp is not None:
        method = user_dp.wrap(method, seed=cfg.train.seed, reproducible_noise=cfg.privacy.reproducible_noise,
                              lr_schedule=cfg.train.lr_schedule, lr_final_fraction=cfg.train.lr_final_fraction)
    return method, user_dp


def initial_states(rt: Runtime, method: Method) -> tuple[frozenset[str], State, State]:
    """(local keys, their initial values, the initial global state) from the model's initialisation:
    every adapter tensor (+ W0 of adapted modules for methods that share it), split by the method's
    local roles (public: the same on every party, from the seed)."""
    bases = rt.adapted.base_weight_names() if method.shares_base else []
    init = rt.adapted.state([*rt.adapted.params, *bases])
    local_keys = frozenset(f.name for f in rt.adapted.factors if f.role in method.local_roles)
    return (local_keys, {k: init[k] for k in sorted(local_keys)},
            {k: v for k, v in init.items() if k not in local_keys})


class InProcessClients:
    """The in-process runner: every :class:`ClientNode` in this process, run one after another
    (with drops and retries, ``federation/faults.py``) or K per pass (``federation/batched.py``)."""

    def __init__(self, nodes: list[ClientNode], rt: Runtime, method: Method, cfg: ExperimentConfig,
                 shares: list[np.ndarray]) -> None:
        self.nodes, self.rt, self.method, self.cfg, self.shares = nodes, rt, method, cfg, shares
        self.batched_k = 0  # clients per pass, 0: one after another (set by the engine: clients_per_pass.engine_k)

    def train(self, plan, download: State, sampled: list[int]) -> RoundOutcome:
        if self.batched_k:
            return train_batched(self.nodes, self.rt, self.method, self.cfg, plan, download, sampled, self.batched_k)
        return run_clients(self.nodes, self.cfg, plan, download, sampled, plan.round)

    def personal_accuracy(self, global_state: State) -> float:
        """Each client's own model (global state + its local tensors) on its own test share,
        averaged with weights = share sizes."""
        correct = total = 0.0
        for node, share in zip(self.nodes, self.shares, strict=True):
            acc, n = node.personal_accuracy(global_state, share)
            correct, total = correct + acc * n, total + n
        return correct / max(total, 1)


class Simulation:
    """The in-process engine: every client's side and the server's side in one process, sharing one
    frozen backbone, composed through the runner interface (no side reaches into the other)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: RunDir | None = None, runtime: Runtime | None = None, *,
                 extra_rows: dict[int, np.ndarray] | None = None, held_out_rows: np.ndarray | None = None) -> None:
        """``extra_rows``: training-set rows added to a client's data after partitioning (audit canaries);
        ``held_out_rows``: rows no client gets. Both are left out of the partition."""
        self.cfg = cfg
        self.method, self.user_dp = method_and_user_dp(cfg)
        # Fail fast: everything that depends on the data only (partition, client sizes, sigma calibration)
        # is done before the model loads and the frozen prefix is cached (seconds to minutes).
        task = runtime.task if runtime is not None else build_task(cfg.task, cfg.train.seed)
        fed = cfg.federation
        labels = task.train.labels
        extra = extra_rows or {}
        reserved = np.concatenate([np.zeros(0, np.int64), *extra.values(), *([held_out_rows] if held_out_rows is not None else [])])
        pool = np.setdiff1d(np.arange(len(labels)), reserved)  # every row when nothing is reserved
        parts = partition(labels[pool], scheme=fed.partition, num_clients=fed.num_clients, alpha=fed.dirichlet_alpha,
                          seed=cfg.train.seed, min_size=fed.min_client_size, shards_per_client=fed.shards_per_client)
        self.parts = [np.sort(np.concatenate([pool[p], np.asarray(extra.get(c, []), np.int64)])) for c, p in enumerate(parts)]
        self.histograms = label_histograms(labels, self.parts, task.num_labels)
        specs = client_specs(cfg, self.parts)
        self.rt = runtime or Runtime(cfg, task=task)
        self.local_keys, self.init_local, global_state = initial_states(self.rt, self.method)
        self.nodes = [ClientNode(self.rt, self.method, spec, self.init_local, downloadable=global_state,
                                 local_steps=fed.local_steps, seed=cfg.train.seed) for spec in specs]
        self.shares = split_test_set(self.rt.task.test.labels, self.histograms, cfg.train.seed) if self.local_keys else []
        self.runner = InProcessClients(self.nodes, self.rt, self.method, cfg, self.shares)
        self.server = Server(cfg, self.method, self.rt, [facts_of(s) for s in specs], global_state,
                             local_keys=self.local_keys, init_local=self.init_local, user_dp=self.user_dp,
                             runner=self.runner)
        self.server.checkpoint = self.checkpoint
        self.run_dir = run_dir
        self.batched_k = self.runner.batched_k = engine_k(self)  # federation/clients_per_pass.py

    # ------------------------------------------------------------------ the two sides, as one object
    @property
    def run_dir(self) -> RunDir | None:
        return self.server.run_dir

    @run_dir.setter
    def run_dir(self, value: RunDir | None) -> None:
        self.server.run_dir = value

    @property
    def method(self) -> Method:
        return self._method

    @method.setter
    def method(self, method: Method) -> None:  # both sides run the same method (tests swap in spies)
        self._method = method
        for holder in (getattr(self, "server", None), getattr(self, "runner", None), *getattr(self, "nodes", [])):
            if holder is not None:
                holder.method = method

    @property
    def specs(self) -> list[ClientSpec]:
        return [n.spec for n in self.nodes]

    @specs.setter
    def specs(self, specs: list[ClientSpec]) -> None:  # the audit swaps the mechanism's DP parameters
        for node, spec in zip(self.nodes, specs, strict=True):
            node.spec = spec

    @property
    def clients(self) -> list[ClientState]:
        return [n.state for n in self.nodes]

    @clients.setter
    def clients(self, states: list[ClientState]) -> None:
        for node, state in zip(self.nodes, states, strict=True):
            node.state = state
        self.server.steps = [s.dp_steps for s in states]  # in one process the ledger equals the clients' own count

    @property
    def global_state(self) -> State:
        return self.server.global_state

    @global_state.setter
    def global_state(self, value: State) -> None:
        self.server.global_state = value

    @property
    def memory(self) -> dict[str, Any]:
        return self.server.memory

    @property
    def round(self) -> int:
        return self.server.round

    @round.setter
    def round(self, value: int) -> None:
        self.server.round = value

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return self.server.metrics

    @metrics.setter
    def metrics(self, value: list[dict[str, Any]]) -> None:
        self.server.metrics = value

    def ledger(self) -> list[dict[str, Any]]:
        return self.server.ledger()

    def guarantees(self, rounds: int) -> str:
        return self.server.guarantees(rounds)

    def plan_context(self, rnd: int) -> PlanContext:
        return self.server.plan_context(rnd)

    def run_round(self, rnd: int) -> dict[str, Any]:
        return self.server.run_round(rnd)

    def evaluate(self) -> dict[str, float]:
        return self.server.evaluate()

    def personal_accuracy(self) -> float:
        acc = self.runner.personal_accuracy(self.server.released_state)
        self.rt.adapted.load(self.init_local)
        return acc

    def run(self, on_round: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
        return self.server.run(on_round)

    # ------------------------------------------------------------------ reporting
    def describe(self) -> dict[str, Any]:
        return {"method": self.method.name, "method_variant": self.method.variant,
                "method_info": {k: v for k, v in self.method.info.items() if isinstance(v, str | bool | int | float)},
                "clients": [len(p) for p in self.parts],
                "label_histograms": self.histograms,
                "majority_rate": majority_rate(self.rt.task.test.labels),
                "trainable_parameters": int(sum(self.rt.adapted.params[k].numel() for k in self.rt.adapted.params)),
                "dp": self.cfg.privacy.enabled,
                "reproducible_noise": self.cfg.privacy.reproducible_noise,
                "sigma": [s.dp.noise_multiplier if s.dp else None for s in self.specs],
                "user_level": self.user_level_ledger(0),
                **({"client_majority_rate": self.client_majority_rate()} if self.shares else {})}

    def user_level_ledger(self, rounds: int) -> dict[str, Any] | None:
        """sigma_u, the client sampling rate and the user-level epsilon after ``rounds`` (None: off)."""
        return self.server.user_level_ledger(rounds)

    def client_majority_rate(self) -> float:
        """Yardstick for personal accuracy: each client predicts its own test share's majority label."""
        labels = self.rt.task.test.labels
        hits = sum(int(np.bincount(labels[s]).max()) for s in self.shares if len(s))
        return hits / max(sum(len(s) for s in self.shares), 1)

    # ------------------------------------------------------------------ persistence
    def save_adapter(self, directory) -> None:
        """The global adapter in PEFT format (local-only tensors at their initial values; the moving
        average under federation.server_ema)."""
        save_global_adapter(self.rt, self.init_local, self.server.released_state, directory)

    def checkpoint(self, rnd: int) -> None:
        from fedlora.federation.checkpoint import save_checkpoint  # noqa: PLC0415

        assert self.run_dir is not None
        save_checkpoint(self, self.run_dir.checkpoint_dir(rnd))
        self.run_dir.prune_checkpoints(self.cfg.output.keep_checkpoints, self.cfg.output.keep_every)

    def restore(self, state: dict[str, Any], metrics: list[dict[str, Any]] | None = None) -> None:
        """Continue from a checkpoint's federation state (see federation/checkpoint.py)."""
        from fedlora.federation.checkpoint import restore  # noqa: PLC0415

        restore(self, state, metrics)


def facts_of(spec: ClientSpec) -> ClientFacts:
    """The public facts of a client the server may hold (its size is released metadata)."""
    return ClientFacts(spec.cid, len(spec.indices), spec.dp.noise_multiplier if spec.dp else None,
                       spec.sample_rate, spec.step_budget)


def save_global_adapter(rt: Runtime, init_local: State, global_state: State, directory) -> None:
    """The global adapter in PEFT format (local-only tensors at their initial values)."""
    rt.adapted.load(init_local)
    rt.adapted.load(global_state)
    rt.adapted.save_pretrained(directory)


def as_cpu(state: State) -> State:
    return {k: v.detach().to("cpu") for k, v in state.items()}


__all__ = ["RunResult", "Simulation", "as_cpu", "torch"]
