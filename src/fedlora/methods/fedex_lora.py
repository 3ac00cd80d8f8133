"""FedEx-LoRA: FedAvg of A and B, with the averaging residual folded into the frozen weight.

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", ACL 2025, https://arxiv.org/abs/2410.09432 (ALGORITHMS.md 7.1).
Clients train A and B (and the head) with DP-SGD. The server sets ``B_bar = sum p_i B_i``,
``A_bar = sum p_i A_i`` and ``W0 <- W0 + s (sum_i p_i B_i A_i - B_bar A_bar)``, so
``W0' + s B_bar A_bar = W0 + s sum_i p_i B_i A_i`` (computed in float64; the residual uses the
stored B_bar, A_bar). The base weights W0 of the adapted modules are part of the global state
and go down with the factors (the engine counts them in full; the paper sends the residual
factored). Post-processing of DP outputs: no privacy cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.methods.base import Method, PlanContext, RoundPlan, State
from fedlora.methods.dp_lora import local_roles
from fedlora.methods.lowrank import lora_modules, matrix, stack
from fedlora.methods.registry import MethodSetup, register_method
from fedlora.methods.seams import Joint, SendTrained, TrainRoles, weighted_mean


@dataclass(frozen=True)
class FoldResidual:
    scale: float  # LoRA scale s

    def __call__(self, ctx: PlanContext, plan: RoundPlan, global_state: State, uploads: list[State], weights: list[float]) -> State:
        out = {**global_state, **weighted_mean(uploads, weights)}
        for a, b, w0 in lora_modules(ctx.factors):
            bs, as_ = stack([u[b] for u in uploads], [u[a] for u in uploads], weights)
            residual = bs @ as_ - matrix(out[b]).to(torch.float64) @ matrix(out[a]).to(torch.float64)  # (d, k)
            residual = residual.reshape(global_state[w0].shape)  # (d, k, 1, 1) for a 1x1 conv
            out[w0] = (global_state[w0].to(torch.float64) + self.scale * residual).to(global_state[w0].dtype)
        return out


@register_method("fedex-lora", "FedAvg of A and B plus the exact residual folded into W0")
def fedex_lora(setup: MethodSetup) -> Method:
    return Method(
        name="fedex-lora",
        plan=TrainRoles(("A", "B", "head")),
        schedule=Joint(),
        upload=SendTrained(),
        aggregate=FoldResidual(setup.lora_scale("fedex-lora")),
        local_roles=local_roles(setup),
        exact=True,
        shares_base=True,
    )
