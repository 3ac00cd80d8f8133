"""train.compile: the compiled DP-step math equals the eager one (fp32, rtol 1e-5), keeps the clip
bound, compiles once per structure (not per Poisson batch size), and falls back to eager on failure.

Tolerance: compiled and eager fp32 sums may differ in rounding (inductor orders the reductions its
own way); every comparison here is relative, <= 1e-5 (measured: ~1e-8 after a 2-round run)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from fedlora.federation.client import dp_step_options
from fedlora.federation.runtime import Runtime
from fedlora.federation.simulation import Simulation
from fedlora.privacy.compiled import StepKernels
from fedlora.privacy.dpsgd import DPParams, clipped_sums, linear_per_sample, privatize
from fedlora.privacy.noise import SeededNoise

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compile_is_off_by_default_and_the_default_step_is_eager(tiny_cfg):
    sim = Simulation(tiny_cfg())
    assert sim.cfg.train.compile is False and sim.rt.kernels is None
    assert "kernels" not in dp_step_options(sim.rt, sim.specs[0], None)


def test_a_function_that_fails_to_compile_runs_eagerly_after_one_warning(monkeypatch):
    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler here\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    kernels = StepKernels()
    gen = torch.Generator().manual_seed(0)
    per_sample = {"a": torch.randn(5, 3, 4, generator=gen), "b": torch.randn(5, 3, generator=gen)}
    dp = DPParams(1.0, 0.5, 5.0)
    with pytest.warns(RuntimeWarning, match=r"train.compile: clip_and_sum did not compile \(RuntimeError: no C\+\+ compiler here\)"):
        first = kernels.clipped_sums(per_sample, dp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        second = kernels.clipped_sums(per_sample, dp)
    eager = clipped_sums(per_sample, dp)
    assert all(torch.equal(first[k], eager[k]) and torch.equal(second[k], eager[k]) for k in eager)
    assert list(kernels.failed) == ["clip_and_sum"]
    # batches of 0 or 1 rows never reach the compiler (no warning for them)
    x, g = torch.randn(1, 7, 4), torch.randn(1, 7, 3)
    assert torch.equal(kernels.linear(x, g, "weight"), linear_per_sample(x, g, "weight"))
    assert list(kernels.failed) == ["clip_and_sum"]


@pytest.mark.slow  # compiles two small graphs (~10 s on 2 cores, less with inductor's cache)
@pytest.mark.parametrize("fraction", [None, 0.3])
def test_compiled_clip_and_sum_equals_eager_and_bounds_each_example_by_c(fraction):
    """Per example, removing it moves the noiseless clipped sum by at most C (flat) and by at most its
    group's bound (per group); the sums equal eager's to 1e-5; Poisson-like sizes add no graph."""
    kernels = StepKernels()
    gen = torch.Generator().manual_seed(3)
    groups = {"A": "adapter", "B": "adapter", "head": "head"}
    dp = DPParams(1.0, 2.0, 8.0, head_clip_fraction=fraction)
    full = {"A": 5 * torch.randn(12, 4, 6, generator=gen), "B": 0.01 * torch.randn(12, 6, 4, generator=gen),
            "head": 9 * torch.randn(12, 2, 6, generator=gen)}
    kernels.clipped_sums(full, dp, groups)  # compiles (or finds its graph)
    before = _graphs()
    for n in (12, 9, 5, 3, 2):  # sizes a Poisson batch takes
        per_sample = {k: v[:n] for k, v in full.items()}
        got, want = kernels.clipped_sums(per_sample, dp, groups), clipped_sums(per_sample, dp, groups)
        assert all(_rel(got[k], want[k]) <= RTOL for k in want)
        for drop in range(n if n > 2 else 0):  # n - 1 >= 2 rows: the compiled path again
            keep = {k: torch.cat([v[:drop], v[drop + 1:]]) for k, v in per_sample.items()}
            part = kernels.clipped_sums(keep, dp, groups)
            moved = {k: (got[k] - part[k]).pow(2).sum() for k in got}
            assert float(sum(moved.values()).sqrt()) <= dp.clip_norm * (1 + 1e-5)
            if fraction is not None:
                bounds = dp.group_bounds()
                assert float(moved["head"].sqrt()) <= bounds["head"] * (1 + 1e-5)
                assert float((moved["A"] + moved["B"]).sqrt()) <= bounds["adapter"] * (1 + 1e-5)
    assert _graphs() == before and kernels.failed == {}  # no recompile per batch size
    noisy = privatize(full, dp, SeededNoise(torch.Generator().manual_seed(1)), groups=groups, kernels=kernels)
    eager = privatize(full, dp, SeededNoise(torch.Generator().manual_seed(1)), groups=groups)
    assert all(_rel(noisy[k], eager[k]) <= RTOL for k in eager)  # the same noise, drawn eagerly


@pytest.mark.slow  # two 2-round runs and one batched round, compiling 2 graphs (~15 s on 2 shared cores cold)
def test_two_round_run_with_compile_equals_eager_and_compiles_once_per_structure(tiny_cfg):
    over = {"eval": {"diagnostics": False}}
    eager = Simulation(tiny_cfg(**over)).run().global_state
    before = _graphs()
    sim = Simulation(tiny_cfg(train={"compile": True}, **over))
    compiled = sim.run().global_state
    assert sim.rt.kernels is not None and sim.rt.kernels.failed == {} and sim.rt.kernels._compiled
    # 12 DP steps of Poisson-sized batches: one graph per structure (the weights over tokens, the
    # clip + sum), none per batch size
    assert _graphs() - before <= 2
    assert set(compiled) == set(eager)
    for k in eager:
        assert _rel(compiled[k], eager[k]) <= RTOL, k
        assert torch.allclose(compiled[k], eager[k], rtol=RTOL, atol=1e-7), k
    batched = Simulation(tiny_cfg(train={"compile": True}, federation={"batched_clients": 3}, **over))
    assert all(_rel(batched.run().global_state[k], eager[k]) <= RTOL for k in eager)


@pytest.mark.slow  # compiles VeRA's two small graphs
def test_compiled_vera_per_sample_gradients_equal_eager(tiny_cfg):
    rt = Runtime(tiny_cfg(adapter={"type": "vera", "dropout": 0.0}))
    with torch.no_grad():  # PEFT starts lambda_b at 0: make both vectors matter
        for f in rt.adapted.factors:
            if f.role in ("A", "B"):
                rt.adapted.params[f.name].normal_(0, 0.5)
    names = [k for k in rt.adapted.names(roles=("A", "B")) if k in rt.hooks.vera]
    rt.adapted.set_active(set(names))
    kernels = StepKernels()
    for n in (6, 4):
        batch = rt.task.batch(rt.task.train, np.arange(n), rt.device)
        grads = []
        for k in (None, kernels):
            rt.hooks.enabled = True
            losses = rt.task.loss(rt.adapted.model, batch)
            torch.autograd.grad(losses.sum(), [rt.adapted.params[k] for k in names])
            rt.hooks.enabled = False
            grads.append(rt.hooks.fused_grads(names, k))
        assert all(_rel(grads[1][k], grads[0][k]) <= RTOL for k in names)
    assert kernels.failed == {} and set(kernels._compiled) == {"vera_lambda_b_grad", "vera_lambda_d_grad"}
