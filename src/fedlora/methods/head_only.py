"""Head-only: the classification head trained with the same DP, no adapter: the reference that
answers "do the adapters matter here at all?".

The DP linear probe on frozen features; Tramèr and Boneh, "Differentially Private Learning Needs
Better Features (or Much More Data)", ICLR 2021, https://arxiv.org/abs/2011.11660, show it is a
strong baseline under DP. Every round every client trains only the head (clipped and noised at
every step exactly as in every other method, so the same (epsilon, delta)); the LoRA factors are
never trained, never sent down (the clients hold their initial values, B = 0, so the adapted
model is the pretrained one) and never uploaded; the server averages the head (FedAvg).
"""

from __future__ import annotations

from fedlora.errors import ConfigError
from fedlora.methods.base import Method
from fedlora.methods.dp_lora import local_roles
from fedlora.methods.registry import MethodSetup, register_method
from fedlora.methods.seams import Joint, MeanOfUploads, SendTrained, TrainRoles

HEAD_ONLY_PLAN = TrainRoles(("head",), skip_download=("A", "B"))


@register_method("head-only", "only the head trained (same DP), no adapter: do the adapters matter here?")
def head_only(setup: MethodSetup) -> Method:
    if setup.adapter is not None and not setup.adapter.train_head:
        raise ConfigError("method 'head-only' trains only the head; set adapter.train_head=true")
    return Method(
        name="head-only",
        plan=HEAD_ONLY_PLAN,
        schedule=Joint(),
        upload=SendTrained(),
        aggregate=MeanOfUploads(),
        local_roles=local_roles(setup),
        frozen_roles=("A", "B"),
        exact=True,  # no product is aggregated: the adapter stays at its (zero) initial delta
    )
