"""The four seams a method is made of: plan, local schedule, upload, aggregate.

A :class:`Method` is nothing but one object per seam plus the roles it keeps on the client.
The round loop (``fedlora.federation``) is written once against these interfaces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedlora.adapters import Factor

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RoundPlan:
    """What the server decided for one round."""

    round: int  # 1-based
    trainable: frozenset[str]  # parameter names trained this round
    download: tuple[str, ...]  # global-state keys sent to the clients
    info: dict[str, Any] = field(default_factory=dict)  # logged with the round (e.g. factor choices)
    groups: dict[str, frozenset[str]] = field(default_factory=dict)  # named subsets of trainable (e.g. "A", "0/B")


@dataclass
class PlanContext:
    """What a plan may look at: the round, the factor table, the server's method memory."""

    round: int
    rounds: int
    factors: list[Factor]
    global_keys: list[str]
    local_keys: frozenset[str]
    memory: dict[str, Any]  # method-owned server memory (checkpointed)
    seed: int

    def names(self, *roles: str) -> frozenset[str]:
        """Trainable (non-frozen) parameter names with the given roles."""
        return frozenset(f.name for f in self.factors if f.role in roles)


@dataclass
class ClientTrace:
    """What the local loop saw that an upload may use (post-processing only)."""

    last_grads: dict[str, torch.Tensor]  # privatised gradient of the last step, per active tensor
    noise_std: float  # per-coordinate std of the noise in last_grads (sigma*C/B_exp; 0 without DP)
    steps: int
    lr: float = 0.0  # the local optimizer's learning rate (public)
    # NOT post-processing: mean loss on the last step's private batch, at the point where the last
    # gradient was taken, with the given tensors moved by the given offsets (eval mode, no grad).
    # Only set for a method with ``reads_private_data`` (runs marked as not covered by DP).
    probe: Callable[[dict[str, torch.Tensor]], float] | None = None


class Plan(Protocol):
    def __call__(self, ctx: PlanContext) -> RoundPlan: ...


class Schedule(Protocol):
    def active(self, plan: RoundPlan, step: int) -> frozenset[str]: ...

    def transform(self, grads: State, plan: RoundPlan, step: int) -> State: ...


class Upload(Protocol):
    def __call__(self, plan: RoundPlan, before: State, after: State, trace: ClientTrace) -> State: ...


class Aggregate(Protocol):
    def __call__(self, ctx: PlanContext, plan: RoundPlan, global_state: State, uploads: list[State], weights: list[float]) -> State: ...


@dataclass(frozen=True)
class Method:
    """A method: four seams, plus the factor roles that never leave the client."""

    name: str
    plan: Plan
    schedule: Schedule
    upload: Upload
    aggregate: Aggregate
    local_roles: tuple[str, ...] = ()
    frozen_roles: tuple[str, ...] = ()  # roles never trained (FFA's A); kept bitwise as initialised
    exact: bool = False  # the server keeps exactly the weighted mean of client products
    shares_base: bool = False  # the global state also holds the frozen base weights W0 of adapted modules
    side_uploads: tuple[str, ...] = ()  # key prefixes of uploaded values that are not model tensors (AS-LoRA's scores)
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the saved config / summary
    reads_private_data: str = ""  # non-empty: why the run is NOT covered by the DP guarantee (gets ClientTrace.probe)

    @property
    def variant(self) -> str:
        """The name plus the options that select what ran, e.g. 'as-lora (curvature secant)' or
        'la-lora (phase B, filter on)': the label every table row and summary carries."""
        named = {"composed_from", "plan", "schedule", "upload", "aggregate"}  # a composed name already says these
        parts = [f"{k} {'on' if v is True else 'off' if v is False else v}" for k, v in self.info.items()
                 if isinstance(v, str | bool | int | float) and k not in named]
        return f"{self.name} ({', '.join(parts)})" if parts else self.name
