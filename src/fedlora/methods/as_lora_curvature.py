"""AS-LoRA's finite-difference curvature, as in the reference code: NOT covered by DP.

ALGORITHMS.md 6.1 step 4 (reference code ``fd_curvature_for_param``): for each active LoRA
tensor with projected noisy gradient ``g~`` and energy ``e``, the directional curvature along
``v = g~ / (||g~|| + 1e-8)`` is the central second difference of the loss on the **same private
batch** as the last local step, at the point where that step's gradient was taken:
``kappa = (L(theta + eps v) - 2 L(theta) + L(theta - eps v)) / eps^2`` (eval mode, ``eps`` =
``fd_eps``, 1e-3 by default), and the score is ``e - 0.5 * eta * kappa * e`` with ``eta`` the
local learning rate (the code's ``max(lr_a, lr_b)``; fedlora has one rate), not floored, as in
the code. The three losses are computed without clipping or noise, and the result steers the
released per-layer choice: this reads private data outside the DP-SGD accounting, so it is
refused unless ``allow_non_private_curvature: true``, and such a run is marked as NOT covered
by the DP guarantee (metrics, summary, saved config).
"""

from __future__ import annotations

from fedlora.errors import ConfigError, FedloraError
from fedlora.methods.base import ClientTrace
from fedlora.methods.registry import MethodSetup

CURVATURES = ("off", "secant", "finite-difference")
NOT_COVERED = ("as-lora curvature=finite-difference evaluates the loss on the private batch without "
               "clipping or noise, outside the DP accounting")


def curvature_option(setup: MethodSetup) -> str:
    """The ``curvature`` option, refusing finite differences unless explicitly allowed."""
    curvature = setup.option("curvature", "secant")  # the paper's curvature-aware score, privacy-exact
    allowed = setup.option("allow_non_private_curvature", False)
    if curvature not in CURVATURES:
        raise ConfigError(f"as-lora option 'curvature' must be one of {', '.join(CURVATURES)}, got {curvature!r}")
    if not isinstance(allowed, bool):
        raise ConfigError(f"as-lora option 'allow_non_private_curvature' must be true or false, got {allowed!r}")
    if curvature == "finite-difference" and not allowed:
        raise ConfigError("as-lora curvature=finite-difference re-reads the private batch outside DP, so the run is NOT "
                          "covered by the DP guarantee; set method.options.allow_non_private_curvature=true to accept "
                          "that, or use curvature=secant (privacy-exact)")
    return curvature


def finite_difference_score(energy: float, projected, name: str, trace: ClientTrace, eps: float, base_loss: float) -> float:
    """``e - 0.5 * eta * kappa * e`` with ``kappa`` the second difference along ``projected``."""
    if trace.probe is None:
        raise FedloraError("as-lora finite-difference curvature needs the client's loss probe (Method.reads_private_data)")
    norm = float(projected.norm())
    if norm < 1e-12:  # the code skips a zero gradient (its score stays 0)
        return 0.0
    v = projected / (norm + 1e-8)
    plus, minus = trace.probe({name: eps * v}), trace.probe({name: -eps * v})
    kappa = (plus - 2.0 * base_loss + minus) / eps**2
    return energy - 0.5 * trace.lr * kappa * energy
