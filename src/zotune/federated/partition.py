"""Seeded, disjoint partitions of a train split over K clients: IID, or label-skewed non-IID with
per-label client shares drawn from a Dirichlet(alpha) distribution (smaller alpha, more skew).

Flower's own partitioners (flwr-datasets) work on Hugging Face `datasets` objects they download
from a hub; zotune's splits are in-memory lists from any loader, so the two rules are implemented
here in a few lines, with the same semantics as flwr-datasets' IidPartitioner and
DirichletPartitioner (resampled until every client has `min_size` examples)."""

from __future__ import annotations

import numpy as np

from zotune.errors import DataError


def iid(n: int, clients: int, seed: int) -> list[list[int]]:
    """A seeded shuffle of range(n) cut into `clients` near-equal parts."""
    perm = np.random.default_rng(seed).permutation(n)
    return [sorted(part.tolist()) for part in np.array_split(perm, clients)]


def dirichlet(
    labels: list[int], clients: int, alpha: float, seed: int, min_size: int = 1, tries: int = 100
) -> list[list[int]]:
    """Per label, the examples are shuffled and cut among the clients in proportions drawn
    from Dirichlet(alpha * 1_K)."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    for _ in range(tries):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(labels_arr):
            idx = rng.permutation(np.flatnonzero(labels_arr == label))
            share = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise DataError(
        f"no Dirichlet(alpha={alpha}) partition of {len(labels)} examples over "
        f"{clients} clients gave every client {min_size} examples in {tries} draws; "
        "raise federated.alpha or data.train_size, or use fewer clients",
        field="federated.alpha",
    )


def partition(
    labels: list[int | None], clients: int, kind: str, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """-> for each client, the sorted indices of its examples (disjoint, covering range(n))."""
    n = len(labels)
    if n < clients * min_size:
        raise DataError(
            f"a train split of {n} examples cannot give {clients} clients {min_size} examples each",
            field="federated.clients",
        )
    if kind == "iid":
        return iid(n, clients, seed)
    if any(label is None for label in labels):
        raise DataError(
            "dirichlet partitioning needs a classification task (labels); "
            "use federated.partition: iid for generation tasks",
            field="federated.partition",
        )
    return dirichlet(labels, clients, alpha, seed, min_size)


def label_skew(labels: list[int], parts: list[list[int]]) -> float:
    """Mean total-variation distance between each client's label distribution and the whole
    split's: 0 for identical mixes, up to 1 for disjoint labels."""
    labels_arr = np.asarray(labels)
    classes = np.unique(labels_arr)
    overall = np.array([(labels_arr == c).mean() for c in classes])
    tv = []
    for p in parts:
        mine = labels_arr[p]
        dist = np.array([(mine == c).mean() for c in classes])
        tv.append(0.5 * np.abs(dist - overall).sum())
    return float(np.mean(tv))
