from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.errors import DataError
from fedlora.federation.partition import dirichlet_partition, iid_partition, label_histograms


@settings(max_examples=60, deadline=None)
@given(n=st.integers(50, 600), clients=st.integers(1, 8), alpha=st.floats(0.05, 10.0), seed=st.integers(0, 10**6),
       classes=st.integers(2, 5))
def test_dirichlet_assigns_every_example_exactly_once(n, clients, alpha, seed, classes):
    labels = np.random.default_rng(seed).integers(0, classes, size=n)
    parts = dirichlet_partition(labels, clients, alpha, seed, min_size=1, max_draws=10_000) if clients * 1 <= n else None
    if parts is None:
        return
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


def test_dirichlet_is_seeded_and_respects_min_size():
    labels = np.random.default_rng(0).integers(0, 2, size=1000)
    a = dirichlet_partition(labels, 10, 0.5, seed=3, min_size=20)
    b = dirichlet_partition(labels, 10, 0.5, seed=3, min_size=20)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert min(len(p) for p in a) >= 20
    hist = label_histograms(labels, a, 2)
    assert sum(map(sum, hist)) == 1000


def test_small_alpha_is_non_iid_and_large_alpha_is_balanced():
    labels = np.repeat([0, 1], 2000)

    def skew(alpha):
        parts = dirichlet_partition(labels, 5, alpha, seed=1, min_size=1)
        return np.mean([abs(labels[p].mean() - 0.5) for p in parts])

    assert skew(0.1) > 3 * skew(100.0)


def test_iid_and_errors():
    parts = iid_partition(10, 3, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    with pytest.raises(DataError, match="clients"):
        iid_partition(2, 3, seed=0)
    with pytest.raises(DataError, match="min_client_size"):
        dirichlet_partition(np.zeros(10, dtype=int), 4, 0.5, seed=0, min_size=5)
