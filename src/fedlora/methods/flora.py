"""FLoRA: stack the clients' factors, merge the exact product into W0, re-initialise LoRA.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024, https://arxiv.org/abs/2409.05976 (ALGORITHMS.md 7.2).
Clients train A and B (and the head). The server stacks ``B_stack = [B_1 .. B_K]`` and
``A_stack = [p_1 A_1; ..; p_K A_K]`` (``B_stack A_stack = sum_i p_i B_i A_i`` exactly), merges
``W0 <- W0 + s B_stack A_stack`` (float64), averages the head, and re-initialises LoRA every
round: A Kaiming-uniform (a = sqrt(5), seeded by round and tensor), B = 0. The engine sends
the merged W0 down rather than the stacked factors (same model; counted in full).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedlora.methods.base import Method, PlanContext, RoundPlan, State
from fedlora.methods.dp_lora import local_roles
from fedlora.methods.lowrank import lora_modules, stack
from fedlora.methods.registry import MethodSetup, register_method
from fedlora.methods.seams import Joint, SendTrained, TrainRoles, weighted_mean
from fedlora.seeds import generator


def kaiming_a(like: torch.Tensor, *seed_parts: object) -> torch.Tensor:
    """PEFT's LoRA A init (Kaiming-uniform, a = sqrt(5)), from a derived seed."""
    fresh = torch.empty(like.shape, dtype=like.dtype)
    torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator(*seed_parts))
    return fresh.to(like.device)


@dataclass(frozen=True)
class MergeAndReinit:
    scale: float  # LoRA scale s
    seed: int

    def __call__(self, ctx: PlanContext, plan: RoundPlan, global_state: State, uploads: list[State], weights: list[float]) -> State:
        modules = lora_modules(ctx.factors)
        lora = {n for a, b, _ in modules for n in (a, b)}
        rest = [{k: v for k, v in u.items() if k not in lora} for u in uploads]  # the head, if federated
        out = {**global_state, **weighted_mean(rest, weights)}
        for a, b, w0 in modules:
            bs, as_ = stack([u[b] for u in uploads], [u[a] for u in uploads], weights)  # (d, K r), (K r, k)
            merged = (bs @ as_).reshape(global_state[w0].shape)  # (d, k, 1, 1) for a 1x1 conv
            out[w0] = (global_state[w0].to(torch.float64) + self.scale * merged).to(global_state[w0].dtype)
            out[a] = kaiming_a(global_state[a], self.seed, "flora", "init", plan.round, a)
            out[b] = torch.zeros_like(global_state[b])
        return out


@register_method("flora", "stacked exact product merged into W0; LoRA re-initialised every round")
def flora(setup: MethodSetup) -> Method:
    return Method(
        name="flora",
        plan=TrainRoles(("A", "B", "head")),
        schedule=Joint(),
        upload=SendTrained(),
        aggregate=MergeAndReinit(setup.lora_scale("flora"), setup.seed),
        local_roles=local_roles(setup),
        exact=True,
        shares_base=True,
    )
