from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.errors import DataError
from fedlora.federation import partition as partition_module
from fedlora.federation.partition import (
    dirichlet_partition,
    iid_partition,
    label_histograms,
    partition,
    shards_partition,
)


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


def _skew(labels, parts):
    """Mean distance of a client's label-1 share from the global one (0: IID)."""
    return float(np.mean([abs(labels[p].mean() - labels.mean()) for p in parts]))


@pytest.mark.parametrize("clients,min_size", [(1000, 8), (10_000, 1)])
def test_dirichlet_works_for_thousands_of_clients(monkeypatch, clients, min_size):
    """Too many clients for any draw to give every one min_size examples: the last draw is topped up,
    after at most max_draws cheap draws (counted, not timed), keeping the label skew."""
    labels = np.random.default_rng(0).integers(0, 2, size=11_800)
    calls = []
    real = partition_module._draw
    monkeypatch.setattr(partition_module, "_draw", lambda *a: calls.append(1) or real(*a))
    parts = dirichlet_partition(labels, clients, 0.5, seed=1, min_size=min_size)
    assert len(calls) <= 100  # speed sanity: a bounded number of count-only draws
    assert len(parts) == clients and min(len(p) for p in parts) >= min_size
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and np.array_equal(np.sort(joined), np.arange(len(labels)))
    if clients <= 1000:  # (at about one example per client every split is "skewed")
        assert _skew(labels, parts) > 1.5 * _skew(labels, iid_partition(len(labels), clients, seed=1))  # still non-IID
    again = dirichlet_partition(labels, clients, 0.5, seed=1, min_size=min_size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_partition(labels, clients, 0.5, seed=2, min_size=min_size)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_top_up_only_when_no_draw_works():
    """A split that a draw can give is the draw itself (the papers' split, unchanged)."""
    labels = np.random.default_rng(0).integers(0, 2, size=1000)
    parts = dirichlet_partition(labels, 10, 0.5, seed=3, min_size=20)
    rng = np.random.default_rng(3)
    by_label = [np.flatnonzero(labels == y) for y in (0, 1)]
    while True:
        rows, _, counts = partition_module._draw(rng, by_label, 10, 0.5)
        if counts.sum(axis=0).min() >= 20:
            break
    assert [len(p) for p in parts] == counts.sum(axis=0).tolist()


def test_shards_partition_gives_each_client_k_label_shards():
    labels = np.repeat(np.arange(10), 120)  # 10 labels x 120
    parts = shards_partition(labels, 100, 2, seed=0)
    assert [len(p) for p in parts] == [12] * 100  # 200 shards of 6
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert max(len(np.unique(labels[p])) for p in parts) <= 2  # shards never straddle labels here
    again = shards_partition(labels, 100, 2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, shards_partition(labels, 100, 2, seed=1), strict=True))
    via = partition(labels, scheme="shards", num_clients=100, alpha=0.5, seed=0, min_size=1, shards_per_client=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, via, strict=True))


def test_shards_are_label_skewed_and_refuse_impossible_splits():
    labels = np.random.default_rng(0).integers(0, 2, size=2000)
    parts = shards_partition(labels, 100, 2, seed=0)
    assert _skew(labels, parts) > 3 * _skew(labels, iid_partition(2000, 100, seed=0))
    with pytest.raises(DataError, match="shards_per_client"):
        shards_partition(labels, 1000, 3, seed=0)  # 3,000 shards of 2,000 examples
    with pytest.raises(DataError, match="min_client_size"):
        shards_partition(labels, 500, 2, seed=0, min_size=8)  # 4 examples per client
