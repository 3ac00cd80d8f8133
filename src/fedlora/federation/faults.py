"""Client faults in the in-process engine: injected ones (tests, drills) and real ones.

A sampled client is dropped from its round when its run raises or when its upload holds a
non-finite value (never averaged in; the server checks every upload again). The round aggregates the clients that succeeded when at least ``federation.min_clients``
did; otherwise the failed clients are run again (a new attempt, up to ``federation.retries``)
and then the run stops with a clear reason.

Ledger rule (conservative): every DP step that ran counts, whether or not its client's upload
was used, because a noisy step touched the client's data. An injected exception fires after a
seeded number of steps (those count); a real exception's progress is unknown, so all of the
round's steps count; a timed-out or non-finite client ran all of them.

``federation.faults`` injects failures: a seeded ``fraction`` of each attempt's clients fails
with ``kind`` (exception | timeout | nonfinite), drawn from (seed, round, attempt).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlora.devices import all_finite
from fedlora.errors import BudgetExhausted, ClientsFailed, FedloraError
from fedlora.federation.client import ClientNode, ClientResult
from fedlora.federation.server import RoundOutcome, round_half_up
from fedlora.federation.signal import round_signal
from fedlora.methods.base import RoundPlan, State
from fedlora.seeds import derive_seed


class InjectedFault(RuntimeError):
    """A failure injected by ``federation.faults``."""


def injected_faults(cfg, rnd: int, attempt: int, clients: list[int]) -> dict[int, str]:
    """Which of this attempt's clients fail, and how (seeded by seed, round, attempt)."""
    faults = cfg.federation.faults
    n = round_half_up(faults.fraction * len(clients))
    if n == 0:
        return {}
    rng = np.random.default_rng(derive_seed(cfg.train.seed, "faults", rnd, attempt))
    return {int(c): faults.kind for c in sorted(rng.choice(clients, size=n, replace=False))}


def crash_step(seed: int, cid: int, rnd: int, attempt: int, local_steps: int) -> int:
    """How many steps an injected exception lets run first (0..T-1)."""
    return int(np.random.default_rng(derive_seed(seed, "faults", "step", cid, rnd, attempt)).integers(local_steps))


def finite(upload: State) -> bool:
    return all_finite([v for v in upload.values() if v.is_floating_point()])  # one host sync


@dataclass
class Outcome:
    result: ClientResult | None  # None: dropped
    steps: int  # DP steps that ran (the ledger counts them)
    reason: str | None = None


def guarded_run(node: ClientNode, cfg, plan: RoundPlan, download: State, rnd: int, attempt: int,
                fault: str | None) -> Outcome:
    fed, seed = cfg.federation, cfg.train.seed
    dp_steps = fed.local_steps if node.spec.dp else 0
    ran = dp_steps
    start = time.perf_counter()
    try:
        if fault == "exception":
            ran = crash_step(seed, node.cid, rnd, attempt, fed.local_steps)
            if ran:
                node.train(plan, download, local_steps=ran, commit=False, attempt=attempt)
            ran = ran if node.spec.dp else 0
            raise InjectedFault(f"injected failure after {ran} steps")
        res = node.train(plan, download, commit=False, attempt=attempt)
    except FedloraError:
        raise  # a user error (or a refusal the server should not have caused) is not a client fault
    except Exception as err:  # noqa: BLE001  (the client is dropped, the run goes on)
        return Outcome(None, ran, f"exception: {type(err).__name__}: {err}")
    if fault == "timeout":  # an injected timeout: the client ran its steps, its answer never came
        return Outcome(None, dp_steps, f"timeout: no answer after {time.perf_counter() - start:.3g} s (injected)")
    if fault == "nonfinite":
        res.upload = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in res.upload.items()}
    if not finite(res.upload):
        return Outcome(None, dp_steps, "non-finite upload rejected")
    return Outcome(res, dp_steps)


def run_clients(nodes: list[ClientNode], cfg, plan: RoundPlan, download: State, sampled: list[int],
                rnd: int) -> RoundOutcome:
    """Run the round's clients with drops and retries; the successful ones in order, and every step charged."""
    fed = cfg.federation
    ok: dict[int, ClientResult] = {}
    failures: list[dict[str, Any]] = []
    charged = dict.fromkeys(sampled, 0)
    todo, attempt = list(sampled), 0
    while True:
        over = [c for c in todo if nodes[c].spec.dp and nodes[c].state.dp_steps + fed.local_steps > nodes[c].spec.step_budget]
        if over and attempt > 0:
            raise BudgetExhausted(f"stopped in round {rnd}: retrying client {over[0]} would pass its "
                                  f"epsilon={cfg.privacy.epsilon} target; lower federation.retries or the fault rate")
        plan_faults = injected_faults(cfg, rnd, attempt, todo)
        failed = []
        for c in todo:
            out = guarded_run(nodes[c], cfg, plan, download, rnd, attempt, plan_faults.get(c))
            charged[c] += out.steps
            if out.result is not None:
                ok[c] = out.result
                nodes[c].state = out.result.state
            else:
                nodes[c].charge(out.steps)
                failures.append({"client": c, "attempt": attempt, "steps": out.steps, "reason": out.reason})
                failed.append(c)
        if len(ok) >= min(fed.min_clients, len(sampled)):
            break
        if attempt >= fed.retries:
            first = failures[0]
            raise ClientsFailed(
                f"stopped in round {rnd}: {len(ok)} of {len(sampled)} clients succeeded after {attempt + 1} "
                f"attempt(s), fewer than federation.min_clients={fed.min_clients} (client {first['client']}: "
                f"{first['reason']}); raise federation.retries or lower federation.min_clients"
            )
        todo, attempt = failed, attempt + 1
    order = [c for c in sampled if c in ok]
    losses = [ok[c].loss for c in order if nodes[c].spec.dp is None]
    return RoundOutcome(order, [ok[c].upload for c in order], charged, failures, attempt + 1, losses,
                        round_signal([ok[c].signal for c in order]))  # eval.signal_diagnostics (empty when off)
