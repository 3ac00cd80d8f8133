"""FFA-LoRA: A frozen at its (shared, seeded) random init; only B (and the head) train.

Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
https://arxiv.org/abs/2403.12313. With A identical everywhere, the mean of the clients'
products is the product of the mean B with A, so aggregation is exact, and DP noise enters
the product linearly. A is never sent: every client builds it from the same seed.
"""

from __future__ import annotations

from fedlora.methods.base import Method
from fedlora.methods.dp_lora import local_roles
from fedlora.methods.registry import MethodSetup, register_method
from fedlora.methods.seams import Joint, MeanOfUploads, SendTrained, TrainRoles


@register_method("ffa-lora", "A frozen (shared seed), only B trained and sent; exact aggregation")
def ffa_lora(setup: MethodSetup) -> Method:
    return Method(
        name="ffa-lora",
        plan=TrainRoles(("B", "head"), skip_download=("A",)),
        schedule=Joint(),
        upload=SendTrained(),
        aggregate=MeanOfUploads(),
        local_roles=local_roles(setup),
        frozen_roles=("A",),
        exact=True,
    )
