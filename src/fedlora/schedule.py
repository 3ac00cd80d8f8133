"""Learning-rate schedules across rounds (``train.lr_schedule``): a factor per round, public
(it depends only on the round number), so applying it is post-processing."""

from __future__ import annotations

import math


def round_scale(schedule: str, round_: int, rounds: int, final_fraction: float) -> float:
    """The factor on a learning rate in round ``round_`` (1-based) of ``rounds``: 1 when
    ``constant``; ``cosine`` runs from 1 in round 1 to ``final_fraction`` in the last round."""
    if schedule == "constant" or rounds <= 1:
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule '{schedule}'")
    progress = min(max(round_ - 1, 0), rounds - 1) / (rounds - 1)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
