"""Exact / SVD aggregation: FedEx, FLoRA, FedSVD and the QR route to the product's SVD (fp64)."""

from __future__ import annotations

import torch

from fedlora.adapters import Factor, base_weight_name
from fedlora.methods.base import PlanContext, RoundPlan
from fedlora.methods.fedex_lora import FoldResidual
from fedlora.methods.fedsvd import AverageBThenSVD, refactorize
from fedlora.methods.flora import MergeAndReinit
from fedlora.methods.lowrank import lora_modules, product_svd, stack
from fedlora.methods.seams import weighted_mean

D, K, R, S = 12, 9, 3, 0.7  # out features, in features, rank, LoRA scale
A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"
W0 = base_weight_name(A)


def setting(clients: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    factors = [Factor(A, "m", 0, "A"), Factor(B, "m", 0, "B")]
    ctx = PlanContext(1, 5, factors, [A, B, W0], frozenset(), {}, seed)
    plan = RoundPlan(1, frozenset({A, B}), (A, B, W0))
    glob = {A: torch.randn(R, K, generator=g, dtype=torch.float64), B: torch.zeros(D, R, dtype=torch.float64),
            W0: torch.randn(D, K, generator=g, dtype=torch.float64)}
    ups = [{A: torch.randn(R, K, generator=g, dtype=torch.float64), B: torch.randn(D, R, generator=g, dtype=torch.float64)}
           for _ in range(clients)]
    weights = [0.5, 0.3, 0.2][:clients]
    return ctx, plan, glob, ups, weights


def mean_of_products(ups, weights):
    return sum(w * u[B] @ u[A] for u, w in zip(ups, weights, strict=True))


def test_base_weight_name_and_module_pairs():
    assert W0 == "m.base_layer.weight"
    assert lora_modules([Factor(A, "m", 0, "A"), Factor(B, "m", 0, "B"), Factor("h.w", "h", None, "head")]) == [(A, B, W0)]


def test_fedavg_of_factors_is_inexact_but_fedex_is_exact():
    ctx, plan, glob, ups, w = setting()
    avg = weighted_mean(ups, w)
    target = glob[W0] + S * mean_of_products(ups, w)
    assert not torch.allclose(glob[W0] + S * avg[B] @ avg[A], target, atol=1e-3)
    out = FoldResidual(S)(ctx, plan, glob, ups, w)
    assert torch.allclose(out[W0] + S * out[B] @ out[A], target, rtol=0, atol=1e-10)
    assert torch.equal(out[A], avg[A]) and torch.equal(out[B], avg[B])


def test_flora_stacked_product_is_the_weighted_sum_and_lora_restarts():
    ctx, plan, glob, ups, w = setting()
    bs, as_ = stack([u[B] for u in ups], [u[A] for u in ups], w)
    assert bs.shape == (D, 3 * R) and as_.shape == (3 * R, K)
    assert torch.allclose(bs @ as_, mean_of_products(ups, w), rtol=0, atol=1e-12)
    out = MergeAndReinit(S, seed=0)(ctx, plan, glob, ups, w)
    assert torch.allclose(out[W0], glob[W0] + S * mean_of_products(ups, w), rtol=0, atol=1e-12)
    assert not out[B].any() and out[A].abs().max() > 0
    again = MergeAndReinit(S, seed=0)(ctx, plan, glob, ups, w)
    assert torch.equal(out[A], again[A])  # seeded re-initialisation
    bound = 1 / K**0.5  # kaiming-uniform a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert out[A].abs().max() <= bound


def test_qr_route_equals_dense_svd_to_1e6_relative():
    g = torch.Generator().manual_seed(1)
    for d, m, k in [(40, 6, 30), (25, 12, 50), (8, 3, 8)]:
        b = torch.randn(d, m, generator=g, dtype=torch.float64)
        a = torch.randn(m, k, generator=g, dtype=torch.float64)
        u, s, vh = product_svd(b, a)
        dense = b @ a  # (d, k), the product the QR route never forms
        assert torch.allclose(s, torch.linalg.svdvals(dense)[: s.numel()], rtol=1e-6, atol=0)
        assert torch.linalg.norm(u @ torch.diag(s) @ vh - dense) <= 1e-6 * torch.linalg.norm(dense)
        assert torch.allclose(u.T @ u, torch.eye(s.numel(), dtype=torch.float64), atol=1e-10)
        assert torch.allclose(vh @ vh.T, torch.eye(s.numel(), dtype=torch.float64), atol=1e-10)


def test_product_svd_signs_depend_on_the_product_only():
    g = torch.Generator().manual_seed(2)
    b = torch.randn(30, 6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 20, generator=g, dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))  # same product, other factors
    u, s, vh = product_svd(b, a)
    for b2, a2 in [(-b, -a), (b @ rot, rot.T @ a)]:
        u2, s2, vh2 = product_svd(b2, a2)
        torch.testing.assert_close(u2, u)
        torch.testing.assert_close(vh2, vh)
        torch.testing.assert_close(s2, s)
    peak = u.gather(0, u.abs().argmax(0, keepdim=True))
    assert (peak > 0).all()


def test_fedsvd_a_has_orthonormal_rows_and_keeps_the_product():
    ctx, plan, glob, ups, w = setting()
    glob[B] = torch.randn(D, R, dtype=torch.float64)
    b_ups = [{B: u[B]} for u in ups]
    out = AverageBThenSVD()(ctx, plan, glob, b_ups, w)
    b_bar = weighted_mean(b_ups, w)[B]
    assert torch.allclose(out[A] @ out[A].T, torch.eye(R, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(out[B] @ out[A], b_bar @ glob[A], atol=1e-10)
    assert torch.equal(out[W0], glob[W0])  # FedSVD never touches W0


def test_fedsvd_zero_product_gives_orthonormal_a_and_zero_b():
    a_prev = torch.randn(R, K, dtype=torch.float64)
    a_new, b_new = refactorize(torch.zeros(D, R, dtype=torch.float64), a_prev)
    assert not b_new.any() and b_new.shape == (D, R)
    assert torch.allclose(a_new @ a_new.T, torch.eye(R, dtype=torch.float64), atol=1e-12)
    # same row space as the previous A
    proj = a_new.T @ a_new
    assert torch.allclose(a_prev @ proj, a_prev, atol=1e-10)
