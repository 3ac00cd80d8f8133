"""The one-run audit's lower bound (Steinke, Nasr, Jagielski 2023), checked by its definition."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binom

from fedlora.privacy.audit import epsilon_lower_bound


def test_all_guesses_right_gives_the_closed_form():
    # r = k: P[Bin(k, p) >= k] = p^k <= 0.05  <=>  p <= 0.05^(1/k)
    for k in (20, 100):
        p = 0.05 ** (1 / k)
        assert epsilon_lower_bound(guesses=k, correct=k) == pytest.approx(math.log(p / (1 - p)), abs=1e-3)


def test_bound_is_the_edge_of_the_rejection_region():
    k, r = 200, 150
    eps = epsilon_lower_bound(guesses=k, correct=r)
    p = lambda e: 1 / (1 + math.exp(-e))  # noqa: E731
    assert binom.sf(r - 1, k, p(eps)) <= 0.05 < binom.sf(r - 1, k, p(eps + 1e-3))


def test_chance_level_gives_zero_and_bound_grows_with_correct_guesses():
    assert epsilon_lower_bound(guesses=100, correct=50) == 0.0
    assert epsilon_lower_bound(guesses=0, correct=0) == 0.0
    bounds = [epsilon_lower_bound(guesses=100, correct=r) for r in (60, 70, 80, 90)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert epsilon_lower_bound(guesses=100, correct=80, confidence=0.99) < epsilon_lower_bound(guesses=100, correct=80)


def test_bad_counts_raise():
    with pytest.raises(ValueError):
        epsilon_lower_bound(guesses=10, correct=11)
