"""User-level DP: clipped upload deltas, equal weights, server noise, partial uploads, accounting."""

from __future__ import annotations

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.federation.simulation import Simulation
from fedlora.methods.base import PlanContext, RoundPlan
from fedlora.methods.seams import MeanOfUploads
from fedlora.privacy.accounting import epsilon
from fedlora.privacy.user_level import UserLevelDP, clip_delta, plan_user_level, upload_delta

CTX = PlanContext(round=1, rounds=1, factors=[], global_keys=[], local_keys=frozenset(), memory={}, seed=0)
PLAN = RoundPlan(1, frozenset(), ())


def _global() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"A": torch.randn(4, 16, generator=gen), "B": torch.randn(16, 4, generator=gen), "head": torch.randn(2, 16, generator=gen)}


def _uploads(glob, keys, k, scale, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{n: glob[n] + scale * torch.randn(glob[n].shape, generator=gen) for n in keys} for _ in range(k)]


def _flat_norm(state, ref, keys):
    return torch.sqrt(sum((state[n].double() - ref[n].double()).pow(2).sum() for n in keys)).item()


def test_each_upload_delta_is_clipped_to_s_over_the_uploaded_tensors_only():
    glob, s = _global(), 0.5
    for up in _uploads(glob, ["A", "head"], 5, scale=10.0):
        clipped = clip_delta(upload_delta(up, glob), s)
        assert set(clipped) == {"A", "head"}
        norm = torch.sqrt(sum(d.pow(2).sum() for d in clipped.values())).item()
        assert norm == pytest.approx(s, rel=1e-9)  # far above S: scaled down onto the sphere
    small = {"A": glob["A"] + 1e-3}
    assert torch.allclose(clip_delta(upload_delta(small, glob), s)["A"], torch.full_like(glob["A"], 1e-3, dtype=torch.float64), atol=1e-6)


def test_partial_upload_changes_only_the_uploaded_tensors_and_moves_by_at_most_s():
    glob, s = _global(), 0.7
    agg = UserLevelDP(MeanOfUploads(), clip_norm=s, noise_multiplier=0.0, seed=0)
    uploads = _uploads(glob, ["A"], 3, scale=5.0)  # FedSA-style: only A leaves the client
    out = agg(CTX, PLAN, glob, uploads, [1 / 3] * 3)
    assert torch.equal(out["B"], glob["B"]) and torch.equal(out["head"], glob["head"])
    assert 0 < _flat_norm(out, glob, ["A"]) <= s * (1 + 1e-6)


def test_equal_weights_are_enforced():
    glob = _global()
    agg = UserLevelDP(MeanOfUploads(), clip_norm=1.0, noise_multiplier=0.0, seed=0)
    uploads = _uploads(glob, ["B", "head"], 2, scale=3.0)
    skewed, even = agg(CTX, PLAN, glob, uploads, [0.95, 0.05]), agg(CTX, PLAN, glob, uploads, [0.5, 0.5])
    expected = [clip_delta(upload_delta(u, glob), 1.0) for u in uploads]
    for n in ("B", "head"):
        assert torch.equal(skewed[n], even[n])
        assert torch.allclose(even[n].double(), glob[n].double() + (expected[0][n] + expected[1][n]) / 2, atol=1e-6)


def test_one_client_moves_the_noiseless_mean_by_at_most_s_over_k():
    glob, s, k = _global(), 1.0, 4
    agg = UserLevelDP(MeanOfUploads(), clip_norm=s, noise_multiplier=0.0, seed=0)
    uploads = _uploads(glob, ["A", "B"], k, scale=4.0)
    other = _uploads(glob, ["A", "B"], 1, scale=4.0, seed=9)[0]
    base = agg(CTX, PLAN, glob, uploads, [1 / k] * k)
    swapped = agg(CTX, PLAN, glob, [*uploads[:-1], other], [1 / k] * k)
    assert _flat_norm(base, swapped, ["A", "B"]) <= 2 * s / k * (1 + 1e-6)  # replace one = remove + add


@pytest.mark.parametrize("reproducible", [False, True])
def test_server_noise_has_std_sigma_s_over_k_secure_unless_reproducible(reproducible):
    glob = {"W": torch.zeros(300, 300)}
    sigma, s, k = 1.5, 2.0, 4
    agg = UserLevelDP(MeanOfUploads(), clip_norm=s, noise_multiplier=sigma, seed=3, reproducible_noise=reproducible)
    uploads = [{"W": torch.zeros(300, 300)} for _ in range(k)]  # zero deltas: what moves is noise
    out = agg(CTX, PLAN, glob, uploads, [1 / k] * k)["W"]
    assert out.mean().abs() < 0.01
    assert out.std().item() == pytest.approx(sigma * s / k, rel=0.01)
    # seeded noise repeats for the same round; secure noise never does (no client can strip it)
    assert torch.equal(out, agg(CTX, PLAN, glob, uploads, [1 / k] * k)["W"]) is reproducible
    ctx2 = PlanContext(2, 2, [], [], frozenset(), {}, 0)
    assert not torch.equal(out, agg(ctx2, PLAN, glob, uploads, [1 / k] * k)["W"])  # fresh noise each round


def test_uploads_the_server_does_not_hold_are_refused():
    glob = _global()
    agg = UserLevelDP(MeanOfUploads(), clip_norm=1.0, noise_multiplier=1.0, seed=0)
    with pytest.raises(ConfigError, match="score"):
        agg(CTX, PLAN, glob, [{"A": glob["A"], "score": torch.tensor(1.0)}], [1.0])


def test_calibrated_sigma_u_meets_the_target_over_rounds_and_matches_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    plan = plan_user_level(clip_norm=1.0, target_epsilon=2.0, noise_multiplier=None, delta=1e-5,
                           clients_per_round=3, num_clients=10, rounds=50)
    assert plan.sample_rate == 0.3
    assert plan.epsilon(50) <= 2.0 < epsilon([(plan.noise_multiplier * 0.99, 0.3, 50)], delta=1e-5, accountant="rdp")
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(plan.noise_multiplier)), 50)
    google = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    assert abs(plan.epsilon(50) - google) / google < 0.01


@pytest.mark.parametrize("method,sample_level", [("fedsa-lora", False), ("ffa-lora", True)])
def test_simulation_with_user_level_dp_reports_its_epsilon(tiny_cfg, method, sample_level):
    cfg = tiny_cfg(method={"name": method}, privacy={"enabled": sample_level,
                                                     "user_level": {"enabled": True, "epsilon": 4.0, "clip_norm": 0.5}})
    sim = Simulation(cfg)
    assert isinstance(sim.method.aggregate, UserLevelDP)
    result = sim.run()
    last = result.metrics[-1]
    assert 0 < last["user_epsilon"] <= 4.0
    assert last["user_epsilon"] > result.metrics[0]["user_epsilon"]
    assert "user-level" in last["guarantees"]
    assert ("sample-level" in last["guarantees"]) == sample_level
    assert (last["epsilon"] is not None) == sample_level


def test_guarantees_without_user_level(tiny_cfg):
    sim = Simulation(tiny_cfg(privacy={"enabled": False}))
    assert sim.user_dp is None and sim.guarantees(1) == "none (no DP)"


def test_server_lr_scales_the_released_noisy_mean_and_leaves_the_accounting_alone():
    """eta * (noisy mean): post-processing of the mechanism's output, same noise draw, same epsilon."""
    glob = _global()
    uploads = _uploads(glob, ["A", "head"], 3, scale=2.0)
    plain = UserLevelDP(MeanOfUploads(), clip_norm=0.5, noise_multiplier=1.0, seed=4, reproducible_noise=True)
    fast = UserLevelDP(MeanOfUploads(), clip_norm=0.5, noise_multiplier=1.0, seed=4, reproducible_noise=True, server_lr=3.0)
    one, three = plain(CTX, PLAN, glob, uploads, [1 / 3] * 3), fast(CTX, PLAN, glob, uploads, [1 / 3] * 3)
    for n in ("A", "head"):
        assert torch.allclose(three[n].double() - glob[n].double(), 3 * (one[n].double() - glob[n].double()), atol=1e-5)
    assert torch.equal(three["B"], glob["B"])
    kw = {"clip_norm": 1.0, "target_epsilon": 4.0, "noise_multiplier": None, "delta": 1e-5, "clients_per_round": 30,
          "num_clients": 1000, "rounds": 20}
    a, b = plan_user_level(**kw), plan_user_level(**kw, server_lr=5.0)
    assert b.server_lr == 5.0 and a.noise_multiplier == b.noise_multiplier and a.epsilon(20) == b.epsilon(20) <= 4.0
    assert b.ledger(20, planned_rounds=20, clients_per_round=30)["noise_std_on_mean"] == b.noise_multiplier / 30
    from fedlora.config import ExperimentConfig
    from fedlora.federation.simulation import build_method_for

    assert b.wrap(build_method_for(ExperimentConfig()), seed=0).aggregate.server_lr == 5.0


def test_a_cosine_schedule_scales_the_server_lr_by_round():
    """train.lr_schedule=cosine: eta x the round's factor (1 in round 1, the final fraction in the last)."""
    glob = _global()
    uploads = _uploads(glob, ["A", "head"], 3, scale=2.0)
    kw = {"clip_norm": 0.5, "noise_multiplier": 1.0, "seed": 4, "reproducible_noise": True, "server_lr": 2.0}
    plain = UserLevelDP(MeanOfUploads(), **kw)
    cosine = UserLevelDP(MeanOfUploads(), **kw, lr_schedule="cosine", lr_final_fraction=0.25)
    for rnd, factor in ((1, 1.0), (5, 0.25)):
        ctx = PlanContext(round=rnd, rounds=5, factors=[], global_keys=[], local_keys=frozenset(), memory={}, seed=0)
        ref, got = plain(ctx, PLAN, glob, uploads, [1 / 3] * 3), cosine(ctx, PLAN, glob, uploads, [1 / 3] * 3)
        for n in ("A", "head"):
            assert torch.allclose(got[n].double() - glob[n].double(), factor * (ref[n].double() - glob[n].double()), atol=1e-5)


def test_the_shipped_user_level_config_is_cross_device_and_within_epsilon_8():
    from pathlib import Path

    from fedlora.config import load_config
    from fedlora.federation.simulation import user_level_for

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "user-level.yaml")
    fed, ul = cfg.federation, cfg.privacy.user_level
    assert ul.enabled and fed.num_clients >= 1000 and fed.clients_per_round < 1
    plan = user_level_for(cfg)
    assert plan.sample_rate == fed.clients_per_round and plan.epsilon(fed.rounds) <= ul.epsilon <= 8
    assert plan.server_lr == ul.server_lr and cfg.eval.subset is not None
