"""Client faults in the in-process engine: injected ones (tests, drills) and real ones.

A sampled client is dropped from its round when its run raises, when it takes longer than
``federation.client_timeout_s``, or when its upload holds a non-finite value (never averaged
in). The round aggregates the clients that succeeded when at least ``federation.min_clients``
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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedlora.errors import BudgetExhausted, FedloraError
from fedlora.federation.client import ClientResult, ClientState, run_client
from fedlora.seeds import derive_seed
from fedlora.federation.server import round_half_up
from fedlora.methods.base import RoundPlan, State

if TYPE_CHECKING:
    from fedlora.federation.simulation import Simulation


class ClientsFailed(FedloraError):
    """Too few clients of a round succeeded, after every retry."""


class InjectedFault(RuntimeError):
    """A failure injected by ``federation.faults``."""


def injected_faults(sim: Simulation, rnd: int, attempt: int, clients: list[int]) -> dict[int, str]:
    """Which of this attempt's clients fail, and how (seeded by seed, round, attempt)."""
    faults = sim.cfg.federation.faults
    n = round_half_up(faults.fraction * len(clients))
    if n == 0:
        return {}
    rng = np.random.default_rng(derive_seed(sim.cfg.train.seed, "faults", rnd, attempt))
    return {int(c): faults.kind for c in sorted(rng.choice(clients, size=n, replace=False))}


def crash_step(seed: int, cid: int, rnd: int, attempt: int, local_steps: int) -> int:
    """How many steps an injected exception lets run first (0..T-1)."""
    return int(np.random.default_rng(derive_seed(seed, "faults", "step", cid, rnd, attempt)).integers(local_steps))


def finite(upload: State) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in upload.values() if v.is_floating_point())


@dataclass
class Outcome:
    result: ClientResult | None  # None: dropped
    steps: int  # DP steps that ran (the ledger counts them)
    reason: str | None = None


def guarded_run(sim: Simulation, plan: RoundPlan, download: State, cid: int, rnd: int, attempt: int,
                fault: str | None) -> Outcome:
    fed, seed, spec, state = sim.cfg.federation, sim.cfg.train.seed, sim.specs[cid], sim.clients[cid]
    dp_steps = fed.local_steps if spec.dp else 0
    ran = dp_steps
    start = time.perf_counter()
    try:
        if fault == "exception":
            ran = crash_step(seed, cid, rnd, attempt, fed.local_steps)
            if ran:
                run_client(sim.rt, sim.method, plan, download, spec, state, local_steps=ran, seed=seed)
            ran = ran if spec.dp else 0
            raise InjectedFault(f"injected failure after {ran} steps")
        res = run_client(sim.rt, sim.method, plan, download, spec, state, local_steps=fed.local_steps, seed=seed)
    except FedloraError:
        raise  # a user error is not a client fault
    except Exception as err:  # noqa: BLE001  (the client is dropped, the run goes on)
        return Outcome(None, ran, f"exception: {type(err).__name__}: {err}")
    seconds = time.perf_counter() - start
    if fault == "timeout" or (fed.client_timeout_s is not None and seconds > fed.client_timeout_s):
        return Outcome(None, dp_steps, f"timeout: {seconds:.3g} s > client_timeout_s")
    if fault == "nonfinite":
        res.upload = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in res.upload.items()}
    if not finite(res.upload):
        return Outcome(None, dp_steps, "non-finite upload rejected")
    return Outcome(res, dp_steps)


def run_clients(sim: Simulation, plan: RoundPlan, download: State, sampled: list[int],
                rnd: int) -> tuple[list[int], list[ClientResult], dict[str, Any]]:
    """Run the round's clients with drops and retries; returns the successful ones in order."""
    fed = sim.cfg.federation
    ok: dict[int, ClientResult] = {}
    failures: list[dict[str, Any]] = []
    todo, attempt = list(sampled), 0
    while True:
        over = [c for c in todo if sim.clients[c].dp_steps + fed.local_steps > sim.specs[c].step_budget]
        if over and attempt > 0:
            raise BudgetExhausted(f"stopped in round {rnd}: retrying client {over[0]} would pass its "
                                  f"epsilon={sim.cfg.privacy.epsilon} target; lower federation.retries or the fault rate")
        plan_faults = injected_faults(sim, rnd, attempt, todo)
        failed = []
        for c in todo:
            out = guarded_run(sim, plan, download, c, rnd, attempt, plan_faults.get(c))
            if out.result is not None:
                ok[c] = out.result
                sim.clients[c] = out.result.state
            else:
                kept = sim.clients[c]
                sim.clients[c] = ClientState(kept.local, kept.dp_steps + out.steps)
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
    info = {"failed_clients": sorted({f["client"] for f in failures} - set(ok)), "client_failures": failures,
            "attempts": attempt + 1}
    return order, [ok[c] for c in order], info
