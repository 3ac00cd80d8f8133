"""``fedlora account``: sigma from a privacy target and a schedule, or epsilon from sigma.

A schedule is a Poisson sampling rate and a number of noisy steps. Either may be given
directly or derived the way a run derives it: ``q = batch_size / dataset_size`` and
``steps = rounds * local_steps`` (the worst case: the client is sampled every round).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from fedlora.errors import ConfigError
from fedlora.privacy.accounting import calibrate_noise, epsilon


@dataclass(frozen=True)
class Schedule:
    """What the accountant needs to know about a run: rate q and noisy steps."""

    sample_rate: float
    steps: int

    def describe(self) -> str:
        return f"sampling rate {self.sample_rate:.4g}, {self.steps} steps"


def exactly_one(name_a: str, a: object, name_b: str, b: object) -> None:
    """Refuse both or neither of two alternative options."""
    if (a is None) == (b is None):
        raise ConfigError(f"give exactly one of {name_a} or {name_b}")


def resolve_schedule(
    *,
    sample_rate: float | None = None,
    batch_size: int | None = None,
    dataset_size: int | None = None,
    steps: int | None = None,
    rounds: int | None = None,
    local_steps: int | None = None,
) -> Schedule:
    """A schedule from (q or batch and dataset size) and (steps or rounds x local steps)."""
    if (batch_size is None) != (dataset_size is None):
        raise ConfigError("--batch-size and --dataset-size go together (q = batch / dataset size)")
    exactly_one("--sample-rate", sample_rate, "--batch-size with --dataset-size", batch_size)
    if batch_size is not None and dataset_size is not None:
        if batch_size <= 0 or dataset_size <= 0:
            raise ConfigError(f"batch size and dataset size must be > 0 (got {batch_size}, {dataset_size})")
        if batch_size > dataset_size:
            raise ConfigError(f"batch size {batch_size} exceeds the dataset size {dataset_size}; lower the batch")
        sample_rate = batch_size / dataset_size
    assert sample_rate is not None
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sampling rate must be in (0, 1] (got {sample_rate})")
    if (rounds is None) != (local_steps is None):
        raise ConfigError("--rounds and --local-steps go together (steps = rounds x local steps)")
    exactly_one("--steps", steps, "--rounds with --local-steps", rounds)
    if rounds is not None and local_steps is not None:
        if rounds <= 0 or local_steps <= 0:
            raise ConfigError(f"rounds and local steps must be > 0 (got {rounds}, {local_steps})")
        steps = rounds * local_steps
    assert steps is not None
    if steps <= 0:
        raise ConfigError(f"steps must be > 0 (got {steps})")
    return Schedule(float(sample_rate), int(steps))


def noise_for(*, target_epsilon: float, delta: float, schedule: Schedule, accountant: str = "prv") -> str:
    """One line: the calibrated sigma and the epsilon it actually spends (<= the target)."""
    with warnings.catch_warnings():  # Opacus's numerical warnings (log(1 - q) at q = 1) are harmless
        warnings.simplefilter("ignore")
        sigma = calibrate_noise(target_epsilon=target_epsilon, target_delta=delta, sample_rate=schedule.sample_rate,
                                steps=schedule.steps, accountant=accountant)
        spent = epsilon([(sigma, schedule.sample_rate, schedule.steps)], delta=delta, accountant=accountant)
    return (f"sigma {sigma:.4f} (epsilon spent {spent:.4f} <= target {target_epsilon:g}, delta {delta:g}, "
            f"{schedule.describe()}, {accountant} accountant)")


def epsilon_for(*, sigma: float, delta: float, schedule: Schedule, accountant: str = "prv") -> str:
    """One line: the epsilon spent by the schedule at noise multiplier sigma."""
    if sigma <= 0:
        raise ConfigError(f"sigma must be > 0 (got {sigma}); sigma = 0 gives no privacy (epsilon = inf)")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1) (got {delta}); 1e-5 is the usual choice")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spent = epsilon([(sigma, schedule.sample_rate, schedule.steps)], delta=delta, accountant=accountant)
    return f"epsilon {spent:.4f} at sigma {sigma:g} (delta {delta:g}, {schedule.describe()}, {accountant} accountant)"
