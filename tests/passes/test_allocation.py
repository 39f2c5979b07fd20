import itertools

import pytest
import torch
from rewriter.models.moe import MoEFFN
from rewriter.passes.allocation import allocate_top_k, apply_top_k, dropped_loss_curve


def _block(gate="hard", seed=0, E=6, top_k=2):
    torch.manual_seed(seed)
    block = MoEFFN(24, 5, E, top_k, shared_dim=7, gate=gate, router_bias=True,
                   dtype=torch.float64)
    torch.nn.init.normal_(block.router.weight)
    torch.nn.init.normal_(block.router.bias)
    block.expert_bias.normal_(0, 0.1)
    return block.eval()


@torch.no_grad()
def test_dropped_loss_curve_equals_the_blocks_own_forward():
    """curve[k] = mean_t (g_t . (all experts - the block routed to k))^2, with the block's
    hard-gated forward computing the routed output (float64, odd shapes)."""
    block = _block(seed=1)
    x = torch.randn(37, 24, dtype=torch.float64)
    g = torch.randn(37, 24, dtype=torch.float64)
    curve = dropped_loss_curve(block, x, g)
    assert curve.shape == (7,) and curve[-1] == 0
    apply_top_k(block, 6, 2)
    full = block(x)
    for k in range(1, 7):
        apply_top_k(block, k, 2)
        r = full - block(x)
        torch.testing.assert_close(curve[k], (g * r).sum(-1).square().mean(), rtol=1e-10,
                                   atol=1e-12)
    assert curve[0] > curve[3] > 0


def _brute_force(curves, dims, top_k):
    best = None
    for ks in itertools.product(*[range(1, len(c)) for c in curves]):
        if sum(k * f for k, f in zip(ks, dims)) <= top_k * sum(dims):
            cost = sum(float(c[k]) for c, k in zip(curves, ks))
            if best is None or cost < best[0] - 1e-12:
                best = (cost, list(ks))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_optimal_on_convex_curves(seed):
    g = torch.Generator().manual_seed(seed)
    curves, dims = [], [3, 5, 3, 4]
    for _ in dims:
        drops = torch.rand(5, generator=g, dtype=torch.float64).sort(descending=True).values
        drops = drops * torch.rand(1, generator=g, dtype=torch.float64) * 10
        curves.append(torch.cat([drops.flip(0).cumsum(0).flip(0), torch.zeros(1)]))  # convex
    ks = allocate_top_k(curves, dims, 2)
    assert sum(k * f for k, f in zip(ks, dims)) <= 2 * sum(dims)
    cost = sum(float(c[k]) for c, k in zip(curves, ks))
    assert cost == pytest.approx(_brute_force(curves, dims, 2)[0], rel=1e-9, abs=1e-12)


def test_allocation_favours_sensitive_blocks_and_keeps_the_budget():
    base = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    curves = [base * 0.01, base * 10.0, base * 0.1]
    ks = allocate_top_k(curves, [4, 4, 4], 2)
    assert sum(ks) == 6 and ks[1] == max(ks) and ks[0] == min(ks)
    assert allocate_top_k(curves, [4, 4, 4], 5) == [5, 5, 5]  # top_k == E: all experts
    # a flat start does not hide a later drop
    flat_then_steep = torch.tensor([5.0, 5.0, 5.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    gentle = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], dtype=torch.float64)
    assert allocate_top_k([flat_then_steep, gentle], [1, 1], 2) == [3, 1]


def test_allocation_bad_input():
    c = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="one curve per"):
        allocate_top_k([c], [1, 2], 1)
    with pytest.raises(ValueError, match="top_k=4"):
        allocate_top_k([c], [1], 4)
    with pytest.raises(ValueError, match="one shape"):
        dropped_loss_curve(_block(), torch.randn(3, 24), torch.randn(4, 24))


def test_apply_top_k_keeps_each_experts_weight():
    hard, soft = _block("hard"), _block("sigmoid")
    soft.config = type(soft.config)(**{**soft.config.__dict__, "route_scale": 2.0})
    apply_top_k(hard, 4, 2)
    apply_top_k(soft, 4, 2)
    assert hard.top_k == 4 and hard.config.route_scale == 1.0
    assert soft.top_k == 4 and soft.config.route_scale == 4.0
    with pytest.raises(ValueError, match="top_k"):
        apply_top_k(hard, 7, 2)


def test_dropped_loss_curve_in_chunks_is_the_same(monkeypatch):
    import rewriter.passes.allocation as allocation

    block = _block(seed=2)
    x = torch.randn(23, 24, dtype=torch.float64)
    g = torch.randn(23, 24, dtype=torch.float64)
    whole = dropped_loss_curve(block, x, g)
    monkeypatch.setattr(allocation, "_CHUNK", 5)
    torch.testing.assert_close(dropped_loss_curve(block, x, g), whole, rtol=1e-12, atol=0)
