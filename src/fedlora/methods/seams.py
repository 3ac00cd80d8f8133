"""Reusable seam implementations; methods are compositions of these."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.methods.base import ClientTrace, PlanContext, RoundPlan, State


# ------------------------------------------------------------------------------- plans
def download_keys(ctx: PlanContext, skip_roles: tuple[str, ...] = ()) -> tuple[str, ...]:
    roles = {f.name: f.role for f in ctx.factors}
    return tuple(k for k in ctx.global_keys if roles.get(k) not in skip_roles)


@dataclass(frozen=True)
class TrainRoles:
    """Every round trains the tensors with these roles; the global state goes down.

    ``skip_download`` names roles that never change after initialisation (FFA's A): the
    clients already hold them (same seed), so they are not sent.
    """

    roles: tuple[str, ...] = ("A", "B", "head")
    skip_download: tuple[str, ...] = ()

    def __call__(self, ctx: PlanContext) -> RoundPlan:
        groups = {r: ctx.names(r) for r in self.roles}  # per-role groups (a per-step schedule may use them)
        return RoundPlan(ctx.round, ctx.names(*self.roles), download_keys(ctx, self.skip_download), groups=groups)


@dataclass(frozen=True)
class AlternateRounds:
    """Odd rounds train B, even rounds A (round 1 trains B: with B = 0, A has no gradient)."""

    with_head: bool = True

    def __call__(self, ctx: PlanContext) -> RoundPlan:
        factor = "B" if ctx.round % 2 == 1 else "A"
        roles = (factor, "head") if self.with_head else (factor,)
        return RoundPlan(ctx.round, ctx.names(*roles), download_keys(ctx), {"factor": factor})


# --------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Joint:
    """All of the round's trainable tensors are active at every local step."""

    def active(self, plan: RoundPlan, step: int) -> frozenset[str]:
        return plan.trainable

    def transform(self, grads: State, plan: RoundPlan, step: int) -> State:
        return grads


# ----------------------------------------------------------------------------- uploads
@dataclass(frozen=True)
class SendTrained:
    """Send the trained values of the round's trainable tensors that the server holds.

    Tensors kept local (never in the global state, so never downloaded) are never sent.
    """

    def __call__(self, plan: RoundPlan, before: State, after: State, trace: ClientTrace) -> State:
        shared = set(plan.download)
        return {k: after[k] for k in sorted(plan.trainable) if k in shared}


# -------------------------------------------------------------------------- aggregates
def weighted_mean(uploads: list[State], weights: list[float], keys: list[str] | None = None) -> State:
    keys = sorted(uploads[0]) if keys is None else keys
    out: State = {}
    for k in keys:
        acc = torch.zeros_like(uploads[0][k], dtype=torch.float64)
        for up, w in zip(uploads, weights, strict=True):
            acc += w * up[k].to(torch.float64)
        out[k] = acc.to(uploads[0][k].dtype)
    return out


@dataclass(frozen=True)
class MeanOfUploads:
    """FedAvg: each uploaded tensor becomes the weighted mean of the clients' values."""

    def __call__(self, ctx: PlanContext, plan: RoundPlan, global_state: State, uploads: list[State], weights: list[float]) -> State:
        return {**global_state, **weighted_mean(uploads, weights)}
