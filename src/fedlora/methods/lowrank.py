"""Low-rank helpers for the exact / SVD aggregation baselines (FedEx-LoRA, FLoRA, FedSVD).

The SVD of a product ``B A`` (B: d x m, A: m x k, m << d, k) is taken from the QR
factorisations of the two thin factors plus an m x m SVD, never a dense d x k SVD:
``B = Qb Rb``, ``A^T = Qa Ra``  =>  ``B A = Qb (Rb Ra^T) Qa^T``, and the SVD of the small core
``Rb Ra^T = U' S V'^T`` gives ``B A = (Qb U') S (Qa V')^T``. Work is in float64.
"""

from __future__ import annotations

import torch

from fedlora.adapters import Factor, base_weight_name


def matrix(x: torch.Tensor) -> torch.Tensor:
    """A factor or base weight as a matrix: a 1x1 conv's (out, in, 1, 1) -> (out, in); 2-D unchanged."""
    return x.reshape(x.shape[0], -1)


def product_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U diag(S) Vh = b @ a`` in float64, via QR of the factors (m = inner size).

    Returns U (d, q), S (q,), Vh (q, k) with q = min(d, k, m) and orthonormal U columns and Vh rows.
    Signs are canonical: each column of U has its largest-magnitude entry positive (Vh's row flips
    with it), so the result depends on the product only, not on the factors' QR or the device's
    LAPACK (distinct singular values assumed).
    """
    qb, rb = torch.linalg.qr(b.to(torch.float64))  # (d, q_b), (q_b, m)
    qa, ra = torch.linalg.qr(a.to(torch.float64).T)  # (k, q_a), (q_a, m)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core (q_b, q_a)
    u, vh = qb @ u, vh @ qa.T  # (d, q), (q, k)
    peak = u.gather(0, u.abs().argmax(0, keepdim=True))  # (1, q): each column's largest-magnitude entry
    sign = torch.where(peak < 0, -1.0, 1.0).to(u.dtype)
    return u * sign, s, vh * sign.T


def stack(bs: list[torch.Tensor], as_: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking in float64: ``B_stack A_stack = sum_i w_i B_i A_i`` exactly.

    B_stack = [B_1, ..., B_K] (d, K r); A_stack = [w_1 A_1; ...; w_K A_K] (K r, k).
    """
    b = torch.cat([matrix(x).to(torch.float64) for x in bs], dim=1)  # (d, K r)
    a = torch.cat([w * matrix(x).to(torch.float64) for w, x in zip(weights, as_, strict=True)], dim=0)  # (K r, k)
    return b, a


def lora_modules(factors: list[Factor]) -> list[tuple[str, str, str]]:
    """(A name, B name, base weight name) for every LoRA-adapted module, in factor order."""
    by_module: dict[str, dict[str, str]] = {}
    for f in factors:
        if f.role in ("A", "B"):
            by_module.setdefault(f.module, {})[f.role] = f.name
    return [(m["A"], m["B"], base_weight_name(m["A"])) for m in by_module.values()]
