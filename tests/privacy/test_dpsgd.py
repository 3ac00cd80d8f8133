"""The DP-SGD step: fused per-sample gradients against a one-example loop, and the clipping bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.federation.runtime import Runtime
from fedlora.privacy.dpsgd import (
    DPParams,
    add_noise,
    clip_factors,
    clipped_sum,
    loop_per_sample,
    privatize,
)
from fedlora.privacy.noise import SecureNoise, SeededNoise, noise_stream


@pytest.fixture
def runtime64(tiny_cfg):
    rt = Runtime(tiny_cfg(adapter={"dropout": 0.0}))
    rt.adapted.model.double()
    with torch.no_grad():  # non-zero B so that A has a gradient too
        for f in rt.adapted.factors:
            if f.role == "B":
                rt.adapted.params[f.name].normal_(0, 0.5)
    return rt


def _fused(rt, batch, names):
    rt.hooks.enabled = True
    losses = rt.task.loss(rt.adapted.model, batch)
    torch.autograd.grad(losses.sum(), [rt.adapted.params[k] for k in names])
    rt.hooks.enabled = False
    return rt.hooks.fused_grads(names)


def _assert_fused_matches_loop(rt, names):
    """The hooks' per-example gradients of ``names`` equal the one-example loop's, in fp64, and are not zero."""
    rt.adapted.set_active(set(names))
    batch = rt.task.batch(rt.task.train, np.arange(9), rt.device)
    fused = _fused(rt, batch, names)
    params = {k: rt.adapted.params[k] for k in names}
    oracle = loop_per_sample(params, lambda i: rt.task.loss(rt.adapted.model, {k: v[i] for k, v in batch.items()}), 9)
    for k in names:
        assert fused[k].shape == oracle[k].shape and fused[k].dtype == torch.float64
        rel = (fused[k] - oracle[k]).norm() / oracle[k].norm().clamp(min=1e-30)
        assert rel < 1e-6, k
    assert not any(torch.equal(oracle[k], torch.zeros_like(oracle[k])) for k in names)


@pytest.mark.parametrize("roles", [("A", "B", "head"), ("B",), ("A",)])
def test_fused_per_sample_gradients_match_one_example_loop(runtime64, roles):
    _assert_fused_matches_loop(runtime64, runtime64.adapted.names(roles=roles))


def test_inactive_tensors_get_no_per_sample_gradient(runtime64):
    rt = runtime64
    b_names = rt.adapted.names(roles=("B",))
    rt.adapted.set_active(set(b_names))
    batch = rt.task.batch(rt.task.train, np.arange(4), rt.device)
    grads = _fused(rt, batch, b_names)
    assert set(grads) == set(b_names)
    a_modules = {id(rt.hooks.linear[k][0]) for k in rt.adapted.names(roles=("A",))}
    assert not a_modules & set(rt.hooks._records)  # nothing recorded for frozen A


def test_clipping_bounds_the_noiseless_sum():
    gen = torch.Generator().manual_seed(0)
    per_sample = {"a": 100 * torch.randn(32, 4, 8, generator=gen), "b": 100 * torch.randn(32, 8, generator=gen)}
    c = 2.0
    factors = clip_factors(per_sample, c)
    clipped = {k: factors.view(-1, *[1] * (v.dim() - 1)) * v for k, v in per_sample.items()}
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in clipped.values()))
    assert torch.all(norms <= c * (1 + 1e-5))  # every example's influence is at most C
    summed = clipped_sum(per_sample, factors)
    total = torch.sqrt(sum(v.pow(2).sum() for v in summed.values()))
    assert total <= 32 * c * (1 + 1e-5)


def test_removing_one_example_moves_the_noiseless_sum_by_at_most_c():
    gen = torch.Generator().manual_seed(1)
    per_sample = {"w": 50 * torch.randn(16, 3, 5, generator=gen)}
    c = 1.5
    full = clipped_sum(per_sample, clip_factors(per_sample, c))["w"]
    for drop in range(16):
        keep = {k: torch.cat([v[:drop], v[drop + 1 :]]) for k, v in per_sample.items()}
        part = clipped_sum(keep, clip_factors(keep, c))["w"]
        assert (full - part).norm() <= c * (1 + 1e-5)


def test_small_gradients_are_not_scaled():
    per_sample = {"w": torch.full((4, 3), 0.01)}
    assert torch.allclose(clip_factors(per_sample, 1.0), torch.ones(4))


@pytest.mark.parametrize("source", ["secure", "seeded"])
def test_noise_has_std_sigma_c_and_result_is_divided_by_expected_batch(source):
    noise = SecureNoise() if source == "secure" else SeededNoise(torch.Generator().manual_seed(2))
    zeros = {"w": torch.zeros(0, 200, 200)}
    out = privatize(zeros, DPParams(noise_multiplier=0.7, clip_norm=2.0, expected_batch_size=10.0), noise)["w"]
    assert out.mean().abs() < 0.01
    assert abs(out.std().item() - 0.7 * 2.0 / 10.0) < 0.003


def test_secure_noise_is_standard_normal_and_never_repeats():
    z = SecureNoise().normal((400_000,), dtype=torch.float64)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1.0) < 0.01
    assert abs(((z.abs() < 1.0).double().mean() - 0.6827).item()) < 0.005  # the normal's central mass
    assert torch.isfinite(z).all()
    assert not torch.equal(SecureNoise().normal((8,), dtype=torch.float64), SecureNoise().normal((8,), dtype=torch.float64))
    odd = SecureNoise().normal((3, 5), dtype=torch.float32)
    assert odd.shape == (3, 5) and odd.dtype == torch.float32


def test_reproducible_noise_repeats_only_when_asked():
    seeded = [noise_stream(True, 7, "client", 0, 1).normal((5,), dtype=torch.float32) for _ in range(2)]
    assert torch.equal(*seeded)
    secure = [noise_stream(False, 7, "client", 0, 1).normal((5,), dtype=torch.float32) for _ in range(2)]
    assert not torch.equal(*secure)
    again = add_noise({"w": torch.zeros(3)}, std=1.0, noise=SeededNoise(torch.Generator().manual_seed(5)))["w"]
    assert torch.equal(again, add_noise({"w": torch.zeros(3)}, std=1.0, noise=SeededNoise(torch.Generator().manual_seed(5)))["w"])


@pytest.mark.parametrize("roles", [("A", "B", "head"), ("B",), ("A",)])
def test_fused_vera_per_sample_gradients_match_one_example_loop(tiny_cfg, roles):
    """VeRA's scaling vectors (lambda_d as A, lambda_b as B) get their per-example gradients from the
    layer's hooks, like LoRA factors, not from the one-example loop; both agree in fp64."""
    rt = Runtime(tiny_cfg(adapter={"type": "vera", "dropout": 0.0}))
    rt.adapted.model.double()
    with torch.no_grad():  # PEFT starts lambda_b at 0: make both vectors matter
        for f in rt.adapted.factors:
            if f.role in ("A", "B"):
                rt.adapted.params[f.name].normal_(0, 0.5)
    names = rt.adapted.names(roles=roles)
    vera = [k for k in names if k not in rt.hooks.linear]
    assert vera and set(vera) <= rt.hooks.fused and not set(vera) & set(rt.hooks.other)
    _assert_fused_matches_loop(rt, names)


def test_vera_with_dropout_keeps_the_exact_loop(tiny_cfg):
    rt = Runtime(tiny_cfg(adapter={"type": "vera", "dropout": 0.1}))
    vera = [f.name for f in rt.adapted.factors if f.role in ("A", "B")]
    assert vera and set(vera) <= set(rt.hooks.other) and not set(vera) & rt.hooks.fused


# ------------------------------------------------------------------ per-group clipping (issue 18)
def _per_sample_two_groups(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lora_A": 0.2 * torch.randn(16, 4, 6, generator=g, dtype=torch.float64),
            "lora_B": 0.1 * torch.randn(16, 5, 4, generator=g, dtype=torch.float64),
            "head.weight": 3.0 * torch.randn(16, 2, 5, generator=g, dtype=torch.float64)}


GROUPS = {"lora_A": "adapter", "lora_B": "adapter", "head.weight": "head"}


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_per_group_clipping_bounds_each_examples_influence_by_c(fraction):
    """Each example's clipped gradient over all groups has norm <= C (C_head^2 + C_adapter^2 = C^2),
    each group's part <= its own bound, and the noise is sigma*C on every coordinate, as flat."""
    per_sample = _per_sample_two_groups()
    per_sample["lora_A"][3] *= 100  # an example with a huge adapter gradient
    dp = DPParams(1.0, 2.0, 16.0, head_clip_fraction=fraction)
    bounds = dp.group_bounds()
    assert bounds["head"] ** 2 + bounds["adapter"] ** 2 == pytest.approx(dp.clip_norm**2)
    from fedlora.privacy.dpsgd import group_clip_factors

    factors = group_clip_factors(per_sample, dp, GROUPS)
    clipped = {k: factors[k][:, None, None] * g for k, g in per_sample.items()}
    total = sum(g.flatten(1).pow(2).sum(1) for g in clipped.values()).sqrt()
    assert float(total.max()) <= dp.clip_norm * (1 + 1e-9)
    head = clipped["head.weight"].flatten(1).norm(dim=1)
    adapter = (clipped["lora_A"].flatten(1).pow(2).sum(1) + clipped["lora_B"].flatten(1).pow(2).sum(1)).sqrt()
    assert float(head.max()) <= bounds["head"] * (1 + 1e-9) and float(adapter.max()) <= bounds["adapter"] * (1 + 1e-9)
    # the head (norm ~ 3 sqrt(10)) is clipped to its bound; small adapter gradients are left alone
    assert float(head.min()) == pytest.approx(bounds["head"], rel=1e-5)
    raw = (per_sample["lora_A"].flatten(1).pow(2).sum(1) + per_sample["lora_B"].flatten(1).pow(2).sum(1)).sqrt()
    small = [i for i in range(16) if float(raw[i]) < 0.99 * bounds["adapter"]]
    assert all(float(factors["lora_A"][i]) == 1.0 for i in small) and (small or fraction > 0.5)
    # the released gradient: clipped sum + N(0, (sigma C)^2) per coordinate, / B (the noise of the flat step)
    noisy = privatize(per_sample, dp, SeededNoise(torch.Generator().manual_seed(5)), groups=GROUPS)
    zero_noise = privatize(per_sample, DPParams(0.0, 2.0, 16.0, fraction), SecureNoise(), groups=GROUPS)
    flat_noisy = privatize(per_sample, DPParams(1.0, 2.0, 16.0), SeededNoise(torch.Generator().manual_seed(5)))
    flat_clean = privatize(per_sample, DPParams(0.0, 2.0, 16.0), SecureNoise())
    for k in per_sample:
        assert torch.allclose(zero_noise[k], clipped[k].sum(0) / 16.0)
        assert torch.allclose(noisy[k] - zero_noise[k], flat_noisy[k] - flat_clean[k])  # same noise, same std


def test_per_group_clipping_gives_the_factors_their_own_share():
    """Flat clipping at C = 2 hands the adapter a few percent of the clipped norm when the head
    dominates (docs/privacy.md); per-group clipping hands it up to C sqrt(1 - f)."""
    per_sample = _per_sample_two_groups(1)
    flat = privatize(per_sample, DPParams(0.0, 2.0, 16.0), SecureNoise())
    grouped = privatize(per_sample, DPParams(0.0, 2.0, 16.0, 0.5), SecureNoise(), groups=GROUPS)
    assert float(grouped["lora_A"].norm()) > 2 * float(flat["lora_A"].norm())


def test_flat_privatize_is_unchanged_by_the_group_map():
    per_sample = _per_sample_two_groups(2)
    dp = DPParams(0.7, 2.0, 16.0)
    a = privatize(per_sample, dp, SeededNoise(torch.Generator().manual_seed(1)))
    b = privatize(per_sample, dp, SeededNoise(torch.Generator().manual_seed(1)), groups=GROUPS)
    c = clipped_sum(per_sample, clip_factors(per_sample, 2.0))
    assert all(torch.equal(a[k], b[k]) for k in a)
    signal: dict[str, float] = {}
    privatize(per_sample, dp, SecureNoise(), signal=signal)
    assert signal == {k: pytest.approx(float(v.pow(2).sum())) for k, v in c.items()}
