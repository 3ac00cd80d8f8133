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
