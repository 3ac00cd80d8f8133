"""Split a training set over clients: IID, label-Dirichlet(alpha) or label shards, seeded.

The Dirichlet split follows the papers' code (ALGORITHMS.md 0.2): for each label, draw
proportions p ~ Dir(alpha * 1_N) over the N clients, give client c floor(n_label * p_c)
examples of that label and the last client the remainder, so every example is assigned
exactly once. Draws are repeated (seeded, at most ``max_draws``) until every client holds ``min_size`` examples;
only the per-label counts are drawn per attempt (index lists are built once), so a draw
costs microseconds. With thousands of clients most clients of a draw are tiny and no draw
may succeed: after ``max_draws`` the last draw is **topped up** instead of failing: each short
client takes the missing examples of its own most likely label (its largest p_c) from the
client holding most of that label, never leaving a donor below ``min_size`` (the next most
likely label when no donor has spare of it). Topping up keeps the label skew of the draw
(a tiny client gets more of its dominant label) and always succeeds when N * min_size <= n.

The shards split is the FedAvg paper's pathological non-IID split (McMahan et al. 2017):
sort the examples by label, cut them into ``N * k`` equal shards and give each client k
shards at random, so a client sees at most k labels.

Small functions rather than flwr-datasets' partitioners: they work on index arrays of any
task and need no `datasets` table.
"""

from __future__ import annotations

import numpy as np

from fedlora.errors import DataError


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    if num_clients > n:
        raise DataError(f"{num_clients} clients but only {n} training examples; use fewer clients")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def _draw(rng: np.random.Generator, by_label: list[np.ndarray], num_clients: int, alpha: float):
    """One Dirichlet draw: per label its permuted rows, its proportions over clients and the counts."""
    rows, props, counts = [], [], []
    for of_label in by_label:
        idx = rng.permutation(of_label)
        p = rng.dirichlet(np.full(num_clients, alpha))
        c = np.floor(len(idx) * p).astype(np.int64)
        c[-1] = len(idx) - c[:-1].sum()
        rows.append(idx)
        props.append(p)
        counts.append(c)
    return rows, np.stack(props), np.stack(counts)  # (labels, clients) for the last two


def _top_up(props: np.ndarray, counts: np.ndarray, min_size: int) -> np.ndarray:
    """Move examples to every client below ``min_size`` (see the module's docstring); counts: (labels, clients)."""
    counts = counts.copy()
    sizes = counts.sum(axis=0)
    for c in np.flatnonzero(sizes < min_size):
        for y in np.argsort(-props[:, c], kind="stable"):  # the client's most likely label first
            while sizes[c] < min_size:
                spare = np.minimum(counts[y], sizes - min_size)  # what each client can give of label y
                spare[c] = 0
                donor = int(np.argmax(spare))
                if spare[donor] <= 0:
                    break
                moved = int(min(spare[donor], min_size - sizes[c]))
                counts[y, donor] -= moved
                counts[y, c] += moved
                sizes[donor] -= moved
                sizes[c] += moved
            if sizes[c] >= min_size:
                break
    return counts


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1, max_draws: int = 100
) -> list[np.ndarray]:
    n = len(labels)
    if num_clients * min_size > n:
        raise DataError(
            f"{num_clients} clients x min_client_size {min_size} exceeds the {n} training examples; "
            "lower federation.min_client_size or use fewer clients"
        )
    rng = np.random.default_rng(seed)
    by_label = [np.flatnonzero(labels == y) for y in np.unique(labels)]
    for _ in range(max(1, max_draws)):
        rows, props, counts = _draw(rng, by_label, num_clients, alpha)
        if counts.sum(axis=0).min() >= min_size:
            break
    else:
        counts = _top_up(props, counts, min_size)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for idx, c in zip(rows, counts, strict=True):
        for client, chunk in enumerate(np.split(idx, np.cumsum(c)[:-1])):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def shards_partition(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int,
                     min_size: int = 1) -> list[np.ndarray]:
    """FedAvg's shards: label-sorted rows cut into ``num_clients * shards_per_client`` shards, k per client."""
    n, shards = len(labels), num_clients * shards_per_client
    if shards > n or n // shards * shards_per_client < min_size:
        raise DataError(
            f"{num_clients} clients x {shards_per_client} shards leave clients below min_client_size {min_size} "
            f"(or empty) with {n} training examples; lower federation.shards_per_client, "
            "federation.min_client_size or use fewer clients"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)  # ties within a label in random order
    order = order[np.argsort(labels[order], kind="stable")]
    pieces = np.array_split(order, shards)
    deal = rng.permutation(shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in deal]


def partition(labels: np.ndarray, *, scheme: str, num_clients: int, alpha: float, seed: int, min_size: int,
              shards_per_client: int = 2) -> list[np.ndarray]:
    if scheme == "iid":
        return iid_partition(len(labels), num_clients, seed)
    if scheme == "shards":
        return shards_partition(labels, num_clients, shards_per_client, seed, min_size)
    return dirichlet_partition(labels, num_clients, alpha, seed, min_size)


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_labels: int) -> list[list[int]]:
    return [np.bincount(labels[p], minlength=num_labels).tolist() for p in parts]
