"""DP-LoRA: FedAvg of both LoRA factors with local DP-SGD on each client.

The baseline of the family ("FedIT" without DP); see ALGORITHMS.md section 1 and, for the
DP setting, LA-LoRA (https://arxiv.org/abs/2602.19926). Both factors (and the head, when
federated) train jointly; the server averages A and B separately, which is inexact:
mean(B_i) mean(A_i) != mean(B_i A_i).
"""

from __future__ import annotations

from fedlora.methods.base import Method
from fedlora.methods.registry import MethodSetup, register_method
from fedlora.methods.seams import Joint, MeanOfUploads, SendTrained, TrainRoles


def local_roles(setup: MethodSetup, *roles: str) -> tuple[str, ...]:
    """Roles kept on the client: the given ones, plus the head when it is not federated."""
    return tuple(roles) + (() if setup.federate_head else ("head",))


@register_method("dp-lora", "FedAvg of A and B with local DP-SGD on both (baseline)")
def dp_lora(setup: MethodSetup) -> Method:
    return Method(
        name="dp-lora",
        plan=TrainRoles(("A", "B", "head")),
        schedule=Joint(),
        upload=SendTrained(),
        aggregate=MeanOfUploads(),
        local_roles=local_roles(setup),
    )
