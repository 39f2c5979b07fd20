import pytest
import torch
from rewriter.passes.grouping import balanced_kmeans, group_neurons, select_shared


def _is_partition(parts, universe):
    cat = torch.cat(parts)
    return cat.numel() == universe.numel() and torch.equal(torch.sort(cat).values,
                                                           torch.sort(universe).values)


def _planted(n_groups=5, size=13, dim=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_groups, dim, generator=g) * 3
    labels = torch.arange(n_groups).repeat_interleave(size)
    perm = torch.randperm(labels.numel(), generator=g)
    labels = labels[perm]
    x = centres[labels] + 0.3 * torch.randn(labels.numel(), dim, generator=g)
    return x, labels


def _recovered(parts, labels):
    return all(labels[p].unique().numel() == 1 for p in parts)


def test_balanced_kmeans_equal_sizes_and_recovers_planted_clusters():
    x, labels = _planted()
    parts = balanced_kmeans(x, 5, seed=1)
    assert [p.numel() for p in parts] == [13] * 5
    assert _is_partition(parts, torch.arange(65))
    assert _recovered(parts, labels)
    again = balanced_kmeans(x, 5, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


@pytest.mark.parametrize("strategy", ["contiguous", "random", "kmeans", "coactivation"])
def test_every_strategy_partitions_the_routed_neurons(strategy):
    d_ff, d = 60, 7
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(d_ff, d, generator=g)
    acts = torch.randn(200, d_ff, generator=g).abs()
    coact = acts.T @ acts
    neurons = torch.tensor([i for i in range(d_ff) if i % 5])  # 48 routed, 12 shared
    parts = group_neurons(strategy, neurons, 6, first_rows=rows, coactivation=coact, seed=2)
    assert [p.numel() for p in parts] == [8] * 6
    assert _is_partition(parts, neurons)
    if strategy == "contiguous":
        assert torch.equal(parts[0], neurons[:8])


def test_coactivation_grouping_finds_neurons_that_fire_together():
    g = torch.Generator().manual_seed(0)
    n_groups, size, tokens = 4, 6, 600
    owner = torch.randperm(n_groups * size, generator=g) % n_groups  # neuron -> planted group
    which = torch.randint(0, n_groups, (tokens,), generator=g)  # token -> active group
    active = (owner[None, :] == which[:, None]).float()  # (tokens, neurons)
    coact = active.T @ active
    parts = group_neurons("coactivation", torch.arange(n_groups * size), n_groups,
                          coactivation=coact)
    assert _recovered(parts, owner)


def test_shared_selection_takes_the_most_active_neurons():
    mean_abs = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.05, 4.0])
    assert select_shared("activation", 6, 3, mean_abs=mean_abs).tolist() == [1, 3, 5]
    assert select_shared("contiguous", 6, 2).tolist() == [0, 1]
    assert select_shared("activation", 6, 0).numel() == 0
    with pytest.raises(ValueError, match="needs calibration"):
        select_shared("activation", 6, 2)


def test_grouping_errors_are_named():
    with pytest.raises(ValueError, match="cannot form 4 equal groups"):
        group_neurons("contiguous", torch.arange(10), 4)
    with pytest.raises(ValueError, match="grouping must be one of"):
        group_neurons("spectral", torch.arange(8), 4)
    with pytest.raises(ValueError, match="needs calibration"):
        group_neurons("coactivation", torch.arange(8), 4)
