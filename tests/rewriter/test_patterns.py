import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rewriter import (
    CAPTURED_ACTIVATION,
    MoEConfig,
    NoFFNError,
    analyze_ffns,
    capture,
    convert,
    find_ffns,
    require_ffns,
)
from rewriter.projections import find_projections
from tests._zoo import case_ids, ffn_weight_names


@pytest.mark.parametrize("name", case_ids())
def test_one_ffn_per_layer_with_kind_activation_and_sizes(captured, name):
    case, model, gm = captured(name)
    layers, d_model, d_ff = case.expected_sizes(model)
    ffns = find_ffns(gm)
    assert len(ffns) == layers
    for f in ffns:
        assert (f.kind, f.activation, f.has_bias, f.layout) == (
            case.kind, case.activation, case.bias, case.layout)
        assert (f.d_model, f.d_ff) == (d_model, d_ff)
        for ref in f.weights.values():  # references to the model's own parameters
            assert model.get_parameter(ref.fqn) is ref.param


@pytest.mark.parametrize("name", case_ids())
def test_exactly_the_ffn_weights_match_never_attention(captured, name):
    case, model, gm = captured(name)
    matched = {ref.fqn for f in find_ffns(gm) for role, ref in f.weights.items()
               if role.endswith("weight")}
    assert matched == ffn_weight_names(case, model)
    assert not any(k in w for w in matched for k in ("attn", "attention", ".wq", ".wk", ".wv"))


@pytest.mark.parametrize("name", case_ids())
def test_params_and_flops_are_counted_from_the_weights(captured, name):
    case, model, gm = captured(name)
    _, d, d_ff = case.expected_sizes(model)
    n_mats = 3 if case.kind.startswith("glu") else 2
    for f in find_ffns(gm):
        bias = sum(p.numel() for n, p in model.named_parameters()
                   if n.endswith("bias") and n.rpartition(".")[0] in
                   {p.module for p in f.projections.values()})
        assert f.params == n_mats * d * d_ff + bias
        assert f.flops_per_token == 2 * n_mats * d * d_ff


def test_attention_projections_are_rejected_with_reasons(captured):
    _, _, gm = captured("hf:llama")
    rej = {r.module: r.reason for r in analyze_ffns(gm).rejections}
    assert "model.layers.0.self_attn.o_proj" in rej
    assert "not computed from another projection" in rej["model.layers.0.self_attn.o_proj"]
    assert all(("self_attn" in m) or m == "lm_head" for m in rej)


# ----------------------------------------------------------------------------- hand-made blocks


def _erf_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _tanh_gelu(x):  # GPT-2's NewGELUActivation, written out
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))


ACTS = {
    "relu": (F.relu, "relu"),
    "gelu": (F.gelu, "gelu"),
    "gelu_erf_written_out": (_erf_gelu, "gelu"),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
    "gelu_tanh_written_out": (_tanh_gelu, "gelu_tanh"),
    "silu": (F.silu, "silu"),
    "silu_written_out": (lambda x: x * torch.sigmoid(x), "silu"),
}


class Residual(nn.Module):
    """x -> x + block(norm(x)) for a few layers; the block is built by ``make``."""

    def __init__(self, make, d, layers=2):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.blocks = nn.ModuleList(make() for _ in range(layers))

    def forward(self, x):
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return x


class MLP(nn.Module):
    def __init__(self, d, d_ff, act, bias=True):
        super().__init__()
        self.up, self.down, self.act = nn.Linear(d, d_ff, bias), nn.Linear(d_ff, d, bias), act

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class GLU(nn.Module):
    def __init__(self, d, d_ff, act, bias=False):
        super().__init__()
        self.gate, self.up = nn.Linear(d, d_ff, bias), nn.Linear(d, d_ff, bias)
        self.down, self.act = nn.Linear(d_ff, d, bias), act

    def forward(self, x):
        return self.down(self.up(x) * self.act(self.gate(x)))  # operands swapped on purpose


class FusedGLU(nn.Module):
    def __init__(self, d, d_ff, act, up_first=False):
        super().__init__()
        self.gate_up, self.down = nn.Linear(d, 2 * d_ff, False), nn.Linear(d_ff, d, False)
        self.act, self.up_first = act, up_first

    def forward(self, x):
        a, b = self.gate_up(x).chunk(2, dim=-1)
        gate, up = (b, a) if self.up_first else (a, b)
        return self.down(up * self.act(gate))


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight (in, out), addmm on the flattened input."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.1)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.weight.shape[1],))


class ConvMLP(nn.Module):
    def __init__(self, d, d_ff, act):
        super().__init__()
        self.c_fc, self.c_proj, self.act = Conv1D(d, d_ff), Conv1D(d_ff, d), act

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


def _found(model, d, shape=(2, 5)):
    model = model.eval()
    gm = capture(model, (torch.randn(*shape, d),))
    return gm, analyze_ffns(gm)


@pytest.mark.parametrize("act_name", list(ACTS))
@pytest.mark.parametrize("block", ["mlp", "mlp_nobias", "glu", "fused", "fused_up_first",
                                   "conv1d"])
def test_every_block_form_and_activation_form(act_name, block):
    fn, expected = ACTS[act_name]
    d, d_ff = 20, 46
    make = {
        "mlp": lambda: MLP(d, d_ff, fn),
        "mlp_nobias": lambda: MLP(d, d_ff, fn, bias=False),
        "glu": lambda: GLU(d, d_ff, fn, bias=True),
        "fused": lambda: FusedGLU(d, d_ff, fn),
        "fused_up_first": lambda: FusedGLU(d, d_ff, fn, up_first=True),
        "conv1d": lambda: ConvMLP(d, d_ff, fn),
    }[block]
    gm, analysis = _found(Residual(make, d), d)
    assert len(analysis.matches) == 2, [r.describe() for r in analysis.rejections]
    for i, m in enumerate(analysis.matches):
        assert m.module == f"blocks.{i}"
        assert m.activation == expected
        assert (m.d_model, m.d_ff) == (d, d_ff)
        kind = {"glu": "glu", "fused": "glu_fused", "fused_up_first": "glu_fused"}.get(block, "mlp")
        assert m.kind == kind
        assert m.has_bias == (block in ("mlp", "glu", "conv1d"))
        assert m.layout == ("conv1d" if block == "conv1d" else "linear")
        if block == "glu":
            assert m.projections["gate"].weight.fqn == f"blocks.{i}.gate.weight"
            assert m.projections["up"].weight.fqn == f"blocks.{i}.up.weight"
        if block.startswith("fused"):
            assert m.rule == ("glu_fused_up_first" if block == "fused_up_first"
                              else "glu_fused_gate_first")


class LeakyIntermediate(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.up, self.down = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):
        h = F.gelu(self.up(x))
        return self.down(h) + h.mean(-1, keepdim=True)  # h leaves the block


class TinyAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 4.0, dim=-1)
        return self.o(att @ self.v(x))


class TanhHead(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.up, self.down = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


class PerUnitScaleHead(nn.Module):
    """tanh with one learned scale per hidden unit: not one function of every unit alike."""

    def __init__(self, d, d_ff):
        super().__init__()
        self.up, self.down = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, d_ff))

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)) * self.scale)


class SubNormFFN(nn.Module):
    """BitNet / Dory form: the hidden is RMS-normalised across its units before down."""

    def __init__(self, d, d_ff):
        super().__init__()
        self.gate, self.up, self.down = (nn.Linear(d, d_ff), nn.Linear(d, d_ff),
                                         nn.Linear(d_ff, d))

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x)
        return self.down(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


class Bottleneck(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.up, self.down = nn.Linear(d, d_ff), nn.Linear(d_ff, 3)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


class MaskedMLP(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.up, self.down = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
        self.register_buffer("mask", (torch.arange(d_ff) % 3 != 0).float())

    def forward(self, x):
        return self.down(F.relu(self.up(x)) * x.sum(-1, keepdim=True))


@pytest.mark.parametrize(
    "module, reason",
    [
        (LeakyIntermediate(12, 30), r"intermediate '.*' is also used by '.*' outside the block"),
        (TinyAttention(12), r"not computed from another projection .*(matmul|bmm)"),
        (PerUnitScaleHead(12, 30), r"matches no rule .* known activation .* alike"),
        (SubNormFFN(12, 30), r"hidden units are not independent: aten\.mean"),
        (Bottleneck(12, 30), r"output width 3 != input width 12"),
        (MaskedMLP(12, 30), r"reads tensor '.*' .* that is not a projection output"),
    ],
)
def test_near_misses_are_rejected_with_their_reason(module, reason):
    gm, analysis = _found(module, 12)
    assert analysis.matches == ()
    reasons = [r.reason for r in analysis.rejections]
    assert any(__import__("re").search(reason, r) for r in reasons), reasons


def test_require_ffns_raises_with_near_misses():
    gm, _ = _found(LeakyIntermediate(12, 30), 12)
    with pytest.raises(NoFFNError, match="also used by"):
        require_ffns(gm)
    gm, _ = _found(nn.LayerNorm(12), 12)
    with pytest.raises(NoFFNError, match="no linear layers"):
        require_ffns(gm)


def test_fx_symbolic_trace_graphs_match_too():
    model = Residual(lambda: GLU(16, 40, F.silu), 16, layers=3).eval()
    gm = torch.fx.symbolic_trace(model)
    ffns = find_ffns(gm)
    assert [(f.module, f.kind, f.activation) for f in ffns] == [
        (f"blocks.{i}", "glu", "silu") for i in range(3)]


@settings(max_examples=12, deadline=None)
@given(
    d=st.integers(3, 40),
    d_ff=st.integers(2, 90),
    act=st.sampled_from(sorted(ACTS)),
    glu=st.booleans(),
    bias=st.booleans(),
    batch=st.integers(1, 3),
)
def test_property_random_ffn_shapes(d, d_ff, act, glu, bias, batch):
    fn, expected = ACTS[act]
    make = (lambda: GLU(d, d_ff, fn, bias)) if glu else (lambda: MLP(d, d_ff, fn, bias))
    torch.manual_seed(d * 1000 + d_ff)
    gm, analysis = _found(Residual(make, d, layers=1), d, shape=(batch, 3))
    assert len(analysis.matches) == 1
    m = analysis.matches[0]
    assert (m.kind, m.activation, m.d_model, m.d_ff, m.has_bias) == (
        "glu" if glu else "mlp", expected, d, d_ff, bias)


# ----------------------------------------------------------------------------- matmul spellings


class Spelled(nn.Module):
    """One FFN whose up and down projections are spelled ``up`` / ``down`` (functions of x
    and a parameter), plus attention written with matmuls of activations."""

    SPELLINGS = {
        # name: (fn(x, W) with W stored as (out, in), weight stored transposed?)
        "x @ W.T": (lambda x, w: x @ w.T, False),
        "matmul(x, W.t())": (lambda x, w: torch.matmul(x, w.t()), False),
        "matmul(x, W.transpose(-1, -2))": (lambda x, w: torch.matmul(x, w.transpose(-1, -2)),
                                          False),
        "x @ W (in, out)": (lambda x, w: x @ w, True),
        "x @ W.T.T (in, out)": (lambda x, w: x @ w.T.T, True),
        "einsum W (out, in)": (lambda x, w: torch.einsum("btd,fd->btf", x, w), False),
        "einsum W first": (lambda x, w: torch.einsum("fd,btd->btf", w, x), False),
        "einsum W (in, out)": (lambda x, w: torch.einsum("...d,df->...f", x, w), True),
        "bmm broadcast W.T": (lambda x, w: torch.bmm(
            x, w.t().unsqueeze(0).expand(x.shape[0], -1, -1)), False),
        "mm of flattened x": (lambda x, w: torch.mm(x.reshape(-1, x.shape[-1]), w.t()).view(
            *x.shape[:-1], w.shape[0]), False),
        "F.linear of W.T.T": (lambda x, w: F.linear(x, w.T.T), False),
        "F.linear of flattened x": (lambda x, w: F.linear(x.reshape(-1, x.shape[-1]), w).view(
            *x.shape[:-1], w.shape[0]), False),
        "permute(1, 0)": (lambda x, w: x @ w.permute(1, 0), False),
    }

    def __init__(self, spelling, d=20, f=36, bias=True):
        super().__init__()
        self.fn, transposed = self.SPELLINGS[spelling]
        shape_up, shape_down = ((d, f), (f, d)) if transposed else ((f, d), (d, f))
        self.w_up = nn.Parameter(torch.randn(*shape_up) / 4)
        self.w_down = nn.Parameter(torch.randn(*shape_down) / 6)
        self.b_up = nn.Parameter(torch.randn(f) / 3) if bias else None
        self.b_down = nn.Parameter(torch.randn(d) / 3) if bias else None
        self.wq = nn.Parameter(torch.randn(d, d) / 4)

    def forward(self, x):
        q = x @ self.wq.T
        att = torch.softmax(q @ x.transpose(-1, -2) / 4.0, -1) @ x  # activations only
        h = self.fn(x + att, self.w_up)
        h = F.gelu(h + self.b_up if self.b_up is not None else h)
        y = self.fn(h, self.w_down)
        return x + (y + self.b_down if self.b_down is not None else y)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("spelling", list(Spelled.SPELLINGS))
def test_projections_are_found_by_what_they_compute(spelling, bias):
    torch.manual_seed(5)
    model = Spelled(spelling, bias=bias).eval()
    x = torch.randn(3, 7, 20)
    gm = capture(model, (x,))
    projections = find_projections(gm)
    assert sorted(p.weight.fqn for p in projections) == ["w_down", "w_up", "wq"]
    layout = "conv1d" if Spelled.SPELLINGS[spelling][1] else "linear"
    assert {p.layout for p in projections if p.weight.fqn != "wq"} == {layout}
    ffns = find_ffns(gm)
    assert [(f.kind, f.activation, f.d_model, f.d_ff, f.has_bias) for f in ffns] == [
        ("mlp", "gelu", 20, 36, bias)]
    assert ffns[0].weights["up.weight"].fqn == "w_up"
    if bias:
        assert ffns[0].weights["down.bias"].fqn == "b_down"


@pytest.mark.parametrize("spelling", ["x @ W.T", "einsum W (in, out)", "bmm broadcast W.T"])
@pytest.mark.parametrize("mode", ["module", "graph"])
def test_matmul_spelled_ffn_converts_exactly(spelling, mode):
    torch.manual_seed(6)
    model = Spelled(spelling).double().eval()
    _assert_all_experts_exact(model, torch.randn(2, 5, 20, dtype=torch.float64),
                              torch.randn(3, 11, 20, dtype=torch.float64), 3, mode)


def _assert_all_experts_exact(model, x, y, experts: int, mode: str) -> None:
    """Converted on ``x`` with every expert active and hard gates, ``model`` computes the same
    on the fresh ``y`` to float64 precision."""
    out = convert(model, moe=MoEConfig(num_experts=experts, top_k=experts, gate="hard"),
                  example_inputs=(x,), mode=mode)
    with torch.no_grad():
        ref, got = model(y), out(y)
    assert float((got - ref).norm() / ref.norm()) <= 1e-12


def test_a_permute_that_is_not_a_transpose_is_no_projection():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 5, 6))

        def forward(self, x):  # (B, 6, 5) @ W.permute(0, 2, 1) -> batched, 3-D weight
            return torch.relu(x @ self.w.permute(0, 2, 1))

    gm = capture(Odd(), (torch.randn(4, 3, 6),))
    assert find_projections(gm) == []


class XIELULike(nn.Module):
    """An activation no rule names, with learned scalar parameters (Apertus' xIELU form)."""

    def __init__(self):
        super().__init__()
        self.alpha_p = nn.Parameter(torch.tensor(0.7))
        self.alpha_n = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        ap, an = F.softplus(self.alpha_p), 0.5 + F.softplus(self.alpha_n)
        return torch.where(x > 0, ap * x * x + 0.5 * x,
                           (torch.expm1(torch.clamp(x, max=0.0)) - x) * an + 0.5 * x)


class UnnamedGLU(nn.Module):
    def __init__(self, d, d_ff, up_first):
        super().__init__()
        self.gate, self.up, self.down = (nn.Linear(d, d_ff), nn.Linear(d, d_ff),
                                         nn.Linear(d_ff, d))
        self.up_first = up_first

    def forward(self, x):
        g = torch.tanh(self.gate(x)) * 1.5
        return self.down(self.up(x) * g if self.up_first else g * self.up(x))


class ActMLP(nn.Module):
    def __init__(self, d, d_ff, act):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, d_ff), act, nn.Linear(d_ff, d)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("make, kind", [
    (lambda: ActMLP(12, 30, nn.Tanh()), "mlp"),
    (lambda: ActMLP(12, 30, nn.Mish()), "mlp"),
    (lambda: ActMLP(12, 30, XIELULike()), "mlp"),
    (lambda: UnnamedGLU(12, 30, up_first=False), "glu"),
    (lambda: UnnamedGLU(12, 30, up_first=True), "glu"),
], ids=["tanh", "mish", "xielu", "glu_gate_first", "glu_up_first"])
def test_an_unnamed_per_unit_activation_is_captured_and_splits_exactly(make, kind):
    torch.manual_seed(3)
    model = make().eval()
    x = torch.randn(3, 7, 12)
    gm, analysis = _found(model, 12, shape=(3, 7))
    (match,) = analysis.matches
    assert (match.kind, match.activation, match.d_ff) == (kind, CAPTURED_ACTIVATION, 30)
    with torch.no_grad():  # the captured activation is the block's own: same hidden values
        up = match.projections["gate" if kind == "glu" else "up"]
        w = model.get_parameter(up.weight.fqn)
        b = model.get_parameter(up.bias.fqn)
        pre = F.linear(x, w, b)
        want = (torch.tanh(pre) * 1.5 if kind == "glu" else model.act(pre))
        torch.testing.assert_close(match.activation_fn(pre), want, rtol=0, atol=0)
    # split into 5 experts of 6 units, every expert on: the dense function (module mode)
    moe = convert(model, moe=MoEConfig(num_experts=5, top_k=5, gate="hard"),
                           example_inputs=(x,))
    with torch.no_grad():
        fresh = torch.randn(2, 11, 12)
        torch.testing.assert_close(moe(fresh), model(fresh), rtol=1e-5, atol=1e-6)
    block = next(m for m in moe.modules() if type(m).__name__ == "MoEFFN")
    assert block.config.activation == CAPTURED_ACTIVATION
    learned = dict(block.named_parameters())
    if isinstance(getattr(model, "act", None), XIELULike):  # its scalars stay trainable,
        assert sum(n.startswith("activation_fn.") for n in learned) == 2  # and are the MoE's
        source = {id(p) for p in model.parameters()}
        assert not any(id(p) in source for p in block.activation_fn.parameters())


def test_forms_are_found_with_their_kind_and_activation():
    """Every hand-written FFN form of the zoo: the matcher finds each FFN with its kind."""
    from tests._zoo import FORMS, form_inputs
    for form in FORMS:
        model = form.build().eval()
        gm = capture(model, (form_inputs(form, 2, 5),))
        assert tuple((m.kind, m.activation) for m in find_ffns(gm)) == form.kinds, form.name


class _FlatHidden(nn.Module):
    """A reshape between the activation and down: the hidden flattened to tokens and put back
    after down (``down(act(up(x)).reshape(-1, f)).view(B, T, d)``), or reshaped to the shape it
    already has (``.reshape(*x.shape[:-1], down.weight.shape[1])``)."""

    def __init__(self, same_shape: bool, d=20, f=44):
        super().__init__()
        self.same_shape = same_shape
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        b, t, d = x.shape
        h = F.silu(self.up(self.norm(x)))
        if self.same_shape:
            return x + self.down(h.reshape(*x.shape[:-1], self.down.weight.shape[1]))
        return x + self.down(h.reshape(-1, self.up.out_features)).view(b, t, d)


@pytest.mark.parametrize("same_shape", [False, True], ids=["flattened", "same-shape"])
@pytest.mark.parametrize("mode", ["module", "graph"])
def test_a_reshape_between_activation_and_down_still_makes_an_ffn(mode, same_shape):
    torch.manual_seed(12)
    model = nn.Sequential(_FlatHidden(same_shape), _FlatHidden(same_shape)).double().eval()
    x = torch.randn(2, 7, 20, dtype=torch.float64)
    ffns = find_ffns(capture(model, (x,)))
    assert [(f.module, f.kind, f.activation, f.d_ff) for f in ffns] == [
        ("0", "mlp", "silu", 44), ("1", "mlp", "silu", 44)]
    _assert_all_experts_exact(model, x, torch.randn(3, 5, 20, dtype=torch.float64), 4, mode)


# ----------------------------------------------------------------------------- fused gate_up


class FusedSpelled(nn.Module):
    """A fused gate_up cut in two along the last dim, the dim written as ``dim``; the input has
    rank ``rank`` (2: no batch dim)."""

    def __init__(self, spelling, dim, d=13, f=30, up_first=False, bias=True):
        super().__init__()
        self.gate_up, self.down = nn.Linear(d, 2 * f, bias), nn.Linear(f, d, bias)
        self.spelling, self.dim, self.f, self.up_first = spelling, dim, f, up_first

    def forward(self, x):
        h, f, dim = self.gate_up(x), self.f, self.dim
        if self.spelling == "chunk":
            a, b = h.chunk(2, dim=dim)
        elif self.spelling == "torch.chunk":
            a, b = torch.chunk(h, 2, dim)
        elif self.spelling == "split":
            a, b = torch.split(h, f, dim)
        elif self.spelling == "split_sizes":
            a, b = h.split([f, f], dim=dim)
        elif self.spelling == "narrow":
            a, b = h.narrow(dim, 0, f), h.narrow(dim, f, f)
        else:  # "index": h[:, :, :f] with every leading dim written out
            lead = (slice(None),) * (h.dim() - 1)
            a, b = h[(*lead, slice(0, f))], h[(*lead, slice(f, 2 * f))]
        gate, up = (b, a) if self.up_first else (a, b)
        return x + self.down(F.silu(gate) * up)


_FUSED_SPELLINGS = ["chunk", "torch.chunk", "split", "split_sizes", "narrow", "index"]


@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("spelling", _FUSED_SPELLINGS)
def test_a_fused_split_on_the_last_dim_is_found_whatever_its_sign(spelling, rank):
    """dim=rank-1 is dim=-1: the cut is read from what it computes at the recorded rank."""
    shapes = {2: (7,), 3: (2, 5), 4: (2, 3, 5)}
    for dim, up_first in ((rank - 1, False), (-1, False), (rank - 1, True)):
        model = FusedSpelled(spelling, dim, up_first=up_first).eval()
        gm, analysis = _found(model, 13, shape=shapes[rank])
        assert [(m.kind, m.activation, m.d_ff) for m in analysis.matches] == [
            ("glu_fused", "silu", 30)], [r.describe() for r in analysis.rejections]
        assert analysis.matches[0].rule == (
            "glu_fused_up_first" if up_first else "glu_fused_gate_first")


@pytest.mark.parametrize("spelling, rank", [("chunk", 3), ("narrow", 2), ("index", 4)])
@pytest.mark.parametrize("mode", ["module", "graph"])
def test_a_positive_dim_fused_split_converts_exactly(spelling, rank, mode):
    torch.manual_seed(21)
    model = FusedSpelled(spelling, rank - 1, up_first=spelling == "narrow").double().eval()
    lead = {2: (7,), 3: (2, 5), 4: (2, 3, 5)}[rank]
    fresh = {2: (11,), 3: (3, 4), 4: (3, 3, 5)}[rank]  # graph mode: 4-D captures fix dim 2
    _assert_all_experts_exact(model, torch.randn(*lead, 13, dtype=torch.float64),
                              torch.randn(*fresh, 13, dtype=torch.float64), 5, mode)


class TokenSplit(nn.Module):
    """Cuts the projection's output along a token dim (written as a positive dim): the units
    of one token meet those of another, no FFN."""

    def __init__(self, dim, d=12, f=30):
        super().__init__()
        self.up, self.down, self.dim = nn.Linear(d, f), nn.Linear(f, d), dim

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=self.dim)
        return self.down(F.silu(a) * b)


@pytest.mark.parametrize("dim", [0, 1])
def test_a_split_along_a_token_dim_is_rejected_with_the_reason(dim):
    gm, analysis = _found(TokenSplit(dim), 12, shape=(2, 6))
    assert analysis.matches == ()
    reasons = [r.reason for r in analysis.rejections]
    assert any("along a dim other than the last" in r for r in reasons), reasons


class FusedAct(nn.Module):
    """A fused gate_up GLU with any activation, spelled as a chunk, F.glu or nn.GLU."""

    def __init__(self, act, spelling="chunk", d=13, f=30, bias=True):
        super().__init__()
        self.wi, self.wo = nn.Linear(d, 2 * f, bias), nn.Linear(f, d, bias)
        self.act, self.spelling = act, spelling
        self.glu = nn.GLU(dim=2)  # dim=2 of a (B, T, 2F) input is its last

    def forward(self, x):
        h = self.wi(x)
        if self.spelling == "F.glu":
            return self.wo(F.glu(h, dim=-1))
        if self.spelling == "nn.GLU":
            return self.wo(self.glu(h))
        if self.spelling == "interleaved":  # gpt-oss: gate = h[..., ::2], up = h[..., 1::2]
            return self.wo(self.act(h[..., ::2]) * h[..., 1::2])
        if self.spelling == "interleaved_up_first":
            return self.wo(h[..., ::2] * self.act(h[..., 1::2]))
        a, b = h.chunk(2, -1)
        return self.wo(self.act(a) * b)


class SeparateAct(nn.Module):
    def __init__(self, act, d=13, f=30):
        super().__init__()
        self.g, self.u, self.wo = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d)
        self.act = act

    def forward(self, x):
        return self.wo(self.act(self.g(x)) * self.u(x))


_FUSED_ACTS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "mish": F.mish, "silu": F.silu,
               "scaled_tanh": lambda t: 1.5 * torch.tanh(t) + 0.25}


@pytest.mark.parametrize("act", list(_FUSED_ACTS))
def test_a_fused_gate_up_takes_every_activation_the_separate_form_takes(act):
    """Fused or separate, one activation is read the same way (named, or captured)."""
    fn = _FUSED_ACTS[act]
    ((separate,),) = [_found(SeparateAct(fn), 13)[1].matches]
    _, analysis = _found(nn.Sequential(nn.Linear(13, 13), FusedAct(fn)), 13)
    assert [(m.kind, m.activation, m.rule) for m in analysis.matches] == [
        ("glu_fused", separate.activation, "glu_fused_gate_first")], [
        r.describe() for r in analysis.rejections]
    # wi is claimed by the block, not rejected as a "linear -> linear"; only the input layer is
    assert [r.module for r in analysis.rejections] == ["0"]


@pytest.mark.parametrize("spelling, rule", [
    ("F.glu", "glu_fused_up_first"), ("nn.GLU", "glu_fused_up_first"),
    ("interleaved", "glu_fused_interleaved"),
    ("interleaved_up_first", "glu_fused_interleaved_up_first"),
])
def test_glu_and_interleaved_fused_spellings_are_found(spelling, rule):
    """F.glu(h) = first half * sigmoid(second half): the second half is the gate."""
    _, analysis = _found(FusedAct(torch.tanh, spelling), 13)
    (m,) = analysis.matches
    assert (m.kind, m.rule, m.activation, m.d_ff) == ("glu_fused", rule, CAPTURED_ACTIVATION, 30)
    gate, up = m.fused_rows
    want = {"glu_fused_up_first": (range(30, 60), range(30)),
            "glu_fused_interleaved": (range(0, 60, 2), range(1, 60, 2)),
            "glu_fused_interleaved_up_first": (range(1, 60, 2), range(0, 60, 2))}[rule]
    assert (gate, up) == tuple(tuple(r) for r in want)
    with torch.no_grad():  # the captured activation of the gate: sigmoid for a glu
        z = torch.randn(4, 30)
        ref = torch.sigmoid(z) if "GLU" in spelling or spelling == "F.glu" else torch.tanh(z)
        torch.testing.assert_close(m.activation_fn(z), ref, rtol=0, atol=0)


@pytest.mark.parametrize("act, spelling", [
    ("sigmoid", "chunk"), ("tanh", "chunk"), ("mish", "chunk"), ("scaled_tanh", "chunk"),
    ("silu", "F.glu"), ("silu", "nn.GLU"), ("silu", "interleaved"),
    ("mish", "interleaved_up_first"),
])
@pytest.mark.parametrize("mode", ["module", "graph"])
def test_a_fused_gate_up_with_any_activation_converts_exactly(act, spelling, mode):
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(13, 13), FusedAct(_FUSED_ACTS[act], spelling))
    model = model.double().eval()
    _assert_all_experts_exact(model, torch.randn(2, 5, 13, dtype=torch.float64),
                              torch.randn(3, 7, 13, dtype=torch.float64), 5, mode)


@pytest.mark.parametrize("spelling", ["chunk", "F.glu", "interleaved"])
def test_a_fused_gate_up_converts_exactly_in_float32(spelling):
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(13, 13), FusedAct(F.mish, spelling)).eval()
    out = convert(model, moe=MoEConfig(num_experts=6, top_k=6, gate="hard"),
                  example_inputs=(torch.randn(2, 5, 13),))
    with torch.no_grad():
        y = torch.randn(3, 7, 13)
        ref, got = model(y), out(y)
    assert float((got - ref).norm() / ref.norm()) <= 1e-6
