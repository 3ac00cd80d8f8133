"""Server functions: sample clients, plan, weigh and aggregate. Pure over tensors and configs."""

from __future__ import annotations

import numpy as np

from fedlora.seeds import derive_seed
from fedlora.methods.base import Method, PlanContext, RoundPlan, State


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


def state_bytes(state: State) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))
