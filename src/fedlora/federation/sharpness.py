"""Sharpness: the top eigenvalue of the loss Hessian w.r.t. the trainable adapter tensors.

Power iteration with exact Hessian-vector products (double backward): ``v <- H v / ||H v||``,
with the Rayleigh quotient ``v^T H v`` as the estimate, stopped when it changes by less than
``tol`` (relative) or after ``iters`` products. Power iteration finds the eigenvalue of largest
magnitude; for the losses here (near a minimum) that is the top (positive) eigenvalue, the
figure LA-LoRA and AS-LoRA report as sharpness.

:func:`global_sharpness` evaluates it for the server's global model on held-out server data:
the first ``eval.sharpness_examples`` examples of the test split (never a client's training
data), in eval mode (no dropout), with respect to the adapter tensors the global state holds
and that train (A, B, the federated head; not FFA's frozen A, not tensors kept on clients).
Attention runs on PyTorch's reference ("math") kernel, which supports double backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext

import numpy as np
import torch

LossTerms = Callable[[], Iterable[tuple[torch.Tensor, float]]]  # yields (mean loss of a chunk, weight)


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
    except ImportError:  # pragma: no cover - older torch
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def hessian_vector(loss_terms: LossTerms, params: list[torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` of the weighted sum of the chunk losses, accumulated chunk by chunk."""
    out = [torch.zeros_like(p) for p in params]
    for loss, weight in loss_terms():
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * x).sum() for g, x in zip(grads, v, strict=True))
        for acc, h in zip(out, torch.autograd.grad(dot, params), strict=True):
            acc.add_(h, alpha=weight)
    return out


def top_eigenvalue(loss_terms: LossTerms, params: list[torch.Tensor], *, iters: int = 30, tol: float = 1e-3,
                   seed: int = 0) -> float:
    """Dominant Hessian eigenvalue by power iteration (seeded start vector)."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    lam = float("nan")
    for _ in range(iters):
        hv = hessian_vector(loss_terms, params, v)
        new = float(sum((h * x).sum() for h, x in zip(hv, v, strict=True)))
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        if float(norm) == 0.0:
            return 0.0
        v = [h / norm for h in hv]
        if abs(new - lam) <= tol * abs(new):
            return new
        lam = new
    return lam


def global_sharpness(sim, *, iters: int = 30, tol: float = 1e-3) -> float:
    """Top Hessian eigenvalue of the global model's loss on the first test examples (see above)."""
    rt, cfg = sim.rt, sim.cfg
    adapted, task = rt.adapted, rt.task
    adapted.load(sim.init_local)
    adapted.load(sim.global_state)
    frozen = set(sim.method.frozen_roles)
    names = sorted(f.name for f in adapted.factors if f.name in sim.global_state and f.role not in frozen)
    test = task.test
    idx = np.arange(min(cfg.eval.sharpness_examples, len(test)))
    chunks = [idx[i : i + cfg.eval.batch_size] for i in range(0, len(idx), cfg.eval.batch_size)]
    batches = [task.batch(test, c, rt.device) for c in chunks]

    def loss_terms():
        for c, batch in zip(chunks, batches, strict=True):
            yield task.loss(adapted.model, batch).mean(), len(c) / len(idx)

    was_training = adapted.model.training
    adapted.model.eval()
    adapted.set_active(set(names))
    try:
        with _math_attention():
            return top_eigenvalue(loss_terms, [adapted.params[k] for k in names], iters=iters, tol=tol,
                                  seed=cfg.train.seed)
    finally:
        adapted.set_active(set(adapted.params))
        adapted.model.train(was_training)
