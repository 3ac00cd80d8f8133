"""LA-LoRA (per-step alternation, binomial filter) and AS-LoRA (per-layer choice) invariants."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.federation.client import run_client
from fedlora.federation.simulation import Simulation
from fedlora.methods import MethodSetup, build_method
from fedlora.methods.as_lora import LayerwiseChoice, MeanAndScoreEMA, SendWithScores, prob_a
from fedlora.methods.base import ClientTrace, PlanContext, RoundPlan
from fedlora.methods.la_lora import binomial_smooth
from tests.helpers import FACTORS, Spy


# ------------------------------------------------------------------ the binomial filter
def test_binomial_filter_keeps_constants_and_never_mixes_rank_rows():
    a = torch.full((3, 10), 2.5, dtype=torch.float64)  # A: (r, k), filtered along k
    assert torch.allclose(binomial_smooth(a, 1), a, atol=1e-14)
    a[1, 4] = 100.0  # a spike in rank row 1 stays in rank row 1
    out = binomial_smooth(a, 1)
    assert torch.equal(out[0], binomial_smooth(a[[0]], 1)[0]) and torch.allclose(out[2], a[2])
    assert torch.allclose(out[1, 2:7] - 2.5, 97.5 * torch.tensor([1, 4, 6, 4, 1], dtype=torch.float64) / 16)
    b = torch.randn(11, 2, dtype=torch.float64)  # B: (d, r), filtered along d (columns)
    assert torch.allclose(binomial_smooth(b, 0)[:, 1], binomial_smooth(b[:, [1]].T, 1)[0])
    # mirror padding at the border: x[-2..] = x[2], x[1]
    x = torch.arange(6, dtype=torch.float64).view(1, 6)
    assert math.isclose(float(binomial_smooth(x, 1)[0, 0]), (2 * 1 + 4 * 1 + 6 * 0 + 4 * 1 + 1 * 2) / 16)


def per_step_changes(tiny_cfg, options, steps=4):
    sim = Simulation(tiny_cfg(method={"name": "la-lora", "options": options}, federation={"local_steps": steps}))
    spy = Spy(sim.method.schedule, sim.rt.adapted)
    method = replace(sim.method, schedule=spy)
    plan = method.plan(sim.plan_context(1))
    run_client(sim.rt, method, plan, {k: sim.global_state[k] for k in plan.download}, sim.specs[0], sim.clients[0],
               local_steps=steps, seed=0)
    snaps = [*spy.snaps, sim.rt.adapted.state()]
    roles = {f.name: f.role for f in sim.rt.adapted.factors}
    changed = [{roles[k] for k in a if not torch.equal(a[k], b[k])} for a, b in zip(snaps, snaps[1:], strict=False)]
    noised = [{roles[k] for k in n} for n in spy.noised]
    return changed, noised


def test_la_lora_alternates_one_factor_per_step_b_first(tiny_cfg):
    changed, noised = per_step_changes(tiny_cfg, {})
    assert changed == [{"B", "head"}, {"A", "head"}, {"B", "head"}, {"A", "head"}]
    assert noised == changed  # noise (the privatised gradient) only on the active factor


def test_la_lora_code_phase_starts_with_a(tiny_cfg):
    changed, _ = per_step_changes(tiny_cfg, {"phase": "A", "filter": False}, steps=2)
    assert changed == [{"A", "head"}, {"B", "head"}]


def test_la_lora_rejects_a_bad_phase():
    with pytest.raises(ConfigError, match="phase"):
        build_method("la-lora", MethodSetup({"phase": "C"}, True, 2, 0))


# ------------------------------------------------------------------------- AS-LoRA
def ctx(rnd, rounds=30, memory=None, seed=0):
    return PlanContext(rnd, rounds, FACTORS, [f.name for f in FACTORS], frozenset(), memory or {}, seed)


def test_as_lora_warmup_is_floor_tenth_of_rounds_alternating_b_a():
    plan = LayerwiseChoice()
    modes = [plan(ctx(r, rounds=39)).info["modes"] for r in range(1, 4)]  # floor(3.9) = 3 rounds
    assert modes == ["BBB", "AAA", "BBB"]
    assert plan(ctx(4, rounds=39)).info["temperature"] == pytest.approx(0.95)
    assert plan(ctx(4, rounds=19)).info["temperature"] == pytest.approx(0.95 ** 2)  # floor(1.9) = 1 -> 2 rounds


def test_as_lora_short_runs_warm_up_with_b_then_a_so_both_factors_get_scores():
    plan = LayerwiseChoice()
    assert [plan(ctx(r, rounds=4)).info["modes"] for r in (1, 2)] == ["BBB", "AAA"]
    assert plan(ctx(1, rounds=1)).info["modes"] == "BBB"
    assert plan(ctx(3, rounds=4)).info["temperature"] == pytest.approx(0.95)


def test_as_lora_each_layer_trains_exactly_one_factor_and_sampling_is_seeded():
    memory = {"ema": {"0/A": 5.0, "0/B": 1.0, "1/A": 1.0, "1/B": 5.0}}  # layer 2: no score yet -> p_A = 0.5
    plan = LayerwiseChoice()
    for rnd in range(4, 30):
        p = plan(ctx(rnd, memory=memory))
        for layer in range(3):
            roles = {f.role for f in FACTORS if f.layer == layer and f.name in p.trainable}
            assert roles == {p.info["modes"][layer]}
        assert "head.w" in p.trainable
        assert p == plan(ctx(rnd, memory=memory))
    late = plan(ctx(29, memory=memory))  # T = 0.1: d = +-2/3 -> p_A = sigmoid(+-6.7)
    assert late.info["modes"][:2] == "AB"
    assert prob_a(None, 1.0, 1.0) == 1.0 - 1.0 and prob_a(1.0, None, 1.0) == 1.0 and prob_a(None, None, 1.0) == 0.5


def trace(seed):
    g = torch.Generator().manual_seed(seed)
    return ClientTrace({"l0.A": torch.randn(2, 8, generator=g), "l1.B": torch.randn(8, 2, generator=g)}, 0.1, 3)


def test_as_lora_scores_are_post_processing_of_noisy_gradients_only():
    p = RoundPlan(5, frozenset({"l0.A", "l1.B"}), ("l0.A", "l1.B"), {}, {"0/A": frozenset({"l0.A"}), "1/B": frozenset({"l1.B"})})
    send = SendWithScores(seed=0, rounds=30)
    x = {"l0.A": torch.zeros(2, 8), "l1.B": torch.zeros(8, 2)}
    y = {"l0.A": torch.ones(2, 8), "l1.B": torch.ones(8, 2)}
    up1, up2 = send(p, x, x, trace(0)), send(p, y, y, trace(0))  # same noisy grads, different data/weights
    assert set(up1) == {"l0.A", "l1.B", "score/0/A", "score/1/B"}
    assert torch.equal(up1["score/0/A"], up2["score/0/A"]) and torch.equal(up1["score/1/B"], up2["score/1/B"])
    # debias: pure noise of the declared std scores about zero, floored at 0
    noise = ClientTrace({"l0.A": 0.1 * torch.randn(2, 8), "l1.B": 0.1 * torch.randn(8, 2)}, 10.0, 3)
    assert float(send(p, x, x, noise)["score/0/A"]) == 0.0


def test_as_lora_aggregate_excludes_scores_and_updates_ema_of_the_active_factor_only():
    p = RoundPlan(5, frozenset({"l0.A"}), ("l0.A",))
    c = ctx(5, memory={"ema": {"0/A": 1.0, "0/B": 7.0}})
    ups = [{"l0.A": torch.ones(2, 2), "score/0/A": torch.tensor(3.0)}, {"l0.A": torch.zeros(2, 2), "score/0/A": torch.tensor(5.0)}]
    out = MeanAndScoreEMA()(c, p, {"l0.A": torch.zeros(2, 2)}, ups, [0.75, 0.25])
    assert set(out) == {"l0.A"} and torch.allclose(out["l0.A"], torch.full((2, 2), 0.75))
    assert c.memory["ema"] == {"0/A": pytest.approx(0.9 * 1.0 + 0.1 * 4.0), "0/B": 7.0}


def test_as_lora_on_the_tiny_model_trains_each_layers_chosen_factor(tiny_cfg):
    sim = Simulation(tiny_cfg(method={"name": "as-lora", "options": {"curvature": "secant"}},
                              federation={"rounds": 10, "local_steps": 2}))
    lora = [f for f in sim.rt.adapted.factors if f.role in ("A", "B")]
    assert all(f.layer is not None for f in lora)  # every LoRA tensor maps to one layer
    layers = sorted({f.layer for f in lora})
    for rnd in (1, 2):
        before = dict(sim.global_state)
        rec = sim.run_round(rnd)
        assert not any(k.startswith("score/") for k in sim.global_state)
        changed = {(f.layer, f.role) for f in lora if not torch.equal(before[f.name], sim.global_state[f.name])}
        assert changed == {(lay, rec["plan_modes"][i]) for i, lay in enumerate(layers)}
        sim.round = rnd
    assert rec["plan_modes"] != "" and set(sim.memory["ema"]) <= {f"{lay}/{m}" for lay in layers for m in "AB"}
    assert sim.memory["ema"]  # scores reached the server


# ------------------------------------------------------------------ faithful defaults (issue 18)
def test_as_lora_default_is_the_papers_curvature_aware_score_in_its_private_form():
    """Default options: the secant curvature (privacy-exact) in the last 10 rounds, as the reference
    code's USE_CURV = r > ROUNDS - 10; the run is covered by DP and named by its variant."""
    from fedlora.methods.as_lora import RecordLastTwo

    m = build_method("as-lora", MethodSetup({}, True, 30, 0))
    assert isinstance(m.schedule, RecordLastTwo) and m.upload.history is m.schedule.history
    assert (m.upload.rounds, m.upload.curvature_rounds, m.upload.fd_eps) == (30, 10, None)
    assert m.info == {"curvature": "secant"} and not m.reads_private_data
    assert m.variant == "as-lora (curvature secant)"
    off = build_method("as-lora", MethodSetup({"curvature": "off"}, True, 30, 0))
    assert type(off.schedule).__name__ == "Joint" and off.variant == "as-lora (curvature off)"


def test_as_lora_secant_changes_the_score_only_in_the_last_rounds():
    from fedlora.methods.as_lora import RecordLastTwo

    m = build_method("as-lora", MethodSetup({}, True, 12, 0))
    g1, g2 = torch.ones(2, 3), torch.full((2, 3), 0.2)  # the gradient shrinks: positive curvature
    plan = lambda r: RoundPlan(r, frozenset({"l0.A"}), ("l0.A",), groups={"0/A": frozenset({"l0.A"})})  # noqa: E731
    scores = {}
    for rnd in (2, 3):  # round 2 <= 12 - 10: energy only; round 3: the secant factor
        assert isinstance(m.schedule, RecordLastTwo)
        m.schedule.transform({"l0.A": g1}, plan(rnd), 0)
        m.schedule.transform({"l0.A": g2}, plan(rnd), 1)
        trace = ClientTrace({"l0.A": g2}, 0.0, 2)
        scores[rnd] = float(m.upload(plan(rnd), {}, {"l0.A": g2}, trace)["score/0/A"])
    assert scores[3] < scores[2]


def test_la_lora_filters_the_factors_of_a_1x1_convolution_as_matrices():
    """A 1x1 conv's A is (r, k, 1, 1), its B (d, r, 1, 1): filtered exactly as the (r, k) / (d, r)
    matrices (the old code skipped them while its info said filter: true); other shapes are refused."""
    from fedlora.methods.la_lora import AlternateSteps

    sched = AlternateSteps(first="B")
    plan = RoundPlan(1, frozenset({"a", "b"}), (), groups={"A": frozenset({"a"}), "B": frozenset({"b"})})
    a, b = torch.randn(3, 10, 1, 1, dtype=torch.float64), torch.randn(11, 3, 1, 1, dtype=torch.float64)
    out_b = sched.transform({"b": b}, plan, 0)["b"]  # step 0 trains B
    out_a = sched.transform({"a": a}, plan, 1)["a"]  # step 1 trains A
    assert out_a.shape == a.shape and out_b.shape == b.shape
    assert torch.equal(out_a.reshape(3, 10), binomial_smooth(a.reshape(3, 10), 1))
    assert torch.equal(out_b.reshape(11, 3), binomial_smooth(b.reshape(11, 3), 0))
    assert not torch.equal(out_a, a) and not torch.equal(out_b, b)
    with pytest.raises(ConfigError, match="filter=false"):
        sched.transform({"a": torch.randn(3, 10, 3, 3)}, plan, 1)
    assert build_method("la-lora", MethodSetup({}, True, 4, 0)).variant == "la-lora (phase B, filter on)"
