"""Split a training set over clients: IID or label-Dirichlet(alpha), seeded.

The Dirichlet split follows the papers' code (ALGORITHMS.md 0.2): for each label, draw
proportions p ~ Dir(alpha * 1_N) over the N clients, give client c floor(n_label * p_c)
examples of that label and the last client the remainder, so every example is assigned
exactly once. Draws are repeated (seeded) until every client holds ``min_size`` examples.
A small function rather than flwr-datasets' partitioner: it works on index arrays of any
task and needs no `datasets` table.
"""

from __future__ import annotations

import numpy as np

from fedlora.errors import DataError


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    if num_clients > n:
        raise DataError(f"{num_clients} clients but only {n} training examples; use fewer clients")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1, max_draws: int = 1000
) -> list[np.ndarray]:
    n = len(labels)
    if num_clients * min_size > n:
        raise DataError(
            f"{num_clients} clients x min_client_size {min_size} exceeds the {n} training examples; use fewer clients"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_draws):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for y in classes:
            idx = rng.permutation(np.flatnonzero(labels == y))
            p = rng.dirichlet(np.full(num_clients, alpha))
            counts = np.floor(len(idx) * p).astype(int)
            counts[-1] = len(idx) - counts[:-1].sum()
            for c, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
                parts[c].append(chunk)
        clients = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(c) for c in clients) >= min_size:
            return clients
    raise DataError(
        f"no Dirichlet(alpha={alpha}) draw gave all {num_clients} clients {min_size} examples; "
        "raise federation.dirichlet_alpha, lower federation.min_client_size or use fewer clients"
    )


def partition(labels: np.ndarray, *, scheme: str, num_clients: int, alpha: float, seed: int, min_size: int) -> list[np.ndarray]:
    if scheme == "iid":
        return iid_partition(len(labels), num_clients, seed)
    return dirichlet_partition(labels, num_clients, alpha, seed, min_size)


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_labels: int) -> list[list[int]]:
    return [np.bincount(labels[p], minlength=num_labels).tolist() for p in parts]
