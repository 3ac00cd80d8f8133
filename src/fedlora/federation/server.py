"""The server's side of the trust boundary: client sampling, weights, upload validation, aggregation.

The server holds the global state, the method's memory, the public facts of each client
(:class:`ClientFacts`) and a ledger of the DP steps it asked for; it never holds a client's data.
Engines reach the clients through a :class:`ClientRunner` (in-process sequential or batched,
Flower) and the round loop (``federation/rounds.py``) is written once against it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fedlora.devices import non_finite
from fedlora.errors import BudgetExhausted, ClientsFailed
from fedlora.federation.diagnostics import round_diagnostics
from fedlora.federation.signal import NOT_COVERED as SIGNAL_NOT_COVERED
from fedlora.methods.base import Method, PlanContext, RoundPlan, State
from fedlora.privacy.accounting import epsilon
from fedlora.privacy.noise import NOT_PRIVATE_WITH_CONFIG
from fedlora.seeds import derive_seed


def sample_clients(num_clients: int, fraction: float, *, seed: int, round: int) -> list[int]:
    """Clients of one round: all when fraction is 1, else a seeded uniform subset."""
    k = max(1, int(round_half_up(fraction * num_clients)))
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, "server", "sample", round))
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def aggregation_weights(sizes: list[int], scheme: str) -> list[float]:
    if scheme == "uniform":
        return [1.0 / len(sizes)] * len(sizes)
    total = float(sum(sizes))
    return [s / total for s in sizes]


def aggregate_round(method: Method, ctx: PlanContext, plan: RoundPlan, global_state: State,
                    uploads: list[State], sizes: list[int], weighting: str) -> State:
    weights = aggregation_weights(sizes, weighting)
    return method.aggregate(ctx, plan, global_state, uploads, weights)


def ema_update(ema: State | None, state: State, beta: float) -> State:
    """``beta * ema + (1 - beta) * state`` per floating-point tensor (others: the new value); the first
    call starts the average at ``state``. Factors are averaged one by one, not their product B A
    (docs/privacy.md says so where the option is described)."""
    if ema is None:
        return {k: v.clone() for k, v in state.items()}
    return {k: torch.lerp(v, ema[k].to(v.dtype), beta) if v.is_floating_point() and k in ema else v.clone()
            for k, v in state.items()}


def state_bytes(state: State) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def not_covered(cfg, method: Method) -> str:
    """Why a DP run is NOT covered by its DP guarantee ('' when it is): the method re-reads private
    data outside the DP step, or the run releases the exact (noiseless) signal diagnostic."""
    why = [method.reads_private_data] if method.reads_private_data else []
    if cfg.privacy.enabled and cfg.eval.signal_diagnostics == "exact":
        why.append(SIGNAL_NOT_COVERED)
    return "; ".join(why)


# ----------------------------------------------------------------------------- the server side
@dataclass(frozen=True)
class ClientFacts:
    """What the server knows of a client: its public DP parameters and its size (released metadata,
    used for data-size weighting; docs/privacy.md). Never its data, its rows or its label mix."""

    cid: int
    examples: int  # n_i
    noise_multiplier: float | None  # None: non-private
    sample_rate: float
    step_budget: int


@dataclass
class RoundOutcome:
    """What a runner returns for one round: the clients that answered, their uploads, and the DP steps
    each sampled client ran (charged whether or not its upload is used)."""

    answered: list[int]
    uploads: list[State]
    charged: dict[int, int]
    failures: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 1
    losses: list[float] = field(default_factory=list)  # mean training losses, only from non-private clients
    info: dict[str, Any] = field(default_factory=dict)  # the engine's own facts for the round record (e.g. clients per pass)


class ClientRunner(Protocol):
    """How an engine reaches the clients: the one interface the server drives."""

    def train(self, plan: RoundPlan, download: State, sampled: list[int]) -> RoundOutcome: ...

    def personal_accuracy(self, global_state: State) -> float: ...


def upload_problem(upload: State, plan: RoundPlan, global_state: State, side_prefixes: tuple[str, ...]) -> str | None:
    """Why an upload cannot be aggregated (None: it can): every expected key present, no other key,
    each tensor the global one's shape and dtype, every value finite; side values (scores) finite scalars."""
    expected = {k for k in plan.trainable if k in set(plan.download)}
    model_keys = {k for k in upload if not (side_prefixes and k.startswith(side_prefixes))}
    if expected - model_keys:
        return f"missing key '{sorted(expected - model_keys)[0]}'"
    if model_keys - expected:
        return f"unexpected key '{sorted(model_keys - expected)[0]}'"
    bad = non_finite({k: v for k, v in upload.items() if isinstance(v, torch.Tensor) and v.is_floating_point()})
    for k, v in sorted(upload.items()):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            return f"'{k}' is not a floating-point tensor"
        if k in expected and (tuple(v.shape) != tuple(global_state[k].shape) or v.dtype != global_state[k].dtype):
            return f"'{k}' is {tuple(v.shape)} {v.dtype}, expected {tuple(global_state[k].shape)} {global_state[k].dtype}"
        if k not in expected and v.numel() != 1:
            return f"side value '{k}' has {v.numel()} values, expected 1"
        if k in bad:
            return f"non-finite values in '{k}'"
    return None


def validate_uploads(outcome: RoundOutcome, plan: RoundPlan, global_state: State,
                     side_prefixes: tuple[str, ...]) -> RoundOutcome:
    """Drop every upload that cannot be aggregated, with its reason among the round's failures."""
    kept, uploads, failures = [], [], list(outcome.failures)
    for c, up in zip(outcome.answered, outcome.uploads, strict=True):
        problem = upload_problem(up, plan, global_state, side_prefixes)
        if problem is None:
            kept.append(c)
            uploads.append(up)
        else:
            failures.append({"client": c, "attempt": outcome.attempts - 1, "steps": outcome.charged.get(c, 0),
                             "reason": f"upload rejected: {problem}"})
    return RoundOutcome(kept, uploads, outcome.charged, failures, outcome.attempts, outcome.losses, outcome.info)


class Server:
    """The server's whole side of a run: plan, sampling, validation, aggregation, evaluation on the
    test split, the ledger and the metrics. It reaches the clients only through ``runner``."""

    def __init__(self, cfg, method: Method, rt, facts: list[ClientFacts], global_state: State, *,
                 local_keys: frozenset[str], init_local: State, user_dp, runner: ClientRunner) -> None:
        """``rt``: a Runtime whose test split is evaluated (its training split is never read here);
        ``init_local``: the initial values of the tensors clients keep (public: the model's initialisation)."""
        self.cfg, self.method, self.rt, self.facts = cfg, method, rt, facts
        self.global_state = global_state
        self.local_keys, self.init_local, self.user_dp, self.runner = local_keys, init_local, user_dp, runner
        self.steps = [0] * len(facts)  # DP steps charged per client (every train request it sent)
        self.memory: dict[str, Any] = {}
        self.round = 0
        self.metrics: list[dict[str, Any]] = []
        self.run_dir = None
        self.checkpoint: Any = None  # callable(round) set by the engine, or None
        self._eval_subset = None  # eval.subset's examples, drawn on first use
        self.ema: State | None = None  # federation.server_ema's average of the global state (None: off)

    @property
    def released_state(self) -> State:
        """The global model the server evaluates and saves: the moving average under
        ``federation.server_ema``, else the latest aggregate."""
        return self.ema if self.ema is not None else self.global_state

    # ------------------------------------------------------------------ privacy bookkeeping
    def ledger(self) -> list[dict[str, Any]]:
        dp = self.cfg.privacy
        rows = []
        for f, steps in zip(self.facts, self.steps, strict=True):
            private = f.noise_multiplier is not None
            eps = epsilon([(f.noise_multiplier, f.sample_rate, steps)], delta=dp.delta, accountant=dp.accountant) if private else None
            rows.append({"client": f.cid, "examples": f.examples, "epsilon": eps, "delta": dp.delta if private else None,
                         "sigma": f.noise_multiplier, "sample_rate": f.sample_rate, "steps": steps,
                         "step_budget": f.step_budget, "accountant": dp.accountant if private else None})
        return rows

    def user_level_ledger(self, rounds: int) -> dict[str, Any] | None:
        """sigma_u, the client sampling rate and the user-level epsilon after ``rounds`` (None: off)."""
        if self.user_dp is None:
            return None
        fed = self.cfg.federation
        k = len(sample_clients(fed.num_clients, fed.clients_per_round, seed=self.cfg.train.seed, round=1))
        return self.user_dp.ledger(rounds, planned_rounds=fed.rounds, clients_per_round=k)

    def guarantees(self, rounds: int) -> str:
        """Which privacy guarantees hold after ``rounds`` rounds, in words."""
        dp, held = self.cfg.privacy, []
        if dp.enabled:
            held.append(f"sample-level (epsilon <= {dp.epsilon:g} per client, delta {dp.delta:g}, {dp.accountant})")
        if self.user_dp is not None:
            held.append(f"user-level (epsilon {self.user_dp.epsilon(rounds):.3g} for all of a client's data, delta {dp.delta:g}, rdp)")
        text = " and ".join(held) if held else "none (no DP)"
        if held and dp.reproducible_noise:
            text += f"; {NOT_PRIVATE_WITH_CONFIG}"
        why = not_covered(self.cfg, self.method)
        if why:  # e.g. as-lora curvature=finite-difference, eval.signal_diagnostics=exact
            text += f"; NOT covered by the DP guarantee: {why}"
        return text

    # ------------------------------------------------------------------ one round
    def plan_context(self, rnd: int) -> PlanContext:
        return PlanContext(rnd, self.cfg.federation.rounds, self.rt.adapted.factors, sorted(self.global_state),
                           self.local_keys, self.memory, self.cfg.train.seed)

    def evaluate(self, *, full: bool = True) -> dict[str, float]:
        """On the test split; ``full=False`` with ``eval.subset`` set: on its fixed seeded subset."""
        self.rt.adapted.load(self.init_local)
        examples = None if full else self.eval_subset()
        record = self.rt.evaluate(self.released_state, examples)
        if examples is not None:
            record["eval_examples"] = len(examples)  # intermediate round on eval.subset
        if self.local_keys:
            record["personal_accuracy"] = self.runner.personal_accuracy(self.released_state)
            self.rt.adapted.load(self.init_local)
        return record

    def eval_subset(self):
        """``eval.subset`` test examples drawn once from the seed (None: unset or not smaller than the split)."""
        n, test = self.cfg.eval.subset, self.rt.task.test
        if n is None or n >= len(test):
            return None
        if self._eval_subset is None:
            rng = np.random.default_rng(derive_seed(self.cfg.train.seed, "server", "eval-subset"))
            self._eval_subset = test.subset(np.sort(rng.choice(len(test), size=n, replace=False)))
        return self._eval_subset

    def run_round(self, rnd: int) -> dict[str, Any]:
        fed, seed = self.cfg.federation, self.cfg.train.seed
        start = time.perf_counter()
        ctx = self.plan_context(rnd)
        plan = self.method.plan(ctx)
        sampled = sample_clients(fed.num_clients, fed.clients_per_round, seed=seed, round=rnd)
        over = [c for c in sampled if self.facts[c].noise_multiplier is not None
                and self.steps[c] + fed.local_steps > self.facts[c].step_budget]
        if over:
            raise BudgetExhausted(
                f"stopped before round {rnd}: client {over[0]} would pass its epsilon={self.cfg.privacy.epsilon} "
                f"target (budget {self.facts[over[0]].step_budget} steps); lower rounds or fix the noise lower"
            )
        download = {k: self.global_state[k] for k in plan.download}
        outcome = self.runner.train(plan, download, sampled)
        for c, steps in outcome.charged.items():  # every step a client ran counts, used or not
            if self.facts[c].noise_multiplier is not None:
                self.steps[c] += steps
        outcome = validate_uploads(outcome, plan, self.global_state, self.method.side_uploads)
        failed = sorted({f["client"] for f in outcome.failures} - set(outcome.answered))
        if len(outcome.answered) < min(fed.min_clients, len(sampled)):
            first = outcome.failures[0] if outcome.failures else {"client": "?", "reason": "no answer"}
            raise ClientsFailed(
                f"stopped in round {rnd}: {len(outcome.answered)} of {len(sampled)} clients succeeded after "
                f"{outcome.attempts} attempt(s), fewer than federation.min_clients={fed.min_clients} (client "
                f"{first['client']}: {first['reason']}); raise federation.retries or lower federation.min_clients")
        uploads = outcome.uploads
        sizes = [self.facts[c].examples for c in outcome.answered]
        before = self.global_state
        self.global_state = aggregate_round(self.method, ctx, plan, self.global_state, uploads, sizes, fed.weighting)
        if fed.server_ema > 0:
            self.ema = ema_update(self.ema, self.global_state, fed.server_ema)
        record: dict[str, Any] = {
            "round": rnd,
            "clients": outcome.answered,
            "train_loss": float(np.nanmean(outcome.losses)) if outcome.losses else None,  # non-private runs only
            "bytes_up": sum(state_bytes(u) for u in uploads),
            "bytes_down": state_bytes(download) * len(sampled),
            "failed_clients": failed, "client_failures": outcome.failures, "attempts": outcome.attempts,
            **outcome.info,
        }
        if rnd % self.cfg.eval.every == 0 or rnd == fed.rounds:
            record.update(self.evaluate(full=rnd == fed.rounds))  # the final round on the full split
        ledger = self.ledger()
        eps = [row["epsilon"] for row in ledger if row["epsilon"] is not None]
        record["epsilon"] = max(eps) if eps else None
        record["user_epsilon"] = self.user_dp.epsilon(rnd) if self.user_dp else None
        record["guarantees"] = self.guarantees(rnd)
        record["privacy"] = ledger
        record.update({f"plan_{k}": v for k, v in plan.info.items()})
        record.update(round_diagnostics(self, rnd, ctx, plan, before, uploads, aggregation_weights(sizes, fed.weighting)))
        record["seconds"] = time.perf_counter() - start
        return record

    # ------------------------------------------------------------------ the loop
    def run(self, on_round=None):
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
                if self.checkpoint is not None and (rnd % self.cfg.output.checkpoint_every == 0 or rnd == self.cfg.federation.rounds):
                    self.checkpoint(rnd)
            if on_round is not None:
                on_round(record)
        return RunResult(self.round, self.metrics, self.global_state, stop_reason, time.perf_counter() - t0)


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
