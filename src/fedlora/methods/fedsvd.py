"""FedSVD: train and average B only, then re-factorise the product with an orthonormal A.

Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA",
NeurIPS 2025, https://arxiv.org/abs/2505.12805 (ALGORITHMS.md 7.3). Clients train B (and
the head) with A frozen for the round (DP-SGD on B only) and upload B. The server averages
B, takes the SVD of ``M = B_bar A_prev = U S V^T`` (QR of the factors plus an r x r SVD) and
sets ``A = V^T[:r]`` (orthonormal rows), ``B = U[:, :r] S[:r]``, so ``B A = M`` exactly, every
round. An all-zero B (zero product) has no singular directions: A becomes the orthonormalised
previous A and B stays zero. W0 never changes. Post-processing of DP outputs: no privacy cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.methods.base import Method, PlanContext, RoundPlan, State
from fedlora.methods.dp_lora import local_roles
from fedlora.methods.lowrank import lora_modules, matrix, product_svd
from fedlora.methods.registry import MethodSetup, register_method
from fedlora.methods.seams import Joint, SendTrained, TrainRoles, weighted_mean


def refactorize(b: torch.Tensor, a_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_new (r, k) with orthonormal rows, B_new (d, r)) with B_new A_new = b @ a_prev, in float64."""
    r = a_prev.shape[0]
    if not torch.any(b):  # zero product: keep A's row space, orthonormalised; B stays zero
        q, _ = torch.linalg.qr(a_prev.to(torch.float64).T)  # (k, r)
        return q.T, torch.zeros(b.shape, dtype=torch.float64, device=b.device)
    u, s, vh = product_svd(b, a_prev)  # (d, r), (r,), (r, k)
    return vh[:r], u[:, :r] * s[:r]


@dataclass(frozen=True)
class AverageBThenSVD:
    def __call__(self, ctx: PlanContext, plan: RoundPlan, global_state: State, uploads: list[State], weights: list[float]) -> State:
        out = {**global_state, **weighted_mean(uploads, weights)}  # B (and the head) averaged
        for a, b, _ in lora_modules(ctx.factors):
            a_new, b_new = refactorize(matrix(out[b]), matrix(global_state[a]))  # 1x1 convs as matrices
            out[a] = a_new.reshape(global_state[a].shape).to(global_state[a].dtype)
            out[b] = b_new.reshape(global_state[b].shape).to(global_state[b].dtype)
        return out


@register_method("fedsvd", "B-only DP-SGD; server re-factorises B A by SVD with orthonormal A")
def fedsvd(setup: MethodSetup) -> Method:
    setup.lora_scale("fedsvd")  # LoRA adapters only
    return Method(
        name="fedsvd",
        plan=TrainRoles(("B", "head")),
        schedule=Joint(),
        upload=SendTrained(),
        aggregate=AverageBThenSVD(),
        local_roles=local_roles(setup),
        exact=True,
    )
