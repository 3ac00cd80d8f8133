"""Bytes up and down per round match ALGORITHMS.md section 8 (and docs/methods.md "Communication").

The formula is computed from the adapter shapes (element size b, rank r, out d and in
features k of every adapted module, the head when federated) times the K sampled clients,
independently of how the engine measures the tensors it sends.
"""

from __future__ import annotations

import pytest

from fedlora.federation.simulation import Simulation
from tests.helpers import NEEDS, UPLOAD_ROLES

B = 4  # fp32


def shapes(sim: Simulation) -> tuple[list[tuple[int, int, int, int | None]], int]:
    """(d, k, r, layer) per adapted module, and the federated head's bytes."""
    adapted, rank = sim.rt.adapted, sim.cfg.adapter.rank
    mods = []
    for f in adapted.factors:
        if f.role == "A":
            m = adapted.model.get_submodule(f"base_model.model.{f.module}")
            mods.append((m.out_features, m.in_features, rank, f.layer))
    head = sum(adapted.params[f.name].numel() for f in adapted.factors if f.role == "head") * B
    return mods, head if sim.cfg.adapter.federate_head else 0


def per_client(name: str, sim: Simulation, rec: dict) -> tuple[int, int]:
    """fedlora's documented (upload, download) per client for this round."""
    mods, head = shapes(sim)
    full = B * sum(r * (d + k) for d, k, r, _ in mods)  # both factors
    rd = B * sum(r * d for d, k, r, _ in mods)  # B only
    rk = B * sum(r * k for d, k, r, _ in mods)  # A only
    dk = B * sum(d * k for d, k, r, _ in mods)  # W0 in full
    if name in ("dp-lora", "la-lora"):
        return full + head, full + head
    if name == "ffa-lora":
        return rd + head, rd + head  # A never sent (shared seed)
    if name == "rolora":  # the active factor up; the whole global state down [fedlora]
        return (rd if rec["round"] % 2 else rk) + head, full + head
    if name in ("fedsa-lora", "fedsa-rslora"):
        return rk, rk  # B and the head stay local
    if name == "fedsa-vera":
        return B * sum(r for *_, r, _ in mods), B * sum(r for *_, r, _ in mods)  # lambda_d only
    if name == "as-lora":  # each layer's chosen factor + one fp32 score per layer up; everything down
        layers = sorted({lay for *_, lay in mods})
        mode = dict(zip(layers, rec["plan_modes"], strict=True))
        up = B * sum(r * d if mode[lay] == "B" else r * k for d, k, r, lay in mods)
        return up + head + 4 * len(layers), full + head
    if name in ("fedex-lora", "flora"):
        return full + head, full + head + dk  # W0 down in full [fedlora]
    if name == "fedsvd":
        return rd + head, full + head  # B up; re-split B and orthonormal A down
    if name == "head-only":
        return head, head  # the head alone, both ways
    raise AssertionError(f"no formula for {name}")


CASES = [(n, {}) for n in sorted(UPLOAD_ROLES)] + [("dp-lora", {"federate_head": False}), ("rolora", {"rounds": 2})]


@pytest.mark.parametrize(("name", "extra"), CASES, ids=[f"{n}{'-' + '-'.join(e) if e else ''}" for n, e in CASES])
def test_bytes_up_and_down_match_the_formula(tiny_cfg, name, extra):
    sections = {k: dict(v) for k, v in NEEDS.get(name, {}).items()}
    if "federate_head" in extra:
        sections.setdefault("adapter", {})["federate_head"] = False
    rounds = extra.get("rounds", 1)
    sections.setdefault("adapter", {})["target_modules"] = ["query", "intermediate.dense"]  # d = k and d != k
    cfg = tiny_cfg(method={"name": name}, federation={"rounds": rounds, "clients_per_round": 0.67, "local_steps": 1},
                   eval={"diagnostics": False}, **sections)
    sim = Simulation(cfg)
    for rnd in range(1, rounds + 1):
        rec = sim.run_round(rnd)
        k = len(rec["clients"])
        assert k == 2  # partial participation: 2 of 3 clients
        assert {(d, n) for d, n, *_ in shapes(sim)[0]} == {(16, 16), (32, 16)}  # (out, in)
        up, down = per_client(name, sim, rec)
        assert (rec["bytes_up"], rec["bytes_down"]) == (k * up, k * down), (name, rnd)
