"""Neuron grouping: which hidden neurons of an FFN go to the shared expert and to each routed one.

Strategies (all return equal-size groups, each a sorted LongTensor of neuron indices):

* ``contiguous``: slices in order (MoE upcycling without reordering).
* ``random``: a seeded permutation.
* ``kmeans``: balanced k-means on the normalised rows of the first projection (gate and up rows
  concatenated for GLUs), as MoEfication clusters neurons by their input weights.
* ``coactivation``: balanced k-means on each neuron's co-activation profile measured on
  calibration data (neurons that fire together end up together).

Shared selection: ``activation`` takes the neurons with the highest mean |h| on calibration data
(CMoE); ``contiguous`` takes the first ones.
"""

from __future__ import annotations

import torch

__all__ = [
    "GROUPINGS",
    "SHARED_SELECTIONS",
    "balanced_kmeans",
    "group_neurons",
    "select_shared",
]

GROUPINGS = ("contiguous", "random", "kmeans", "coactivation")
SHARED_SELECTIONS = ("activation", "contiguous")


def _normalise_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each of n rows to one of E clusters of exactly ``size`` members. sim: (n, E).

    Rounds of: every unassigned row proposes to its most similar open cluster; a cluster keeps
    the most similar proposals up to its free capacity and closes when full. At most E rounds.
    """
    n, num = sim.shape
    assign = torch.full((n,), -1, dtype=torch.long)
    free = torch.full((num,), size, dtype=torch.long)
    while True:
        todo = torch.nonzero(assign < 0).flatten()
        if todo.numel() == 0:
            return assign
        s = sim[todo].clone()
        s[:, free == 0] = -torch.inf
        best = s.argmax(1)  # (m,)
        for c in torch.unique(best).tolist():
            rows = todo[best == c]
            take = int(free[c])
            if rows.numel() > take:
                rows = rows[sim[rows, c].topk(take).indices]
            assign[rows] = c
            free[c] -= rows.numel()


def balanced_kmeans(
    features: torch.Tensor, num_groups: int, *, iters: int = 15, seed: int = 0
) -> list[torch.Tensor]:
    """Equal-size spherical k-means of the rows of ``features`` (n, f); n % num_groups == 0."""
    n = features.shape[0]
    if n % num_groups:
        raise ValueError(f"{n} rows cannot form {num_groups} equal groups")
    size = n // num_groups
    x = _normalise_rows(features)  # (n, f)
    g = torch.Generator().manual_seed(seed)
    # k-means++ style seeding: far-apart rows as initial centroids
    first = int(torch.randint(n, (1,), generator=g))
    centroids = [x[first]]
    for _ in range(1, num_groups):
        sim = torch.stack([x @ c for c in centroids], 1).max(1).values  # (n,)
        weights = (1 - sim).clamp_min(1e-12)
        centroids.append(x[int(torch.multinomial(weights, 1, generator=g))])
    c = torch.stack(centroids)  # (E, f)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(x @ c.T, size)
        if torch.equal(new, assign):
            break
        assign = new
        onehot = torch.nn.functional.one_hot(assign, num_groups).to(x.dtype)  # (n, E)
        c = _normalise_rows(onehot.T @ x)  # (E, f) cluster means, renormalised
    return [torch.nonzero(assign == k).flatten() for k in range(num_groups)]


def select_shared(
    strategy: str, d_ff: int, width: int, *, mean_abs: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices (sorted) of the ``width`` neurons of the shared expert."""
    if width == 0:
        return torch.zeros(0, dtype=torch.long)
    if strategy == "activation":
        if mean_abs is None:
            raise ValueError("shared_selection='activation' needs calibration data")
        return torch.sort(torch.topk(mean_abs.double(), width).indices).values
    if strategy == "contiguous":
        return torch.arange(width)
    raise ValueError(f"shared_selection must be one of {SHARED_SELECTIONS}, got {strategy!r}")


def group_neurons(
    strategy: str,
    neurons: torch.Tensor,
    num_groups: int,
    *,
    first_rows: torch.Tensor | None = None,
    coactivation: torch.Tensor | None = None,
    seed: int = 0,
    iters: int = 15,
) -> list[torch.Tensor]:
    """Split ``neurons`` (indices) into ``num_groups`` equal groups by ``strategy``.

    ``first_rows``: (d_ff, f) first-projection rows (kmeans); ``coactivation``: (d_ff, d_ff)
    (coactivation).
    """
    n = neurons.numel()
    if n % num_groups:
        raise ValueError(f"{n} neurons cannot form {num_groups} equal groups")
    size = n // num_groups
    if strategy == "contiguous":
        parts = [neurons[i * size:(i + 1) * size] for i in range(num_groups)]
    elif strategy == "random":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        parts = [neurons[perm[i * size:(i + 1) * size]] for i in range(num_groups)]
    elif strategy == "kmeans":
        if first_rows is None:
            raise ValueError("grouping='kmeans' needs the first projection's rows")
        local = balanced_kmeans(first_rows[neurons], num_groups, iters=iters, seed=seed)
        parts = [neurons[i] for i in local]
    elif strategy == "coactivation":
        if coactivation is None:
            raise ValueError("grouping='coactivation' needs calibration data")
        profile = coactivation[neurons][:, neurons].double()
        profile = profile / profile.diagonal().clamp_min(1e-12).sqrt()[:, None]
        local = balanced_kmeans(profile, num_groups, iters=iters, seed=seed)
        parts = [neurons[i] for i in local]
    else:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {strategy!r}")
    return [torch.sort(p).values for p in parts]
