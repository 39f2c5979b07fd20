"""models/moe.py: MoEFFN against references written here (dense FFN, per-token loops)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from rewriter.models.moe import (
    GATE_MODES,
    MOE_ACTIVATIONS,
    MoEFFN,
    MoEFFNConfig,
    SharedExpert,
    _runs,
)
from torch import nn
from torch.export import Dim

D, FF, E = 20, 7, 5  # odd shapes on purpose


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize(m: MoEFFN, seed: int = 0, router_std: float = 1.0) -> MoEFFN:
    """Non-trivial values everywhere (b_out is zero-initialised)."""
    g = _gen(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
        m.router.weight.mul_(router_std / 0.3)
    return m


def _x(*shape, seed=1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- references


def _act(m: MoEFFN):
    return MOE_ACTIVATIONS[m.config.activation]


def _dense_ref(m: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN the block came from, in float64: concatenate every routed expert's and the
    shared expert's neurons into one MLP, output bias once."""
    c = m.config
    x = x.double().reshape(-1, c.d_model)
    up = [m.w_up.double().reshape(-1, c.d_model)]  # (E*F, d)
    down = [m.w_down.double().permute(1, 0, 2).reshape(c.d_model, -1)]  # (d, E*F)
    gate = [m.w_gate.double().reshape(-1, c.d_model)] if c.glu else []
    b_up = [m.b_up.double().reshape(-1)] if c.bias else []
    b_gate = [m.b_gate.double().reshape(-1)] if c.bias and c.glu else []
    if m.shared is not None:
        up.append(m.shared.up.weight.double())
        down.append(m.shared.down.weight.double())
        if c.glu:
            gate.append(m.shared.gate.weight.double())
        if c.bias:
            b_up.append(m.shared.up.bias.double())
            if c.glu:
                b_gate.append(m.shared.gate.bias.double())
    W1, W2 = torch.cat(up), torch.cat(down, dim=1)
    h = F.linear(x, W1, torch.cat(b_up) if b_up else None)
    if c.glu:
        h = _act(m)(F.linear(x, torch.cat(gate), torch.cat(b_gate) if b_gate else None)) * h
    else:
        h = _act(m)(h)
    y = F.linear(h, W2)
    if c.bias:
        y = y + m.b_out.double()
    return y


def _expert_ref(m: MoEFFN, e: int, xt: torch.Tensor) -> torch.Tensor:
    """One routed expert on one token (d,), float64."""
    c = m.config
    up = m.w_up[e].double() @ xt
    if c.bias:
        up = up + m.b_up[e].double()
    if c.glu:
        g = m.w_gate[e].double() @ xt
        if c.bias:
            g = g + m.b_gate[e].double()
        h = _act(m)(g) * up
    else:
        h = _act(m)(up)
    return m.w_down[e].double() @ h


def _loop_ref(m: MoEFFN, x: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """Token by token: routing in float64, selected experts weighted, shared + b_out added."""
    c = m.config
    xs = x.double().reshape(-1, c.d_model)
    rows, chosen = [], []
    for xt in xs:
        logits = m.router.weight.double() @ xt
        if m.router.bias is not None:
            logits = logits + m.router.bias.double()
        s = torch.sigmoid(logits) if c.gate == "sigmoid" else torch.softmax(logits, dim=0)
        sel = torch.topk(s + m.expert_bias.double(), c.top_k).indices.tolist()
        w = s[sel]
        if c.gate == "hard":
            w = torch.ones_like(w)
        else:
            if c.renormalize:
                w = w / w.sum()
            w = w * c.route_scale
        y = sum(wi * _expert_ref(m, e, xt) for wi, e in zip(w, sel))
        if m.shared is not None:
            y = y + _shared_ref(m, xt)
        if c.bias:
            y = y + m.b_out.double()
        rows.append(y)
        chosen.append(sorted(sel))
    return torch.stack(rows), chosen


def _shared_ref(m: MoEFFN, xt: torch.Tensor) -> torch.Tensor:
    sh = m.shared
    up = F.linear(xt, sh.up.weight.double(), None if sh.up.bias is None else sh.up.bias.double())
    if sh.gate is not None:
        g = F.linear(xt, sh.gate.weight.double(),
                     None if sh.gate.bias is None else sh.gate.bias.double())
        h = sh.act(g) * up
    else:
        h = sh.act(up)
    return sh.down.weight.double() @ h


# ---------------------------------------------------------------- 1. exact split


@pytest.mark.parametrize(
    ("glu", "bias", "activation", "shared_dim"),
    list(itertools.product([True, False], [True, False], sorted(MOE_ACTIVATIONS), [0, 6])),
)
def test_all_experts_hard_equals_dense(glu, bias, activation, shared_dim):
    kw = dict(shared_dim=shared_dim, activation=activation, glu=glu, bias=bias, gate="hard")
    m64 = _randomize(MoEFFN(D, FF, E, E, dtype=torch.float64, **kw), seed=3)
    x = _x(2, 9, D)
    y64 = m64(x)
    assert y64.dtype == torch.float64 and y64.shape == x.shape
    assert _rel(y64.reshape(-1, D), _dense_ref(m64, x)) <= 1e-12

    m32 = MoEFFN(D, FF, E, E, **kw)
    m32.load_state_dict(m64.state_dict())  # same weights, rounded to fp32
    x32 = x.float()
    y32 = m32(x32)
    assert y32.dtype == torch.float32
    assert _rel(y32.reshape(-1, D), _dense_ref(m32, x32)) <= 1e-6


def test_router_stays_float32_and_load_is_full():
    m = MoEFFN(D, FF, E, E, dtype=torch.float64)
    assert m.router.weight.dtype == torch.float32 and m.expert_bias.dtype == torch.float32
    m(_x(3, D))
    assert m.last_load.tolist() == [3.0] * E
    assert m.load_stats()["max_over_mean"] == pytest.approx(1.0)


# ---------------------------------------------------------------- 2. routed top-k


@pytest.mark.parametrize(
    ("gate", "renormalize", "route_scale"),
    [("hard", True, 1.0), ("softmax", True, 1.0), ("softmax", False, 1.0),
     ("softmax", True, 2.5), ("sigmoid", True, 1.0), ("sigmoid", True, 2.5)],
)
@pytest.mark.parametrize("glu", [True, False])
def test_top_k_equals_token_loop(gate, renormalize, route_scale, glu):
    m = MoEFFN(D, FF, E, 2, shared_dim=4, glu=glu, bias=True, gate=gate, router_bias=True,
               renormalize=renormalize, route_scale=route_scale, activation="gelu",
               dtype=torch.float64)
    _randomize(m, seed=5)
    x = _x(3, 11, D, seed=6)
    ref, chosen = _loop_ref(m, x)
    assert _rel(m(x).reshape(-1, D), ref) <= 1e-12
    load = torch.zeros(E)
    for sel in chosen:
        load[sel] += 1
    assert torch.equal(m.last_load, load)


@pytest.mark.parametrize("gate", GATE_MODES)
def test_expert_bias_changes_selection_not_weights(gate):
    m = _randomize(MoEFFN(D, FF, E, 2, gate=gate, dtype=torch.float64), seed=7)
    x = _x(40, D, seed=8)
    before = m(x)
    _, chosen_before = _loop_ref(m, x)
    forced = min(range(E), key=lambda e: sum(e in s for s in chosen_before))
    with torch.no_grad():
        m.expert_bias[forced] = 100.0
    after = m(x)
    ref, chosen = _loop_ref(m, x)  # reference: biased selection, unbiased weights
    assert all(forced in s for s in chosen)
    assert m.last_load[forced].item() == 40
    assert _rel(after, ref) <= 1e-12
    assert _rel(after, before) > 1e-3


def test_sorted_and_masked_dispatch_agree():
    m = _randomize(MoEFFN(D, FF, E, 3, bias=True, gate="softmax"), seed=9)
    x = _x(33, D, seed=10, dtype=torch.float32)
    idx, w, _ = m._route(x)
    sorted_out, counts = m._dispatch_sorted(x, idx, w)
    masked_out = m._dispatch_masked(x, idx, w)
    assert torch.allclose(sorted_out, masked_out, rtol=1e-6, atol=1e-6)
    assert torch.equal(counts.float(), torch.bincount(idx.flatten(), minlength=E).float())


def test_runs_cover_every_slot_once_in_expert_order():
    sizes = [0, 3, 0, 300, 2, 0, 0, 5, 0, 250, 250]
    runs = _runs(sizes, 256)
    assert runs == [(1, 3, 0, 3), (3, 4, 3, 303), (4, 9, 303, 310), (9, 10, 310, 560),
                    (10, 11, 560, 810)]
    for e0, e1, s0, s1 in runs:  # each run: its experts' slots, below the cap or one expert
        assert sum(sizes[e0:e1]) == s1 - s0 and (s1 - s0 < 256 or e1 - e0 == 1)
    assert _runs([0, 0], 256) == [] and _runs([], 256) == []


GD, GF = 28, 12  # d and F whose fp32/bf16 rows are 16-byte strides: the grouped GEMM's rule


@pytest.mark.parametrize("glu,bias,gate", [(True, False, "sigmoid"), (True, True, "softmax"),
                                           (False, True, "hard"), (False, False, "sigmoid")])
@pytest.mark.parametrize("tokens,slots", [(37, 256), (301, 256), (301, 16), (1, 256)])
def test_grouped_runs_match_the_float64_reference(glu, bias, gate, tokens, slots):
    m = _randomize(MoEFFN(GD, GF, 9, 3, glu=glu, bias=bias, gate=gate, shared_dim=8,
                          activation="silu" if glu else "gelu"), seed=21)
    m.grouped_run_slots = slots
    x = _x(tokens, GD, seed=22, dtype=torch.float32)
    assert m._runs_grouped(x)  # the path under test is the one taken
    with torch.no_grad():
        got = m(x)
        m.grouped_run_slots = 0  # one matmul chain per expert
        chains = m(x)
    ref, _ = _loop_ref(m, x)
    assert _rel(got, ref) <= 2e-6
    assert _rel(got, chains) <= 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_grouped_runs_in_half_precision_match_the_per_expert_chains(dtype, tol):
    m = _randomize(MoEFFN(24, 16, 7, 2, gate="sigmoid", dtype=dtype), seed=23)  # 2-byte rows
    x = _x(53, 24, seed=24, dtype=dtype)
    assert m._runs_grouped(x)
    with torch.no_grad():
        got = m(x)
        m.grouped_run_slots = 0
        chains = m(x)
    assert got.dtype == dtype and _rel(got, chains) <= tol


def test_grouped_runs_are_not_used_where_the_kernel_or_autograd_cannot_take_them():
    odd = _randomize(MoEFFN(D, FF, E, 2), seed=25)  # F = 7: 28-byte rows
    assert not odd._runs_grouped(_x(9, D, dtype=torch.float32))
    m = _randomize(MoEFFN(GD, GF, 9, 3, gate="sigmoid"), seed=26)
    assert not m._runs_grouped(_x(9, GD, dtype=torch.float64))  # no float64 CPU kernel
    x = _x(41, GD, seed=27, dtype=torch.float32).requires_grad_(True)
    y = m(x)  # with autograd: the per-expert chains, whose backward is tested below
    y.square().sum().backward()
    ref, _ = _loop_ref(m, x.detach())
    assert _rel(y.detach(), ref) <= 2e-6 and x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- 3. gradients


@pytest.mark.parametrize("gate", GATE_MODES)
def test_gradients_reach_used_experts_and_router(gate):
    m = _randomize(MoEFFN(D, FF, E, 2, shared_dim=3, bias=True, gate=gate), seed=11)
    m.float()
    with torch.no_grad():
        m.expert_bias[E - 1] = -100.0  # expert E-1 never chosen
    x = _x(2, 8, D, seed=12, dtype=torch.float32).requires_grad_()
    r = _x(2, 8, D, seed=13, dtype=torch.float32)
    (m(x) * r).sum().backward()
    load = m.last_load
    assert load[E - 1] == 0 and (load[: E - 1] > 0).sum() >= 2
    for name in ("w_up", "w_gate", "w_down", "b_up", "b_gate"):
        g = getattr(m, name).grad
        for e in range(E):
            if load[e] > 0:
                assert g[e].abs().sum() > 0, (name, e)
            else:
                assert torch.count_nonzero(g[e]) == 0, (name, e)
    rg = m.router.weight.grad
    assert rg is not None and torch.isfinite(rg).all() and rg.abs().sum() > 0
    assert m.shared.up.weight.grad.abs().sum() > 0 and m.b_out.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    assert m.expert_bias.grad is None  # a buffer, never trained by gradients


def test_hard_gate_straight_through_matches_softmax_gradient():
    """Forward weight is 1; the router gradient is that of weighting by p (not renormalised)."""
    hard = _randomize(MoEFFN(D, FF, E, 2, gate="hard"), seed=14).float()
    x = _x(10, D, seed=15, dtype=torch.float32)
    r = _x(10, D, seed=16, dtype=torch.float32)
    (hard(x) * r).sum().backward()
    idx, _, _ = hard._route(x)
    with torch.no_grad():  # every expert on every token, unweighted: (T, E, d)
        ys = torch.stack([hard._expert(p, x, torch.ones(10)) for p in hard._experts()], 1)
    gp = torch.zeros(10, E)  # dL/dp_e for selected e
    gp.scatter_(1, idx, torch.einsum("ted,td->te", ys, r).gather(1, idx))
    logits = F.linear(x, hard.router.weight.detach().clone().requires_grad_())
    logits.retain_grad()
    p = torch.softmax(logits, -1)
    (p * gp).sum().backward()
    assert torch.allclose(hard.router.weight.grad, logits.grad.T @ x, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- 4. aux-loss-free balancing


def test_update_bias_evens_a_skewed_load():
    torch.manual_seed(0)
    m = MoEFFN(32, 8, 8, 2, gate="sigmoid", router_bias=True)
    with torch.no_grad():
        m.router.weight.mul_(0.5)
        m.router.bias.copy_(torch.tensor([3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    g = _gen(17)
    ratios = []
    with torch.no_grad():
        for _ in range(200):
            m(torch.randn(256, 32, generator=g))
            ratios.append(m.load_stats()["max_over_mean"])
            m.update_bias(0.005)
    before, after = ratios[0], sum(ratios[-20:]) / 20
    print(f"\nupdate_bias(0.005), 8 experts top-2, 256 tokens/batch: max/mean load "
          f"{before:.2f} (batch 1) -> {after:.2f} (mean of batches 181-200)")
    assert before > 2.0 and after < 1.5
    assert m.expert_bias[0] < 0 < m.expert_bias[2]


def test_update_bias_needs_a_forward_and_moves_by_sign():
    m = MoEFFN(D, FF, E, 2)
    with pytest.raises(RuntimeError, match="forward"):
        m.update_bias(0.1)
    with pytest.raises(RuntimeError, match="forward"):
        m.load_stats()
    with torch.no_grad():
        m.expert_bias[0] = 50.0
    m(_x(10, D, dtype=torch.float32))  # load: expert 0 gets 10, mean 4
    with pytest.raises(ValueError, match="rate"):
        m.update_bias(-1.0)
    before = m.expert_bias.clone()
    m.update_bias(0.25)
    step = m.expert_bias - before
    expected = 0.25 * torch.sign(m.last_load.mean() - m.last_load)
    assert torch.equal(step, expected) and step[0] == -0.25


# ---------------------------------------------------------------- 5. sequence-wise aux loss


@pytest.mark.parametrize("gate", GATE_MODES)
def test_sequence_aux_loss_matches_reference(gate):
    coef = 0.01
    m = _randomize(MoEFFN(D, FF, E, 2, gate=gate, aux_loss_coef=coef), seed=18).float().train()
    x = _x(3, 6, D, seed=19, dtype=torch.float32)
    m(x)
    loss = m.aux_loss
    assert loss is not None and loss.ndim == 0 and loss.item() > 0
    B, T, K = 3, 6, 2
    ref = 0.0
    for b in range(B):
        logits = m.router.weight.double() @ x[b].double().T  # (E, T)
        s = torch.sigmoid(logits) if gate == "sigmoid" else torch.softmax(logits, 0)
        s = s / s.sum(0, keepdim=True)
        chosen = torch.topk(s if gate != "sigmoid" else torch.sigmoid(logits), K, 0).indices
        f = torch.stack([(chosen == i).sum() for i in range(E)]).double() * E / (K * T)
        ref += (f * s.mean(1)).sum().item()
    ref = coef * ref / B
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert m.router.weight.grad.abs().sum() > 0
    assert m.w_up.grad is None  # the balance loss only trains the router

    m.eval()
    m(x)
    assert m.aux_loss is None
    m0 = MoEFFN(D, FF, E, 2, gate=gate).train()
    m0(x)
    assert m0.aux_loss is None


# ---------------------------------------------------------------- 6. torch.export


class _Tiny(nn.Module):
    def __init__(self, moe: MoEFFN) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.moe = moe
        self.out = nn.Linear(D, 3)

    def forward(self, x):
        return self.out(x + self.moe(self.norm(x)))


@pytest.mark.parametrize("gate", GATE_MODES)
def test_export_dynamic_matches_eager(gate):
    moe = _randomize(MoEFFN(D, FF, E, 2, shared_dim=4, bias=True, gate=gate), seed=20).float()
    model = _Tiny(moe).eval()
    x = _x(2, 7, D, seed=21, dtype=torch.float32)
    ep = torch.export.export(
        model, (x,), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},), strict=False
    )
    assert not ep.graph_signature.buffers_to_mutate  # no last_load writes in the program
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten.topk.default" in targets and "aten.index_add.default" in targets
    assert targets & {"aten.where.default", "aten.nonzero.default"}  # masked dispatch
    prog = ep.module()
    for i, shape in enumerate([(1, 1), (2, 7), (3, 11), (1, 2), (5, 4)]):
        xi = _x(*shape, D, seed=30 + i, dtype=torch.float32)
        with torch.no_grad():
            want = model(xi)
            got = prog(xi)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), shape
        if shape == (1, 1):
            assert (moe.last_load == 0).sum() == E - 2  # a single token: 3 experts empty


# ---------------------------------------------------------------- 7. validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=E + 1), "top_k"),
        (dict(num_experts=0, top_k=1), "num_experts"),
        (dict(expert_dim=0), "expert_dim"),
        (dict(d_model=0), "d_model"),
        (dict(shared_dim=-1), "shared_dim"),
        (dict(activation="swish"), "activation"),
        (dict(gate="noisy"), "gate"),
        (dict(route_scale=0.0), "route_scale"),
        (dict(route_scale=-2.0), "route_scale"),
        (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
        (dict(dtype=torch.int32), "dtype"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    args = dict(d_model=D, expert_dim=FF, num_experts=E, top_k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        MoEFFN(**args)


def test_config_is_frozen_and_shapes_are_named():
    m = MoEFFN(D, FF, E, 2, shared_dim=6, glu=False, bias=True, router_bias=True)
    assert isinstance(m.config, MoEFFNConfig)
    with pytest.raises(AttributeError):
        m.config.top_k = 3
    assert m.w_up.shape == (E, FF, D) and m.w_down.shape == (E, D, FF)
    assert m.w_gate is None and m.b_gate is None and m.b_up.shape == (E, FF)
    assert m.b_out.shape == (D,) and m.router.bias.shape == (E,)
    assert isinstance(m.shared, SharedExpert) and m.shared.gate is None
    assert m.shared.up.bias is not None and m.shared.down.bias is None
    assert "expert_bias" in m.state_dict() and "last_load" not in m.state_dict()
    assert MoEFFN(D, FF, E, 2).shared is None
    with pytest.raises(ValueError, match="d_model"):
        m(torch.ones(3, D + 1))


def test_param_counts():
    m = MoEFFN(D, FF, E, 2, shared_dim=6, bias=True)
    total = sum(p.numel() for p in m.parameters())
    assert m.total_params() == total
    per_expert = 3 * FF * D + 2 * FF
    assert total - m.active_params_per_token() == (E - 2) * per_expert
    r = repr(m)
    assert "num_experts=5" in r and "top_k=2" in r and "gate=hard" in r


# ---------------------------------------------------------------- 8. bf16


def test_bf16_weights_close_to_fp32():
    m32 = _randomize(MoEFFN(D, FF, E, 2, shared_dim=5, bias=True, gate="sigmoid"), seed=22)
    m32.float()
    m16 = MoEFFN(D, FF, E, 2, shared_dim=5, bias=True, gate="sigmoid", dtype=torch.bfloat16)
    m16.load_state_dict(m32.state_dict())
    assert m16.router.weight.dtype == torch.float32 and m16.w_up.dtype == torch.bfloat16
    x = _x(4, 9, D, seed=23, dtype=torch.bfloat16)
    y16 = m16(x)
    assert y16.dtype == torch.bfloat16
    y32 = m32(x.float())
    assert torch.equal(m16.last_load, m32.last_load)  # fp32 routing: same selection
    assert _rel(y16, y32) < 2e-2
    assert m16(x.float()).dtype == torch.float32  # output dtype follows the input


def test_empty_and_unbatched_inputs():
    m = MoEFFN(D, FF, E, 2, shared_dim=3, bias=True, aux_loss_coef=0.1).train()
    y = m(torch.ones(0, D))
    assert y.shape == (0, D) and m.load_stats()["load"].sum() == 0
    assert m.aux_loss.item() == 0.0
    x = _x(D, seed=40, dtype=torch.float32)
    assert torch.allclose(m(x), m(x.unsqueeze(0))[0])


# ---------------------------------------------------------------- issue 12: numeric kinds


def test_activation_table_is_the_pattern_matchers():
    from rewriter.patterns import ACTIVATIONS

    assert dict(MOE_ACTIVATIONS) == {a.name: a.fn for a in ACTIVATIONS}
    m = MoEFFN(d_model=8, expert_dim=4, num_experts=3, top_k=2, activation="quick_gelu")
    assert m.act is MOE_ACTIVATIONS["quick_gelu"]
    import pickle

    back = pickle.loads(pickle.dumps(m))  # the table's lambdas are not stored on the module
    x = torch.randn(5, 8)
    torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)


def _underflow_block(shared_dim: int) -> MoEFFN:
    torch.manual_seed(3)
    d, E = 16, 5
    m = MoEFFN(d_model=d, expert_dim=8, num_experts=E, top_k=2, shared_dim=shared_dim,
               gate="sigmoid")
    with torch.no_grad():
        m.router.weight.copy_(-torch.ones(E, d) + 0.01 * torch.randn(E, d))
    return m


@pytest.mark.parametrize("biased", [False, True])
def test_sigmoid_renormalisation_survives_underflowed_scores(biased):
    """sglang#31017: every selected sigmoid score underflows to 0 -> 0/0. With the 1e-20
    epsilon the token's routed part is exactly 0 and the shared experts still apply; the other
    tokens equal the float64 token loop; eager, exported and gradients are all finite."""
    m = _underflow_block(shared_dim=8)
    if biased:  # balancing pushed two experts up: their biased scores win, sigmoid still 0
        with torch.no_grad():
            m.expert_bias.copy_(torch.tensor([0.0, 5.0, 0.0, 5.0, 0.0]))
    x = torch.randn(3, 16) * 0.1
    x[0] = 7.0  # logits ~ -112: sigmoid underflows to 0 in fp32
    with torch.no_grad():
        assert (torch.sigmoid(m.router(x[:1])) == 0).all()
        y = m(x)
        idx, w, scores = m._route(x)
    assert torch.isfinite(y).all() and torch.equal(w[0], torch.zeros(2))
    assert torch.isfinite(scores).all()
    if biased:
        assert sorted(idx[0].tolist()) == [1, 3]
    torch.testing.assert_close(y[0].double(), _shared_ref(m, x[0].double()), rtol=1e-5,
                               atol=1e-6)
    ref, _ = _loop_ref(m, x[1:])
    assert _rel(y[1:], ref) < 1e-6
    ep = torch.export.export(m, (x,), strict=False)
    torch.testing.assert_close(ep.module()(x), y, rtol=1e-6, atol=1e-7)
    xt = x.clone().requires_grad_(True)
    m.train()
    m(xt).sum().backward()
    assert torch.isfinite(m.router.weight.grad).all() and torch.isfinite(xt.grad).all()
    assert m.router.weight.grad.abs().sum() > 0  # tokens 1, 2 still train the router


def _tie_reference(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Per row: the k indices of the largest scores, ties by lowest index (ONNX TopK)."""
    return [sorted(sorted(range(len(r)), key=lambda e: (-r[e], e))[:k]) for r in scores.tolist()]


def test_select_topk_lowest_index_wins_ties():
    from rewriter.models.moe import select_topk, selection_order

    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 4, (200, 13), generator=g).float() / 4  # many exact ties
    s[0] = 0.5  # a whole row tied
    s[1, 3] = float("inf")
    for k in (1, 2, 5, 13):
        got = select_topk(s, k)
        assert [sorted(r) for r in got.tolist()] == _tie_reference(s, k)
        assert [sorted(r) for r in selection_order(s)[:, :k].tolist()] == _tie_reference(s, k)
    assert select_topk(s[:0], 3).shape == (0, 3)


@pytest.mark.parametrize("gate", GATE_MODES)
@pytest.mark.parametrize("bias_tie", [False, True])
def test_routing_ties_are_the_same_in_eager_export_and_selection_order(gate, bias_tie):
    """vllm#54403: exactly tied scores (a zero router, or bias-corrected scores that tie):
    eager routing, selection_order and the exported program all pick the lowest indices."""
    m = MoEFFN(d_model=12, expert_dim=8, num_experts=6, top_k=2, gate=gate).eval()
    with torch.no_grad():
        m.router.weight.zero_()  # every score equal
        if bias_tie:  # biased scores tie among 1, 3, 4; expert 5 is out
            m.expert_bias.copy_(torch.tensor([0.0, 0.25, -0.5, 0.25, 0.25, -1.0]))
    x = torch.randn(2, 7, 12)
    want = [1, 3] if bias_tie else [0, 1]
    with torch.no_grad():
        idx, w, _ = m._route(x.reshape(-1, 12))
        y = m(x)
        fixed = m._dispatch_sorted(x.reshape(-1, 12), torch.tensor([want] * 14), w)[0]
    assert all(sorted(r) == want for r in idx.tolist())
    assert all(r == want for r in m.selection_order(x)[:, :2].tolist())
    torch.testing.assert_close(y.reshape(-1, 12), fixed, rtol=0, atol=0)
    ep = torch.export.export(m, (x,), strict=False)
    torch.testing.assert_close(ep.module()(x), y, rtol=1e-6, atol=1e-7)


def test_router_and_expert_bias_stay_float32_under_dtype_casts():
    """vllm#23640 / sglang#31213: .to(bf16) of a converted model must not round the router or
    the balancing bias; they still move between devices; balancing still moves at 1e-3."""
    torch.manual_seed(0)
    m = MoEFFN(d_model=16, expert_dim=8, num_experts=4, top_k=2, shared_dim=8, gate="sigmoid")
    with torch.no_grad():
        m.expert_bias.copy_(torch.tensor([2.0, 2.0001, -1.0, 1e-3]))
    router, bias = m.router.weight.detach().clone(), m.expert_bias.clone()
    model = nn.Sequential(nn.Linear(16, 16), m)
    for cast in (lambda t: t.to(torch.bfloat16), lambda t: t.half(), lambda t: t.bfloat16(),
                 lambda t: t.double(), lambda t: t.float()):
        cast(model)
        assert m.router.weight.dtype == torch.float32 and m.expert_bias.dtype == torch.float32
        assert m.last_load.dtype == torch.float32  # counts > 256 are not bf16 integers
        assert torch.equal(m.router.weight, router) and torch.equal(m.expert_bias, bias)
    model.to(torch.bfloat16)
    assert m.w_up.dtype == torch.bfloat16 and m.shared.up.weight.dtype == torch.bfloat16
    assert m.compute_dtype == torch.bfloat16 and model[0].weight.dtype == torch.bfloat16
    fresh = MoEFFN(d_model=16, expert_dim=8, num_experts=4, top_k=2, shared_dim=8)
    assert list(m.state_dict()) == list(fresh.state_dict())  # key order kept
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    before = m.expert_bias.clone()
    for _ in range(5):
        m.update_bias(1e-3)
    assert ((m.expert_bias - before).abs().max() - 5e-3).abs() < 1e-6
    meta = m.to(device="meta", dtype=torch.float16)  # moves, still float32
    assert meta.router.weight.device.type == "meta" and meta.expert_bias.device.type == "meta"
    assert meta.router.weight.dtype == torch.float32 and meta.w_up.dtype == torch.float16
