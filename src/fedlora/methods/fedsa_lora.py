"""FedSA-LoRA: train A and B, share only A; B and the head stay on the client.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025, https://arxiv.org/abs/2410.01463. B and the head are local roles: they are never
in the global state, never downloaded and never uploaded. Both factors are trained with
DP-SGD and every step is counted, since the released A depends on B's trajectory [interp].
``fedsa-rslora`` is the same protocol with the rank-stabilised scale alpha/sqrt(r); it
refuses to run unless ``adapter.rslora: true``, so the scale is set in one place.
``fedsa-vera`` runs the protocol on PEFT's VeRA (``adapter.type: vera``): ``lambda_d`` plays
A's role (shared) and ``lambda_b`` B's role (kept local), as the FedSA-LoRA code's freeze
switch pairs them [interp, ALGORITHMS.md 4]; VeRA's frozen random projections are identical
on every client (same seed).
"""

from __future__ import annotations

from dataclasses import replace

from fedlora.errors import ConfigError
from fedlora.methods.base import Method
from fedlora.methods.registry import MethodSetup, register_method
from fedlora.methods.seams import Joint, MeanOfUploads, SendTrained, TrainRoles


@register_method("fedsa-lora", "A shared and averaged; B and the head kept on each client")
def fedsa_lora(setup: MethodSetup) -> Method:
    return Method(
        name="fedsa-lora",
        plan=TrainRoles(("A", "B", "head")),
        schedule=Joint(),
        upload=SendTrained(),
        aggregate=MeanOfUploads(),
        local_roles=("B", "head"),
    )


@register_method("fedsa-rslora", "FedSA-LoRA with rank-stabilised scale alpha/sqrt(r) (needs adapter.rslora=true)")
def fedsa_rslora(setup: MethodSetup) -> Method:
    if setup.adapter is None or setup.adapter.type != "lora" or not setup.adapter.rslora:
        raise ConfigError("method 'fedsa-rslora' needs rsLoRA adapters; set adapter.rslora=true (and adapter.type=lora)")
    return replace(fedsa_lora(setup), name="fedsa-rslora")


@register_method("fedsa-vera", "FedSA on VeRA: lambda_d shared, lambda_b and the head local (needs adapter.type=vera)")
def fedsa_vera(setup: MethodSetup) -> Method:
    if setup.adapter is None or setup.adapter.type != "vera":
        raise ConfigError("method 'fedsa-vera' needs VeRA adapters; set adapter.type=vera")
    return replace(fedsa_lora(setup), name="fedsa-vera")
