"""RoLoRA: alternate the trained factor across rounds (B in odd rounds, A in even rounds).

Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA",
NeurIPS 2025, https://arxiv.org/abs/2502.01755. The frozen factor is identical on every
client, so the mean of the active factor gives the exact mean of products. Round 1 trains
B (B = 0 gives A a zero gradient). The head, when trained, trains every round [interp].
"""

from __future__ import annotations

from fedlora.methods.base import Method
from fedlora.methods.dp_lora import local_roles
from fedlora.methods.registry import MethodSetup, register_method
from fedlora.methods.seams import AlternateRounds, Joint, MeanOfUploads, SendTrained


@register_method("rolora", "B in odd rounds, A in even rounds (round 1 trains B); exact aggregation")
def rolora(setup: MethodSetup) -> Method:
    return Method(
        name="rolora",
        plan=AlternateRounds(with_head=True),
        schedule=Joint(),
        upload=SendTrained(),
        aggregate=MeanOfUploads(),
        local_roles=local_roles(setup),
        exact=True,
    )
