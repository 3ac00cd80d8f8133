"""Host-to-device copies that do not stall the device.

A copy from ordinary (pageable) host memory to a CUDA device first waits for the device's
stream to drain, so one such copy per step is a host sync per step. :func:`to_device` copies
through pinned memory without blocking (PyTorch's caching host allocator keeps the pinned block
alive until the copy is done); on the CPU it is ``tensor.to(device)``.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``; asynchronous through pinned memory for CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite: one check (and one host sync) per device
    and dtype, rather than one per tensor."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t.reshape(-1))
    return all(bool(torch.isfinite(torch.cat(group)).all()) for group in groups.values())


def non_finite(named: dict[str, torch.Tensor]) -> set[str]:
    """The names of the tensors holding a non-finite value (one sync when there are none)."""
    if all_finite(list(named.values())):
        return set()
    return {k for k, v in named.items() if not bool(torch.isfinite(v).all())}
