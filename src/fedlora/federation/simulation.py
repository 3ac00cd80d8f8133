"""The in-process engine: the round loop, written once against the four seams.

Each round: the method plans, the server samples clients, every sampled client runs
:func:`run_client` from the global download and its own kept state, the method aggregates,
the server evaluates, and the round is logged (metrics, privacy ledger) and checkpointed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlora.config import ExperimentConfig
from fedlora.errors import BudgetExhausted, ConfigError
from fedlora.federation.batched import train_batched
from fedlora.federation.client import ClientResult, ClientSpec, ClientState
from fedlora.federation.clients_per_pass import engine_k
from fedlora.federation.diagnostics import round_diagnostics
from fedlora.federation.faults import ClientsFailed, run_clients
from fedlora.federation.partition import label_histograms, partition
from fedlora.federation.runtime import Runtime
from fedlora.seeds import derive_seed
from fedlora.federation.server import aggregate_round, sample_clients, state_bytes
from fedlora.methods import Method, MethodSetup, PlanContext
from fedlora.methods.base import State
from fedlora.methods.compose import compose_method
from fedlora.privacy.accounting import calibrate_noise, epsilon, step_budget
from fedlora.privacy.dpsgd import DPParams
from fedlora.privacy.user_level import UserLevelPlan, plan_user_level
from fedlora.report.rundir import RunDir
from fedlora.tasks import majority_rate


@dataclass
class RunResult:
    rounds_done: int
    metrics: list[dict[str, Any]]
    global_state: State
    stop_reason: str | None
    seconds: float

    @property
    def final(self) -> dict[str, Any]:
        evaluated = [m for m in self.metrics if "accuracy" in m]
        return evaluated[-1] if evaluated else {}


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
        specs.append(ClientSpec(cid, idx, q, DPParams(sigma, dp.clip_norm, q * len(idx)), budget, dp.reproducible_noise))
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
                           delta=cfg.privacy.delta, clients_per_round=k, num_clients=fed.num_clients, rounds=fed.rounds)


class Simulation:
    """All clients in one process, sharing one frozen backbone."""

    def __init__(self, cfg: ExperimentConfig, run_dir: RunDir | None = None, runtime: Runtime | None = None, *,
                 extra_rows: dict[int, np.ndarray] | None = None, held_out_rows: np.ndarray | None = None) -> None:
        """``extra_rows``: training-set rows added to a client's data after partitioning (audit canaries);
        ``held_out_rows``: rows no client gets. Both are left out of the partition."""
        self.cfg = cfg
        self.run_dir = run_dir
        self.method = build_method_for(cfg)
        self.user_dp = user_level_for(cfg)
        if self.user_dp is not None:  # privatise every upload before the method aggregates
            self.method = self.user_dp.wrap(self.method, seed=cfg.train.seed, reproducible_noise=cfg.privacy.reproducible_noise)
        self.rt = runtime or Runtime(cfg)
        fed = cfg.federation
        labels = self.rt.task.train.labels
        extra = extra_rows or {}
        reserved = np.concatenate([np.zeros(0, np.int64), *extra.values(), *([held_out_rows] if held_out_rows is not None else [])])
        pool = np.setdiff1d(np.arange(len(labels)), reserved)  # every row when nothing is reserved
        parts = partition(labels[pool], scheme=fed.partition, num_clients=fed.num_clients,
                          alpha=fed.dirichlet_alpha, seed=cfg.train.seed, min_size=fed.min_client_size)
        self.parts = [np.sort(np.concatenate([pool[p], np.asarray(extra.get(c, []), np.int64)])) for c, p in enumerate(parts)]
        self.histograms = label_histograms(labels, self.parts, self.rt.task.num_labels)
        self.specs = client_specs(cfg, self.parts)
        bases = self.rt.adapted.base_weight_names() if self.method.shares_base else []
        init = self.rt.adapted.state([*self.rt.adapted.params, *bases])  # factors (+ W0 for exact baselines)
        factors = self.rt.adapted.factors
        self.local_keys = frozenset(f.name for f in factors if f.role in self.method.local_roles)
        self.init_local = {k: init[k] for k in sorted(self.local_keys)}
        self.global_state: State = {k: v for k, v in init.items() if k not in self.local_keys}
        self.clients = [ClientState({k: v.clone() for k, v in self.init_local.items()}) for _ in self.specs]
        self.shares = split_test_set(self.rt.task.test.labels, self.histograms, cfg.train.seed) if self.local_keys else []
        self.memory: dict[str, Any] = {}
        self.round_faults: dict[str, Any] = {}  # the last round's failed clients (federation/faults.py)
        self.batched_k = engine_k(self)  # clients per pass, 0: one after another (federation/clients_per_pass.py)
        self.round = 0
        self.metrics: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ reporting
    def ledger(self) -> list[dict[str, Any]]:
        dp = self.cfg.privacy
        rows = []
        for spec, state in zip(self.specs, self.clients, strict=True):
            sigma = spec.dp.noise_multiplier if spec.dp else None
            eps = epsilon([(sigma, spec.sample_rate, state.dp_steps)], delta=dp.delta, accountant=dp.accountant) if spec.dp else None
            rows.append({"client": spec.cid, "examples": len(spec.indices), "epsilon": eps,
                         "delta": dp.delta if spec.dp else None, "sigma": sigma,
                         "sample_rate": spec.sample_rate, "steps": state.dp_steps,
                         "step_budget": spec.step_budget, "accountant": dp.accountant if spec.dp else None})
        return rows

    def guarantees(self, rounds: int) -> str:
        """Which privacy guarantees hold after ``rounds`` rounds, in words."""
        dp, held = self.cfg.privacy, []
        if dp.enabled:
            held.append(f"sample-level (epsilon <= {dp.epsilon:g} per client, delta {dp.delta:g}, {dp.accountant})")
        if self.user_dp is not None:
            held.append(f"user-level (epsilon {self.user_dp.epsilon(rounds):.3g} for all of a client's data, delta {dp.delta:g}, rdp)")
        text = " and ".join(held) if held else "none (no DP)"
        if self.method.reads_private_data:  # e.g. as-lora curvature=finite-difference
            text += f"; NOT covered by the DP guarantee: {self.method.reads_private_data}"
        return text

    def describe(self) -> dict[str, Any]:
        return {"method": self.method.name, "clients": [len(p) for p in self.parts],
                "label_histograms": self.histograms,
                "majority_rate": majority_rate(self.rt.task.test.labels),
                "trainable_parameters": int(sum(self.rt.adapted.params[k].numel() for k in self.rt.adapted.params)),
                "dp": self.cfg.privacy.enabled,
                "sigma": [s.dp.noise_multiplier if s.dp else None for s in self.specs],
                **({"client_majority_rate": self.client_majority_rate()} if self.shares else {})}

    def client_majority_rate(self) -> float:
        """Yardstick for personal accuracy: each client predicts its own test share's majority label."""
        labels = self.rt.task.test.labels
        hits = sum(int(np.bincount(labels[s]).max()) for s in self.shares if len(s))
        return hits / max(sum(len(s) for s in self.shares), 1)

    def evaluate(self) -> dict[str, float]:
        self.rt.adapted.load(self.init_local)
        record = self.rt.evaluate(self.global_state)
        if self.local_keys:
            record["personal_accuracy"] = self.personal_accuracy()
        return record

    def personal_accuracy(self) -> float:
        """Each client's own model (global state + its local tensors) on its own test share,
        averaged with weights = share sizes."""
        test, correct, total = self.rt.task.test, 0.0, 0
        for share, client in zip(self.shares, self.clients, strict=True):
            if len(share):
                acc = self.rt.evaluate({**self.global_state, **client.local}, test.subset(share))["accuracy"]
                correct, total = correct + acc * len(share), total + len(share)
        self.rt.adapted.load(self.init_local)
        return correct / max(total, 1)

    # ------------------------------------------------------------------ one round
    def plan_context(self, rnd: int) -> PlanContext:
        return PlanContext(rnd, self.cfg.federation.rounds, self.rt.adapted.factors, sorted(self.global_state),
                           self.local_keys, self.memory, self.cfg.train.seed)

    def run_round(self, rnd: int) -> dict[str, Any]:
        fed, seed = self.cfg.federation, self.cfg.train.seed
        start = time.perf_counter()
        ctx = self.plan_context(rnd)
        plan = self.method.plan(ctx)
        sampled = sample_clients(fed.num_clients, fed.clients_per_round, seed=seed, round=rnd)
        over = [c for c in sampled if self.clients[c].dp_steps + fed.local_steps > self.specs[c].step_budget]
        if over:
            raise BudgetExhausted(
                f"stopped before round {rnd}: client {over[0]} would pass its epsilon={self.cfg.privacy.epsilon} "
                f"target (budget {self.specs[over[0]].step_budget} steps); lower rounds or fix the noise lower"
            )
        download = {k: self.global_state[k] for k in plan.download}
        sampled, results = self.train_clients(plan, download, sampled)
        uploads = [r.upload for r in results]
        sizes = [len(self.specs[c].indices) for c in sampled]
        before = self.global_state
        self.global_state = aggregate_round(self.method, ctx, plan, self.global_state, uploads, sizes, fed.weighting)
        record: dict[str, Any] = {
            "round": rnd,
            "clients": sampled,
            "train_loss": float(np.nanmean([r.loss for r in results])) if results else None,
            "bytes_up": sum(state_bytes(u) for u in uploads),
            "bytes_down": state_bytes(download) * len(sampled),
            **self.round_faults,
        }
        if rnd % self.cfg.eval.every == 0 or rnd == fed.rounds:
            record.update(self.evaluate())
        ledger = self.ledger()
        eps = [row["epsilon"] for row in ledger if row["epsilon"] is not None]
        record["epsilon"] = max(eps) if eps else None
        record["user_epsilon"] = self.user_dp.epsilon(rnd) if self.user_dp else None
        record["guarantees"] = self.guarantees(rnd)
        record["privacy"] = ledger
        record.update({f"plan_{k}": v for k, v in plan.info.items()})
        record.update(round_diagnostics(self, rnd, ctx, plan, before, uploads, sizes))
        record["seconds"] = time.perf_counter() - start
        return record

    def train_clients(self, plan, download: State, sampled: list[int]) -> tuple[list[int], list[ClientResult]]:
        """Run the sampled clients; returns the clients that answered and their results (a client
        that raises, times out or uploads non-finite values is dropped, the round retried or stopped:
        federation/faults.py). The Flower server (fedlora.flower) replaces this with messages to SuperNodes."""
        if self.batched_k:
            answered, results, self.round_faults = train_batched(self, plan, download, sampled, self.batched_k)
            return answered, results
        answered, results, self.round_faults = run_clients(self, plan, download, sampled, plan.round)
        return answered, results

    # ------------------------------------------------------------------ the loop
    def run(self, on_round: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
        t0 = time.perf_counter()
        stop_reason = None
        for rnd in range(self.round + 1, self.cfg.federation.rounds + 1):
            try:
                record = self.run_round(rnd)
            except (BudgetExhausted, ClientsFailed) as err:
                stop_reason = str(err)
                break
            self.round = rnd
            self.metrics.append(record)
            if self.run_dir is not None:
                self.run_dir.append_metrics(record)
                if rnd % self.cfg.output.checkpoint_every == 0 or rnd == self.cfg.federation.rounds:
                    self.checkpoint(rnd)
            if on_round is not None:
                on_round(record)
        return RunResult(self.round, self.metrics, self.global_state, stop_reason, time.perf_counter() - t0)

    # ------------------------------------------------------------------ persistence
    def save_adapter(self, directory) -> None:
        """The global adapter in PEFT format (local-only tensors at their initial values)."""
        self.rt.adapted.load(self.init_local)
        self.rt.adapted.load(self.global_state)
        self.rt.adapted.save_pretrained(directory)

    def checkpoint(self, rnd: int) -> None:
        from fedlora.federation.checkpoint import save_checkpoint  # noqa: PLC0415

        assert self.run_dir is not None
        save_checkpoint(self, self.run_dir.checkpoint_dir(rnd))
        self.run_dir.prune_checkpoints(self.cfg.output.keep_checkpoints, self.cfg.output.keep_every)

    def restore(self, state: dict[str, Any], metrics: list[dict[str, Any]] | None = None) -> None:
        """Continue from a checkpoint's federation state (see federation/checkpoint.py)."""
        from fedlora.federation.checkpoint import restore  # noqa: PLC0415

        restore(self, state, metrics)


def as_cpu(state: State) -> State:
    return {k: v.detach().to("cpu") for k, v in state.items()}


__all__ = ["RunResult", "Simulation", "as_cpu", "torch"]
