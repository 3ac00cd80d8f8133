"""Exact / SVD aggregation on the image task's LoRA factors: PEFT keeps a 1x1 conv's A as
(r, in, 1, 1), B as (out, r, 1, 1) and W0 as (out, in, 1, 1); FedEx-LoRA, FLoRA and FedSVD
treat them as matrices and hand back the original shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlora.adapters import Factor, base_weight_name, inject_adapters
from fedlora.config import AdapterConfig
from fedlora.errors import ConfigError
from fedlora.methods.base import PlanContext, RoundPlan
from fedlora.methods.fedex_lora import FoldResidual
from fedlora.methods.fedsvd import AverageBThenSVD
from fedlora.methods.flora import MergeAndReinit
from fedlora.methods.seams import weighted_mean

D, K, R, S = 10, 7, 3, 0.5
A, B = "c.lora_A.default.weight", "c.lora_B.default.weight"
W0 = base_weight_name(A)


def conv_setting():
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, 1, 1, generator=g, dtype=torch.float64)  # noqa: E731
    ctx = PlanContext(1, 5, [Factor(A, "c", 0, "A"), Factor(B, "c", 0, "B")], [A, B, W0], frozenset(), {}, 0)
    plan = RoundPlan(1, frozenset({A, B}), (A, B, W0))
    glob = {A: rand(R, K), B: rand(D, R), W0: rand(D, K)}
    ups = [{A: rand(R, K), B: rand(D, R)} for _ in range(3)]
    return ctx, plan, glob, ups, [0.5, 0.3, 0.2]


def prod(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return b[..., 0, 0] @ a[..., 0, 0]  # (d, k)


def target(glob, ups, w):
    return glob[W0][..., 0, 0] + S * sum(wi * prod(u[B], u[A]) for u, wi in zip(ups, w, strict=True))


def test_fedex_and_flora_fold_the_exact_product_into_a_conv_weight():
    ctx, plan, glob, ups, w = conv_setting()
    out = FoldResidual(S)(ctx, plan, glob, ups, w)
    assert out[W0].shape == (D, K, 1, 1) and out[A].shape == (R, K, 1, 1)
    assert torch.allclose(out[W0][..., 0, 0] + S * prod(out[B], out[A]), target(glob, ups, w), atol=1e-10)
    out = MergeAndReinit(S, seed=0)(ctx, plan, glob, ups, w)
    assert out[W0].shape == (D, K, 1, 1) and out[A].shape == (R, K, 1, 1) and not out[B].any()
    assert torch.allclose(out[W0][..., 0, 0], target(glob, ups, w), atol=1e-10)


def test_fedsvd_refactorises_conv_factors_in_their_shapes():
    ctx, plan, glob, ups, w = conv_setting()
    b_ups = [{B: u[B]} for u in ups]
    out = AverageBThenSVD()(ctx, plan, glob, b_ups, w)
    assert out[A].shape == (R, K, 1, 1) and out[B].shape == (D, R, 1, 1)
    a = out[A][..., 0, 0]
    assert torch.allclose(a @ a.T, torch.eye(R, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(prod(out[B], out[A]), prod(weighted_mean(b_ups, w)[B], glob[A]), atol=1e-10)


def test_as_lora_scores_conv_gradients_as_matrices():
    from fedlora.methods.as_lora import SendWithScores

    up = SendWithScores(seed=0, rounds=5)
    g_a, g_b = torch.randn(R, K, 1, 1), torch.randn(D, R, 1, 1)
    assert torch.equal(up.projected(A, "A", g_a), up.projected(A, "A", g_a[..., 0, 0]))
    assert torch.equal(up.projected(B, "B", g_b), up.projected(B, "B", g_b[..., 0, 0]))
    assert up.energy(B, "B", g_b, 0.0) > 0


def test_a_run_stopped_before_its_first_round_has_no_aggregation_error(tmp_path):
    from fedlora.report.table import mean_aggregation_error

    assert mean_aggregation_error(tmp_path) is None  # no metrics.jsonl: the compare table still writes


def test_aggregation_error_is_measured_on_conv_factors():
    from fedlora.federation.diagnostics import aggregation_errors

    ctx, plan, glob, ups, w = conv_setting()
    fedex = type("M", (), {"aggregate": FoldResidual(S)})()
    assert aggregation_errors(fedex, ctx, plan, glob, ups, w, S)["c"] < 1e-12  # exact
    fedavg = type("M", (), {"aggregate": staticmethod(lambda c, p, g, u, ws: {**g, **weighted_mean(u, ws)})})()
    assert aggregation_errors(fedavg, ctx, plan, glob, ups, w, S)["c"] > 0.05  # mean of factors: inexact


def test_vera_on_the_conv_model_is_a_config_error():
    model = nn.Sequential()
    model.add_module("_conv_head", nn.Conv2d(4, 6, 1))
    model.add_module("classifier", nn.Linear(6, 2))
    with pytest.raises(ConfigError, match="VeRA.*'_conv_head' is a convolution.*adapter.type=lora"):
        inject_adapters(model, AdapterConfig(type="vera", target_modules=["_conv_head"]), seed=0)
