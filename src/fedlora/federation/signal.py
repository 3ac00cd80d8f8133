"""The signal diagnostic: per round, each trained group's signal norm against its noise norm.

``eval.signal_diagnostics`` (off by default). Groups: ``A``, ``B``, ``head`` and, per adapted
transformer layer, ``A.<layer>`` / ``B.<layer>``. Per local step and group, in gradient units
(divided by the expected batch B, as the step the optimizer takes):

- noise norm ``sigma C sqrt(d) / B`` (d: the group's active coordinates): public, the expected
  norm of the noise the DP step adds;
- signal norm, in one of two modes:

  ``private``: estimated from the privatised gradient ``g~`` alone, ``sqrt(max(||g~||^2 - d
  (sigma C / B)^2, 0))`` (the noise energy removed as AS-LoRA debiases its scores): post-processing
  of the DP output, so the run stays covered by the DP guarantee;
  ``exact``: the norm of the noiseless clipped sum divided by B, computed inside the client's DP
  step (:func:`fedlora.privacy.dpsgd.privatize`'s ``signal``). That is a NON-private statistic of
  the client's data: research only, and the run is marked NOT covered by the DP guarantee.

Without DP the signal is the norm of the mean gradient and the noise 0. Each client's value is
the root mean square over its steps (a step where the group was inactive does not count); the
round logs the mean over the clients that answered as ``signal/<group>``, ``noise/<group>``
(collected by the in-process runners through ``RoundOutcome.info``; the Flower engine logs none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

NOT_COVERED = ("eval.signal_diagnostics=exact releases the noiseless clipped-gradient norm per group, a "
               "non-private statistic (research only)")


def signal_groups(factors) -> dict[str, tuple[str, ...]]:
    """Tensor name -> the diagnostic groups it belongs to: its role, and role.layer for A and B."""
    out: dict[str, tuple[str, ...]] = {}
    for f in factors:
        if f.role == "head":
            out[f.name] = ("head",)
        elif f.role in ("A", "B"):
            out[f.name] = (f.role,) + ((f"{f.role}.{f.layer}",) if f.layer is not None else ())
    return out


@dataclass
class SignalMeter:
    """One client's round: sums of squared signal and noise norms per group and step."""

    mode: str  # "private" | "exact"
    groups: dict[str, tuple[str, ...]]
    _signal: dict[str, float] = field(default_factory=dict)
    _noise: dict[str, float] = field(default_factory=dict)
    _steps: dict[str, int] = field(default_factory=dict)

    def step(self, grads: dict[str, torch.Tensor], noise_std: float, exact_sq: dict[str, float] | None,
             batch: float) -> None:
        """``grads``: the step's gradient (privatised under DP); ``noise_std``: its per-coordinate
        noise std (0 without DP); ``exact_sq``: squared norms of the clipped sum (exact mode, DP)."""
        sig: dict[str, float] = {}
        noi: dict[str, float] = {}
        for k, g in grads.items():
            d = g.numel()
            if exact_sq is not None and k in exact_sq:
                s2 = exact_sq[k] / batch**2
            else:
                s2 = float(g.detach().double().pow(2).sum())
                if noise_std > 0:
                    s2 -= d * noise_std**2  # debiased below, after the group sum
            for grp in self.groups.get(k, ()):
                sig[grp] = sig.get(grp, 0.0) + s2
                noi[grp] = noi.get(grp, 0.0) + d * noise_std**2
        for grp in sig:
            self._signal[grp] = self._signal.get(grp, 0.0) + max(sig[grp], 0.0)
            self._noise[grp] = self._noise.get(grp, 0.0) + noi[grp]
            self._steps[grp] = self._steps.get(grp, 0) + 1

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for grp, n in sorted(self._steps.items()):
            out[f"signal/{grp}"] = math.sqrt(self._signal[grp] / n)
            out[f"noise/{grp}"] = math.sqrt(self._noise[grp] / n)
        return out


def round_signal(per_client: list[dict[str, float] | None]) -> dict[str, float]:
    """The round's record: each key's mean over the clients that measured it."""
    vals: dict[str, list[float]] = {}
    for d in per_client:
        for k, v in (d or {}).items():
            vals.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in sorted(vals.items())}
