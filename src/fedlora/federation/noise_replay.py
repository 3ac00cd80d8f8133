"""Noise amplification of joint factor updates, by a noise-free replay of one DP step (test-only mode).

One local DP-SGD step with SGD (learning rate ``lr``) on the active factors of a LoRA module,
from ``(B, A)``: the per-example gradients of the batch are computed once and clipped once;
the clean step uses their clipped sum, the noisy step the same sum plus the Gaussian noise,
both divided by the expected batch size (exactly as :func:`fedlora.privacy.dpsgd.privatize`)::

    dX_clean = -lr * g_X,   dX_noisy = -lr * (g_X + xi_X),   xi_X = N(0, sigma^2 C^2 I) / B_exp

With ``N_X = dX_noisy - dX_clean = -lr xi_X`` the noisy product splits as::

    (B + dB_noisy)(A + dA_noisy) = (B + dB_clean)(A + dA_clean)             clean product
                                   + N_B (A + dA_clean) + (B + dB_clean) N_A  linear terms
                                   + N_B N_A                                  cross term

The **cross term** ``N_B N_A`` is what noise on both factors adds beyond the linear terms; its
Frobenius norm grows with sigma^2 (its expectation is ``lr^2 (sigma C / B_exp)^2 sqrt(d r k)``
for iid noise); the linear terms grow with sigma. A step that trains one factor of a module
(FFA-LoRA, RoLoRA, LA-LoRA's step, AS-LoRA's layer) has ``N_A = 0`` or ``N_B = 0``: no cross term.
Norms are of ``B A`` (the effective weight change is ``s`` times it), computed in float64 and
summed over modules as the root of the sum of squares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedlora.federation.client import ClientSpec, dp_step_options, poisson_batch
from fedlora.federation.runtime import Runtime
from fedlora.methods.base import State
from fedlora.methods.lowrank import lora_modules
from fedlora.privacy.dpsgd import add_noise, clipped_sums
from fedlora.privacy.noise import SeededNoise
from fedlora.seeds import generator


@dataclass
class NoiseSplit:
    cross: float  # ||N_B N_A||_F (root of the sum of squares over modules)
    linear: float  # ||N_B (A + dA_clean) + (B + dB_clean) N_A||_F
    residual: float  # ||noisy - clean - linear - cross||_F / ||noisy product||_F (identity check, ~1e-16)


def clipped_step_sum(rt: Runtime, spec: ClientSpec, rows: np.ndarray, active: list[str]) -> State:
    """Clipped per-example gradient sum of the active tensors on the given rows (hooked layers only),
    clipped as the client's DP step clips: flat, or per group under ``privacy.clipping: per-group``."""
    adapted, task = rt.adapted, rt.task
    batch = task.batch(task.train, spec.indices[rows], rt.device)
    rt.hooks.enabled = True
    try:
        losses = task.loss(adapted.model, batch)  # (batch,)
        torch.autograd.grad(losses.sum(), [adapted.params[k] for k in active])
        per_sample = rt.hooks.fused_grads(active)
    finally:
        rt.hooks.enabled = False
        rt.hooks.clear()
    assert spec.dp is not None
    return clipped_sums(per_sample, spec.dp, dp_step_options(rt, spec, None).get("groups"))


def replay_step(rt: Runtime, spec: ClientSpec, state: State, active: list[str], *, lr: float, seed: int,
                round: int = 1) -> NoiseSplit:
    """One DP step of client ``spec`` from ``state``, noisy and noise-free (see the module docstring)."""
    if spec.dp is None:
        raise ValueError("the noise replay needs a DP client (spec.dp)")
    adapted, f64 = rt.adapted, torch.float64
    adapted.load(state)
    adapted.model.eval()  # no dropout: the replay isolates the DP noise
    gen = generator(seed, "client", spec.cid, round)  # the replay's own draw (a diagnostic, not a release)
    rows = poisson_batch(len(spec.indices), spec.sample_rate, gen)
    adapted.set_active(set(active))
    try:
        summed = clipped_step_sum(rt, spec, rows, active)
    finally:
        adapted.set_active(set(adapted.params))
    dp = spec.dp
    noisy = add_noise(summed, std=dp.noise_multiplier * dp.clip_norm, noise=SeededNoise(gen))
    step_clean = {k: -lr * v.to(f64) / dp.expected_batch_size for k, v in summed.items()}
    step_noise = {k: -lr * (noisy[k].to(f64) - summed[k].to(f64)) / dp.expected_batch_size for k in summed}
    cross2 = linear2 = resid2 = total2 = 0.0
    for a, b, _ in lora_modules(adapted.factors):
        a0, b0 = adapted.params[a].detach().to(f64), adapted.params[b].detach().to(f64)
        zero_a, zero_b = torch.zeros_like(a0), torch.zeros_like(b0)
        ca, cb = a0 + step_clean.get(a, zero_a), b0 + step_clean.get(b, zero_b)  # clean factors
        na, nb = step_noise.get(a, zero_a), step_noise.get(b, zero_b)  # noise parts of the steps
        noisy_prod, clean_prod = (cb + nb) @ (ca + na), cb @ ca
        cross, linear = nb @ na, nb @ ca + cb @ na
        cross2 += float(cross.pow(2).sum())
        linear2 += float(linear.pow(2).sum())
        resid2 += float((noisy_prod - clean_prod - linear - cross).pow(2).sum())
        total2 += float(noisy_prod.pow(2).sum())
    return NoiseSplit(cross2**0.5, linear2**0.5, (resid2 / total2) ** 0.5 if total2 else 0.0)
