"""ALGORITHMS.md "Implementation pitfalls": one test per pitfall not already covered elsewhere.

Covered elsewhere: 1 (FedAvg inexact, FedEx and FLoRA exact: test_exact_aggregation.py),
2 for LA-LoRA and FFA's A bitwise (test_alternating.py, test_battery.py), 3 (test_alternating.py,
test_battery.py), 4 FedSVD's zero product and 11 on synthetic factors (test_exact_aggregation.py),
7 (a)-(c) (tests/privacy/test_dpsgd.py, test_accounting.py).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedlora.adapters import Factor, layer_index
from fedlora.errors import ConfigError
from fedlora.federation import client as client_mod
from fedlora.federation.client import local_gradients, poisson_batch, run_client
from fedlora.federation.server import aggregate_round, sample_clients
from fedlora.federation.simulation import Simulation, build_method_for
from fedlora.methods import MethodSetup, build_method
from fedlora.methods.as_lora import LayerwiseChoice, MeanAndScoreEMA, SendWithScores
from fedlora.methods.base import ClientTrace, Method, PlanContext, RoundPlan
from fedlora.methods.la_lora import AlternateSteps
from fedlora.methods.rolora import AlternateRounds
from fedlora.methods.seams import MeanOfUploads
from tests.helpers import FACTORS, Spy

FAST = {"every": 100, "diagnostics": False}  # evaluate at the end only, no aggregation-error replay


def spied_round(sim: Simulation, rnd: int, cid: int = 0, steps: int | None = None):
    """One client's round with the schedule spied: (per-step privatised names, per-step changed names)."""
    spy = Spy(sim.method.schedule, sim.rt.adapted)
    method = replace(sim.method, schedule=spy)
    plan = method.plan(sim.plan_context(rnd))
    steps = steps or sim.cfg.federation.local_steps
    run_client(sim.rt, method, plan, {k: sim.global_state[k] for k in plan.download}, sim.specs[cid], sim.clients[cid],
               local_steps=steps, seed=0)
    snaps = [*spy.snaps, sim.rt.adapted.state()]
    changed = [{k for k in a if not torch.equal(a[k], b[k])} for a, b in zip(snaps, snaps[1:], strict=False)]
    return plan, spy.noised, changed


def roles_of(sim: Simulation, names) -> set[tuple[int | None, str]]:
    by = sim.rt.adapted.by_name
    return {(by[k].layer, by[k].role) for k in names}


# 1 ---------------------------------------------------------------------------------------
def test_pitfall_01_single_factor_methods_average_products_exactly():
    g = torch.Generator().manual_seed(0)
    w = [0.5, 0.3, 0.2]
    a_shared, b_shared = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g, dtype=torch.float64)
    ctx = PlanContext(2, 10, FACTORS, [f.name for f in FACTORS], frozenset(), {}, 0)
    # FFA (A shared, B averaged) and RoLoRA's even round (B shared, A averaged)
    bs = [{"l0.B": torch.randn(12, 3, generator=g, dtype=torch.float64)} for _ in w]
    out = MeanOfUploads()(ctx, RoundPlan(2, frozenset({"l0.B"}), ("l0.B",)), {"l0.A": a_shared, "l0.B": b_shared}, bs, w)
    assert torch.allclose(out["l0.B"] @ a_shared, sum(p * u["l0.B"] @ a_shared for u, p in zip(bs, w, strict=True)), atol=1e-12)
    as_ = [{"l0.A": torch.randn(3, 9, generator=g, dtype=torch.float64)} for _ in w]
    out = MeanOfUploads()(ctx, RoundPlan(2, frozenset({"l0.A"}), ("l0.A",)), {"l0.A": a_shared, "l0.B": b_shared}, as_, w)
    assert torch.allclose(b_shared @ out["l0.A"], sum(p * b_shared @ u["l0.A"] for u, p in zip(as_, w, strict=True)), atol=1e-12)
    # AS-LoRA: layer 0 trains A, layer 1 trains B; scores ride along and never enter the state
    glob = {"l0.A": a_shared, "l0.B": b_shared, "l1.A": a_shared.clone(), "l1.B": b_shared.clone()}
    ups = [{"l0.A": torch.randn(3, 9, generator=g, dtype=torch.float64), "l1.B": torch.randn(12, 3, generator=g, dtype=torch.float64),
            "score/0/A": torch.tensor(1.0), "score/1/B": torch.tensor(2.0)} for _ in w]
    out = MeanAndScoreEMA()(ctx, RoundPlan(2, frozenset({"l0.A", "l1.B"}), tuple(glob)), glob, ups, w)
    assert torch.allclose(out["l0.B"] @ out["l0.A"], sum(p * b_shared @ u["l0.A"] for u, p in zip(ups, w, strict=True)), atol=1e-12)
    assert torch.allclose(out["l1.B"] @ out["l1.A"], sum(p * u["l1.B"] @ a_shared for u, p in zip(ups, w, strict=True)), atol=1e-12)


# 2 ---------------------------------------------------------------------------------------
def test_pitfall_02_noise_on_both_factors_compounds_and_single_factor_methods_noise_one(tiny_cfg):
    g = torch.Generator().manual_seed(0)
    d, r, k, sigma, n = 6, 3, 5, 0.5, 4000
    xb, xa = sigma * torch.randn(n, d, r, generator=g, dtype=torch.float64), sigma * torch.randn(n, r, k, generator=g, dtype=torch.float64)
    assert float((xb @ xa).pow(2).sum((1, 2)).mean()) == pytest.approx(sigma**4 * d * r * k, rel=0.08)
    a = torch.randn(r, k, generator=g, dtype=torch.float64)  # a frozen factor: the noise enters linearly
    assert float((xb @ a).pow(2).sum((1, 2)).mean()) == pytest.approx(sigma**2 * d * float(a.pow(2).sum()), rel=0.08)
    for name, rnd, active in [("ffa-lora", 1, "B"), ("rolora", 1, "B"), ("rolora", 2, "A"), ("as-lora", 1, None)]:
        sim = Simulation(tiny_cfg(method={"name": name}, federation={"rounds": 10, "local_steps": 2}))
        lora = {f.name for f in sim.rt.adapted.factors if f.role in ("A", "B")}
        plan, noised, changed = spied_round(sim, rnd)
        for step_noised, step_changed in zip(noised, changed, strict=True):
            per_layer = roles_of(sim, step_noised & lora)
            layers = {lay for lay, _ in per_layer}
            assert len(per_layer) == len(layers) == len({f.layer for f in sim.rt.adapted.factors if f.name in lora}), name
            if active:
                assert {role for _, role in per_layer} == {active}, (name, rnd)
            assert step_changed & lora <= step_noised  # the other factor is bitwise unchanged


# 4 ---------------------------------------------------------------------------------------
def test_pitfall_04_zero_b_gives_a_no_gradient_so_round_one_trains_b(tiny_cfg):
    sim = Simulation(tiny_cfg(federation={"rounds": 10}))
    names = sim.rt.adapted.names(roles=("A", "B"))
    sim.rt.adapted.load(sim.global_state)
    grads, _ = local_gradients(sim.rt, replace(sim.specs[0], dp=None), np.arange(8), names, torch.Generator().manual_seed(0))
    by = sim.rt.adapted.by_name
    assert all(not g.any() for k, g in grads.items() if by[k].role == "A")  # B = 0: A's gradient is exactly zero
    assert any(g.any() for k, g in grads.items() if by[k].role == "B")
    ctx = sim.plan_context(1)
    assert {by[k].role for k in AlternateRounds()(ctx).trainable} == {"B", "head"}  # RoLoRA
    assert set(LayerwiseChoice()(ctx).info["modes"]) == {"B"}  # AS-LoRA warm-up
    assert AlternateSteps().factor(0) == "B"  # LA-LoRA, paper phase


# 5 ---------------------------------------------------------------------------------------
def test_pitfall_05_as_lora_decisions_depend_on_noisy_gradients_only():
    g = torch.Generator().manual_seed(3)
    grads = {"l0.A": torch.randn(2, 8, generator=g), "l1.B": torch.randn(8, 2, generator=g), "l2.B": torch.randn(8, 2, generator=g)}
    groups = {"0/A": frozenset({"l0.A"}), "1/B": frozenset({"l1.B"}), "2/B": frozenset({"l2.B"})}
    plan = RoundPlan(3, frozenset(grads), tuple(grads), {}, groups)
    send = SendWithScores(seed=0, rounds=30)

    def next_modes(data_seed: int) -> str:  # different raw batches: different trained values, same noisy gradients
        h = torch.Generator().manual_seed(data_seed)
        ups = []
        for _ in range(2):
            after = {k: torch.randn(v.shape, generator=h) for k, v in grads.items()}
            ups.append(send(plan, after, after, ClientTrace(grads, 0.05, 2)))
        ctx = PlanContext(3, 30, FACTORS, [f.name for f in FACTORS], frozenset(), {}, 0)
        MeanAndScoreEMA()(ctx, plan, {k: torch.zeros(v.shape) for k, v in grads.items()}, ups, [0.5, 0.5])
        return "".join(LayerwiseChoice()(replace(ctx, round=r)).info["modes"] for r in range(4, 12))

    assert next_modes(1) == next_modes(2)
    with pytest.raises(ConfigError, match="finite-difference"):
        build_method("as-lora", MethodSetup({"curvature": "finite-difference"}, True, 10, 0))


# 6 ---------------------------------------------------------------------------------------
def test_pitfall_06_every_dp_step_is_counted_even_when_its_factor_stays_local(tiny_cfg):
    cfg = tiny_cfg(method={"name": "fedsa-lora"}, federation={"rounds": 3, "local_steps": 2, "clients_per_round": 0.34},
                   eval=FAST)
    sim = Simulation(cfg)
    result = sim.run()
    times = np.bincount([c for m in result.metrics for c in m["clients"]], minlength=3)
    assert times.min() < 3  # partial participation
    assert [c.dp_steps for c in sim.clients] == (2 * times).tolist()
    assert [row["steps"] for row in result.metrics[-1]["privacy"]] == (2 * times).tolist()


# 7 ---------------------------------------------------------------------------------------
def test_pitfall_07_batches_are_poisson_sampled():
    gen, n, q, draws = torch.Generator().manual_seed(0), 50, 0.2, 3000
    hits = np.zeros(n)
    sizes = []
    for _ in range(draws):
        rows = poisson_batch(n, q, gen)
        hits[rows] += 1
        sizes.append(len(rows))
    assert np.mean(sizes) == pytest.approx(n * q, rel=0.03)
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.12)  # binomial, not a fixed batch size
    assert np.abs(hits / draws - q).max() < 0.04  # every example independently at rate q


# 8 ---------------------------------------------------------------------------------------
def test_pitfall_08_inactive_factor_keeps_its_optimizer_state(tiny_cfg, monkeypatch):
    made = []
    real = client_mod._optimizer
    monkeypatch.setattr(client_mod, "_optimizer", lambda params, cfg, *head: made.append(real(params, cfg, *head)) or made[-1])
    sim = Simulation(tiny_cfg(method={"name": "la-lora", "options": {"filter": False}}, federation={"local_steps": 4},
                              train={"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.5}))
    _, noised, changed = spied_round(sim, 1)
    by = sim.rt.adapted.by_name
    assert [{by[k].role for k in c} for c in changed] == [{"B", "head"}, {"A", "head"}] * 2  # weight decay never touches the idle factor
    assert changed == [n for n in noised]
    steps = {by[k].role: int(made[0].state[p]["step"]) for k, p in sim.rt.adapted.params.items() if p in made[0].state}
    assert steps == {"A": 2, "B": 2, "head": 4}


# 9 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "rslora", "scale"), [("fedex-lora", False, 4 / 2), ("la-lora+aggregate=fedex", True, 4 / 2**0.5)])
def test_pitfall_09_folding_uses_the_models_lora_scale(tiny_cfg, method, rslora, scale):
    name, _, agg = method.partition("+aggregate=")
    sim = Simulation(tiny_cfg(method={"name": name, "aggregate": agg or None}, adapter={"rslora": rslora}))
    assert sim.method.aggregate.scale == pytest.approx(scale)
    for f in sim.rt.adapted.factors:
        if f.role == "A":
            layer = sim.rt.adapted.model.get_submodule(f"base_model.model.{f.module}")
            assert layer.scaling["default"] == pytest.approx(sim.method.aggregate.scale)
    with pytest.raises(ConfigError, match="adapter.type=lora"):  # VeRA has no alpha: nothing to fold with
        build_method_for(tiny_cfg(method={"name": "fedsa-vera", "aggregate": "fedex"}, adapter={"type": "vera"}))
    assert MethodSetup({}, True, 1, 0, adapter=sim.cfg.adapter).lora_scale("x") == pytest.approx(scale)


# 10 --------------------------------------------------------------------------------------
def test_pitfall_10_every_lora_tensor_maps_to_one_layer():
    assert layer_index("bert.encoder.layer.3.attention.self.query") == 3
    assert layer_index("vit.encoder.layer.11.attention.attention.value") == 11
    assert layer_index("model.layers.7.self_attn.q_proj") == 7
    assert layer_index("classifier") is None
    bad = [Factor("q.A", "q", None, "A"), Factor("q.B", "q", None, "B")]
    with pytest.raises(ConfigError, match="layer index"):
        LayerwiseChoice()(PlanContext(1, 10, bad, ["q.A", "q.B"], frozenset(), {}, 0))


# 11 --------------------------------------------------------------------------------------
def test_pitfall_11_fedsvd_keeps_orthonormal_a_in_the_engine(tiny_cfg):
    sim = Simulation(tiny_cfg(method={"name": "fedsvd"}, federation={"rounds": 2}, eval=FAST))
    sim.run()
    for k in sim.rt.adapted.names(roles=("A",)):
        a = sim.global_state[k].to(torch.float64)
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5), k


# 12 --------------------------------------------------------------------------------------
def test_pitfall_12_personal_accuracy_uses_each_clients_own_b_and_head(tiny_cfg):
    sim = Simulation(tiny_cfg(method={"name": "fedsa-lora"}))
    g = torch.Generator().manual_seed(0)
    for c in sim.clients:  # distinct personal tensors, as after training
        c.local = {k: torch.randn(v.shape, generator=g) for k, v in c.local.items()}
    seen = []
    real = sim.rt.evaluate
    sim.rt.evaluate = lambda state, data=None: seen.append((state, data)) or real(state, data)
    sim.personal_accuracy()
    assert len(seen) == len(sim.clients)
    for (state, data), c, share in zip(seen, sim.clients, sim.shares, strict=True):
        assert data is not None and len(data) == len(share)
        assert set(c.local) <= set(state) and all(torch.equal(state[k], v) for k, v in c.local.items())


# 13 --------------------------------------------------------------------------------------
def test_pitfall_13_weighting_and_participation_are_applied_and_recorded(tiny_cfg):
    got = []
    method = Method("spy", None, None, None, lambda ctx, plan, glob, ups, w: got.append(w) or MeanOfUploads()(ctx, plan, glob, ups, w))
    ups = [{"x": torch.tensor([1.0])}, {"x": torch.tensor([4.0])}]
    data = aggregate_round(method, None, None, {}, ups, [10, 30], "data-size")
    uniform = aggregate_round(method, None, None, {}, ups, [10, 30], "uniform")
    assert got == [[0.25, 0.75], [0.5, 0.5]] and float(data["x"]) == 3.25 and float(uniform["x"]) == 2.5
    assert len(sample_clients(10, 0.3, seed=0, round=1)) == 3 and sample_clients(10, 0.3, seed=0, round=1) != sample_clients(10, 0.3, seed=0, round=2)
    import yaml

    saved = yaml.safe_load(tiny_cfg(federation={"weighting": "uniform", "clients_per_round": 0.5}).to_yaml())["federation"]
    assert saved["weighting"] == "uniform" and saved["clients_per_round"] == 0.5


# 14 --------------------------------------------------------------------------------------
def test_pitfall_14_as_lora_debiases_with_each_clients_own_sigma(tiny_cfg):
    sim = Simulation(tiny_cfg(method={"name": "as-lora"}, federation={"rounds": 10, "local_steps": 1}))
    sigmas = [s.dp.noise_multiplier for s in sim.specs]
    assert len(set(sigmas)) == len(sigmas)  # per client, from its own data size
    traces = []
    upload = sim.method.upload
    method = replace(sim.method, upload=lambda plan, before, after, trace: traces.append(trace) or upload(plan, before, after, trace))
    plan = method.plan(sim.plan_context(1))
    for c, spec in enumerate(sim.specs):
        up = run_client(sim.rt, method, plan, {k: sim.global_state[k] for k in plan.download}, spec, sim.clients[c],
                        local_steps=1, seed=0).upload
        own = spec.dp.noise_multiplier * spec.dp.clip_norm / spec.dp.expected_batch_size
        assert traces[-1].noise_std == pytest.approx(own)
        for group, names in plan.groups.items():
            role = group.split("/")[1]
            expected = sum(upload.energy(k, role, traces[-1].last_grads[k], own) for k in sorted(names))
            assert float(up[f"score/{group}"]) == pytest.approx(expected, rel=1e-6)
