"""passes/router_init.py: centroid router, expert contributions, the fitted router, recall.

Seeded synthetic data only (no real model): a planted linear model of which experts matter
for a token, odd sizes, float64 references.
"""

import pytest
import torch
from rewriter.passes.router_init import (
    centroid_router,
    expert_contributions,
    fit_router,
    router_target,
    topk_recall,
)


def _groups(n: int, num: int, seed: int = 0) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    size = n // num
    return [torch.sort(perm[i * size:(i + 1) * size]).values for i in range(num)]


def _planted(n: int, d: int = 13, num_experts: int = 7, noise: float = 0.05, seed: int = 0):
    """x (n, d) and contributions (n, E) whose log is a linear function of x plus noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num_experts, d, generator=g, dtype=torch.float64)
    b = torch.randn(num_experts, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.5 + 0.3
    logc = x @ w.T + b + noise * torch.randn(n, num_experts, generator=g, dtype=torch.float64)
    return x.float(), logc.exp()


def test_centroid_router_rows_are_normalised_means():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(21, 5, generator=g) * torch.rand(21, 1, generator=g) * 10  # (d_ff, d)
    groups = _groups(21, 3, seed=2)
    w = centroid_router(rows, groups)
    assert w.shape == (3, 5) and w.dtype == torch.float32
    for e, grp in enumerate(groups):
        unit = [rows[i].double() / rows[i].double().norm() for i in grp.tolist()]
        ref = torch.stack(unit).mean(0)
        torch.testing.assert_close(w[e].double(), ref, rtol=1e-6, atol=1e-7)


def test_expert_contributions_equal_a_reference_loop():
    g = torch.Generator().manual_seed(3)
    n, d, d_ff, num = 11, 6, 15, 5
    h = torch.randn(n, d_ff, generator=g)
    w_down = torch.randn(d, d_ff, generator=g)  # (d, d_ff) nn.Linear layout
    groups = _groups(d_ff, num, seed=4)
    got = expert_contributions(h, w_down, groups)
    assert got.shape == (n, num) and got.dtype == torch.float64
    ref = torch.zeros(n, num, dtype=torch.float64)
    for t in range(n):
        for e, grp in enumerate(groups):
            y = torch.zeros(d, dtype=torch.float64)
            for j in grp.tolist():
                y += w_down[:, j].double() * float(h[t, j])
            ref[t, e] = y.norm()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # the contributions of all experts add up to the dense down projection's output
    parts = [h[:, grp].double() @ w_down[:, grp].double().T for grp in groups]
    torch.testing.assert_close(sum(parts), h.double() @ w_down.double().T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top_k", [None, 3])
def test_fit_router_recovers_a_planted_linear_ranking(top_k):
    x, c = _planted(3000)
    w, b = fit_router(x[:2000], c[:2000], top_k=top_k)
    assert w.shape == (7, 13) and b.shape == (7,)
    assert w.dtype == b.dtype == torch.float32
    scores = x[2000:].double() @ w.double().T + b.double()  # held-out tokens
    for k in (1, 3, 5):
        assert topk_recall(scores, c[2000:], k) > 0.9


def test_fit_router_beats_the_centroid_router_on_planted_data():
    x, c = _planted(3000, d=13, num_experts=7, noise=0.3, seed=5)
    first_rows = torch.randn(21, 13, generator=torch.Generator().manual_seed(6))
    groups = _groups(21, 7, seed=7)
    w_c = centroid_router(first_rows, groups)
    w, b = fit_router(x[:2000], c[:2000])
    xt, ct = x[2000:].double(), c[2000:]
    fitted = topk_recall(xt @ w.double().T + b.double(), ct, 2)
    centroid = topk_recall(xt @ w_c.double().T, ct, 2)
    assert fitted > 0.8 and fitted > centroid + 0.3


def test_topk_recall_oracle_and_random():
    g = torch.Generator().manual_seed(8)
    c = torch.rand(20000, 16, generator=g, dtype=torch.float64)
    assert topk_recall(c, c, 4) == 1.0
    assert topk_recall(c.log(), c, 4) == 1.0  # only the ranking matters
    rand = torch.rand(20000, 16, generator=g, dtype=torch.float64)
    assert topk_recall(rand, c, 4) == pytest.approx(4 / 16, abs=0.01)
    assert topk_recall(rand, c, 16) == 1.0
    assert topk_recall(-c, c, 4) == 0.0  # the 4 worst never include the 4 best of 16


def test_fit_router_is_deterministic_and_ignores_contribution_scale():
    x, c = _planted(500, seed=9)
    w1, b1 = fit_router(x, c, top_k=2)
    w2, b2 = fit_router(x.clone(), c.clone(), top_k=2)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    # a per-token positive scale of the contributions does not change the ranking target
    scale = torch.rand(500, 1, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    w3, b3 = fit_router(x, c * (scale + 0.1), top_k=2)
    torch.testing.assert_close(w3, w1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b3, b1, rtol=1e-4, atol=1e-5)


def test_router_target_standardises_and_marks_the_top_k():
    c = torch.tensor([[1.0, 10.0, 100.0, 1000.0], [5.0, 5.0, 5.0, 5.0]])
    t = router_target(c)
    torch.testing.assert_close(t[0].mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(t[0].std(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(t[1], torch.zeros(4, dtype=torch.float64))  # ties: no ranking, no NaN
    tk = router_target(c, top_k=2)
    torch.testing.assert_close(tk[0] - t[0], torch.tensor([0.0, 0.0, 1.0, 1.0],
                                                          dtype=torch.float64))


def test_fit_router_rejects_bad_input():
    x, c = _planted(10)
    with pytest.raises(ValueError, match="same N"):
        fit_router(x[:5], c)
    with pytest.raises(ValueError, match="at least 2"):
        fit_router(x[:1], c[:1])
    with pytest.raises(ValueError, match="top_k"):
        fit_router(x, c, top_k=8)
    with pytest.raises(ValueError, match="ridge"):
        fit_router(x, c, ridge=-1.0)


def test_fit_router_without_intercept_is_ridge_through_the_origin():
    """intercept=False (a router Hugging Face's MoE architectures can hold): zero bias, and the
    weight solves (X^T X + lam I) w = X^T y on uncentred x (float64 reference); on inputs with
    a mean it still ranks planted experts well."""
    x, c = _planted(3000, seed=11)
    x = x + 0.7  # a non-zero mean: what the intercept would absorb
    w, b = fit_router(x[:2000], c[:2000], top_k=3, intercept=False)
    assert torch.equal(b, torch.zeros(7))
    xd = x[:2000].double()
    target = router_target(c[:2000], 3)
    gram = xd.T @ xd
    lam = 0.3 * gram.diagonal().mean()
    ref = torch.linalg.solve(gram + lam * torch.eye(13, dtype=torch.float64), xd.T @ target)
    torch.testing.assert_close(w.double(), ref.T, rtol=1e-5, atol=1e-6)
    assert topk_recall(x[2000:].double() @ w.double().T, c[2000:], 3) > 0.8
