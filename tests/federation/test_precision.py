"""Mixed precision (issue 7, item 3): bf16 autocast forward passes, fp32 factors, gradients and noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.federation.client import run_client
from fedlora.federation.simulation import Simulation
from fedlora.privacy.dpsgd import clip_factors

ROUND = {"rounds": 1, "num_clients": 2}


def _per_sample(sim: Simulation, rows: np.ndarray) -> tuple[dict[str, torch.Tensor], set[torch.dtype]]:
    """Fused per-sample gradients of every adapter tensor on one client's rows, and the dtypes the hooks saw."""
    rt, spec = sim.rt, sim.specs[0]
    rt.adapted.load(sim.global_state)
    rt.adapted.model.eval()
    active = sorted(rt.adapted.params)
    batch = rt.task.batch(rt.task.train, spec.indices[rows], rt.device)
    rt.hooks.enabled = True
    try:
        with rt.autocast():
            losses = rt.task.loss(rt.adapted.model, batch)
        torch.autograd.grad(losses.sum(), [rt.adapted.params[k] for k in active])
        seen = {t.dtype for recs in rt.hooks._records.values() for entry in recs for t in entry}
        return rt.hooks.fused_grads(active), seen
    finally:
        rt.hooks.enabled = False
        rt.hooks.clear()


@pytest.mark.slow
def test_bf16_run_keeps_factors_and_uploads_float32_and_stays_close_to_fp32(tiny_cfg) -> None:
    sims = {p: Simulation(tiny_cfg(federation=ROUND, train={"precision": p})) for p in ("fp32", "bf16")}
    start = dict(sims["fp32"].global_state)
    out = {p: s.run() for p, s in sims.items()}
    bf = sims["bf16"]
    assert all(p.dtype == torch.float32 for p in bf.rt.adapted.params.values())
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out["bf16"].global_state.values())
    assert np.isfinite(out["bf16"].metrics[-1]["accuracy"])
    # Same seeds, batches and noise: the round's update differs only by the forward pass's rounding.
    delta = {p: torch.cat([(r.global_state[k] - start[k]).flatten() for k in start]) for p, r in out.items()}
    rel = float((delta["bf16"] - delta["fp32"]).norm() / delta["fp32"].norm())
    assert 0 < rel < 0.05, rel  # > 0: autocast was active; < 5%: bf16 rounding only
    # A client's upload is float32 too.
    plan = bf.method.plan(bf.plan_context(2))
    res = run_client(bf.rt, bf.method, plan, {k: bf.global_state[k] for k in plan.download}, bf.specs[0],
                     bf.clients[0], local_steps=1, seed=0)
    assert res.upload and all(v.dtype == torch.float32 for v in res.upload.values() if torch.is_tensor(v))


def test_bf16_per_sample_gradients_are_float32_and_clipping_bound_holds(tiny_cfg) -> None:
    rows = np.arange(12)
    grads = {}
    for p in ("fp32", "bf16"):
        sim = Simulation(tiny_cfg(federation=ROUND, train={"precision": p}))
        grads[p], seen = _per_sample(sim, rows)
        assert (torch.bfloat16 in seen) == (p == "bf16")  # the hooks saw bf16 activations under autocast
    bf = grads["bf16"]
    assert all(g.dtype == torch.float32 and g.shape[0] == len(rows) for g in bf.values())
    c = 0.01  # below every example's gradient norm: every example is clipped
    factors = clip_factors(bf, c)
    clipped = torch.stack([(factors[:, None] * g.flatten(1)).pow(2).sum(1) for g in bf.values()]).sum(0).sqrt()
    assert (factors < 1).all() and (clipped <= c * (1 + 1e-5)).all()
    nonzero = [k for k in bf if grads["fp32"][k].norm() > 0]  # lora_A's gradient is 0 while B = 0 (init)
    assert nonzero
    for k in nonzero:  # close to the fp32 per-sample gradients, not equal
        err = float((bf[k] - grads["fp32"][k]).norm() / grads["fp32"][k].norm())
        assert 0 < err < 0.05, (k, err)


def test_unknown_precision_is_a_config_error(tiny_cfg) -> None:
    with pytest.raises(ConfigError, match="precision"):
        tiny_cfg(train={"precision": "fp16"})


def test_bf16_batched_pass_autocasts_and_stays_close_to_the_sequential_bf16_round(tiny_cfg) -> None:
    """The batched engine runs under bf16 autocast too: per-example gradients cast to fp32 before the
    einsum, uploads fp32, and the round close to the same clients run one after another in bf16
    (not equal: the frozen backbone's bf16 products see a different batch; fp32 equality is
    tests/federation/test_batched.py)."""
    import copy  # noqa: PLC0415

    from fedlora.federation.batched import run_batched  # noqa: PLC0415
    from fedlora.federation.clients_per_pass import engine_k  # noqa: PLC0415

    fed = {**ROUND, "num_clients": 3, "batched_clients": 3, "local_steps": 2}
    sims = {p: Simulation(tiny_cfg(federation=fed, train={"precision": p, "optimizer": "sgd", "lr": 0.5},
                                   privacy={"accountant": "rdp", "noise_multiplier": 1.0, "epsilon": 50.0}))
            for p in ("fp32", "bf16")}
    sim = sims["bf16"]
    assert engine_k(sim) == 3
    plan = sim.method.plan(sim.plan_context(1))
    download = {k: sim.global_state[k] for k in plan.download}
    seed, steps = sim.cfg.train.seed, sim.cfg.federation.local_steps
    fp32 = run_batched(sims["fp32"].rt, sims["fp32"].method, plan, download, sims["fp32"].specs,
                       copy.deepcopy(sims["fp32"].clients), local_steps=steps, seed=seed)
    seq = [run_client(sim.rt, sim.method, plan, download, spec, copy.deepcopy(st), local_steps=steps, seed=seed)
           for spec, st in zip(sim.specs, sim.clients, strict=True)]
    bat = run_batched(sim.rt, sim.method, plan, download, sim.specs, copy.deepcopy(sim.clients),
                      local_steps=steps, seed=seed)
    assert any(not torch.equal(f.upload[k], b.upload[k]) for f, b in zip(fp32, bat, strict=True) for k in b.upload)
    for s, b in zip(seq, bat, strict=True):  # (equal on CPU; a GPU's bf16 products may round differently)
        for k in s.upload:
            assert b.upload[k].dtype == torch.float32
            change = s.upload[k] - download.get(k, torch.zeros_like(s.upload[k]))
            err = float((b.upload[k] - s.upload[k]).norm())
            assert err <= 0.02 * float(change.norm()) + 1e-6, (k, err, float(change.norm()))
