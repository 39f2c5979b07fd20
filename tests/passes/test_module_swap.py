import copy
import pickle

import pytest
import torch
import transformers
from rewriter.models.moe import MoEFFN
from rewriter.passes.module_swap import InlineRewrite, plan_module_swap, plan_module_swaps
from rewriter.targets.fp8_linear import FP8MoEFFN
from torch import nn

from rewriter import FP8Config, InputError, MoEConfig, capture, convert, find_ffns, inspect
from tests._zoo import CASES, FORMS, form_inputs

BY_NAME = {c.name: c for c in CASES}
FORM = {f.name: f for f in FORMS}


@pytest.mark.parametrize("name, block, identity", [
    ("hf:llama", "model.layers.0.mlp", None),
    ("hf:gpt2", "transformer.h.0.mlp", None),  # the mlp's eval dropout is an identity
    ("hf:bert", "encoder.layer.0.intermediate", "encoder.layer.0.output.dense"),
    ("llama-tiny", "layers.0.feed_forward", None),
])
def test_swap_plans(captured, name, block, identity):
    _, _, gm = captured(name)
    swap = plan_module_swap(gm, find_ffns(gm)[0])
    assert (swap.block, swap.identity) == (block, identity)


def test_first_module_called_is_swapped_whole():
    """torch.export's _guards_fn node carries the stack of the first module the model calls;
    it computes nothing, so the FFN module still computes exactly the block."""
    form = FORM["first-called"]
    model = form.build().eval()
    gm = capture(model, (form_inputs(form, 2, 5),))
    assert any(n.target == "_guards_fn" for n in gm.graph.nodes if n.op == "call_module")
    swap = plan_module_swap(gm, find_ffns(gm)[0])
    assert (swap.block, swap.identity) == ("mlp", None)


@pytest.mark.parametrize("name, owners", [
    ("inline", {"layers.0", "layers.1"}),
    ("dtype-branch", {"layers.0", "layers.1"}),
    ("raw-params", {"layers.0", "layers.1"}),
    ("two-branches", {"0", "1"}),
    ("whole-forward", {""}),
    ("matmul-spellings", {""}),
])
def test_inline_ffns_plan_an_owner_rewrite(name, owners):
    form = FORM[name]
    model = form.build().eval()
    x = form_inputs(form, 2, 5)
    gm = capture(model, (x,))
    matches = find_ffns(gm)
    plans = plan_module_swaps(model, gm, matches, (x,))
    assert all(isinstance(p, InlineRewrite) for p in plans)
    assert {p.owner for p in plans} == owners
    with pytest.raises(InputError, match="no module computes exactly this block"):
        plan_module_swap(gm, matches[0])


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


F64 = [pytest.param(f.name, torch.float64, 1e-12, id=f"{f.name}-f64") for f in FORMS]
F32 = [pytest.param(f.name, torch.float32, 1e-6, id=f"{f.name}-f32",
                    marks=() if f.name == "inline" else pytest.mark.slow) for f in FORMS]


@pytest.mark.parametrize("name, dtype, tol", F64 + F32)
def test_module_mode_is_exact_with_every_expert_active(name, dtype, tol):
    form = FORM[name]
    torch.manual_seed(3)
    model = form.build().to(dtype).eval()
    before = copy.deepcopy(model.state_dict())
    x = form_inputs(form, 2, 5, dtype=dtype)
    out = convert(model, moe=MoEConfig(num_experts=2, top_k=2, gate="hard"),
                  example_inputs=(x,))
    # the model keeps its class and API; the source is untouched
    assert type(out).__name__ == type(model).__name__ and isinstance(out, type(model))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    moes = [m for m in out.modules() if isinstance(m, MoEFFN)]
    assert len(moes) == form.count
    assert sum(p.numel() for p in out.parameters()) == (
        sum(p.numel() for p in model.parameters())
        + sum(m.router.weight.numel() for m in moes))  # dense FFN weights were removed
    y = form_inputs(form, 3, 11, seed=7, dtype=dtype)  # a fresh, odd shape
    with torch.no_grad():
        ref, got = model(y), out(y)
    assert ref.abs().max() > 0.1
    assert _rel(got, ref) <= tol


@pytest.mark.parametrize("name, mode", [
    ("inline", "module"), ("raw-params", "graph"), ("dtype-branch", "module"),
    ("looped", "module"),
    *(pytest.param(n, m, marks=pytest.mark.slow) for n, m in [
        ("looped", "graph"), ("dtype-branch", "graph"),
        ("inline", "graph"), ("raw-params", "module"), ("whole-forward", "module"),
        ("whole-forward", "graph"), ("two-branches", "module"), ("two-branches", "graph")]),
])
def test_inline_ffn_with_fp8(name, mode):
    form = FORM[name]
    torch.manual_seed(4)
    model = form.build().eval()
    x = form_inputs(form, 2, 5)
    out = convert(model, moe=MoEConfig(num_experts=2, top_k=2), fp8=FP8Config(),
                  example_inputs=(x,), mode=mode)
    if mode == "module":
        assert sum(isinstance(m, FP8MoEFFN) for m in out.modules()) == form.count
    else:  # the re-captured graph runs the FP8 ops
        assert any("fp8" in str(n.target) for n in out.graph.nodes)
    y = form_inputs(form, 3, 11, seed=5)
    with torch.no_grad():
        ref, got = model(y), out(y)
    assert 1e-5 < _rel(got, ref) < 0.1  # FP8 W8A8 on a tiny random model: a few percent


def test_rewritten_owner_deepcopies_and_reconverts():
    form = FORM["inline"]
    model = form.build().eval()
    x = form_inputs(form, 2, 5)
    out = convert(model, moe=MoEConfig(num_experts=2, top_k=2), example_inputs=(x,))
    twin = copy.deepcopy(out)
    y = form_inputs(form, 2, 6, seed=9)
    with torch.no_grad():
        assert torch.equal(twin(y), out(y))
    fp8 = convert(out, fp8=FP8Config(activations="none"), example_inputs=(x,))
    with torch.no_grad():
        assert _rel(fp8(y), out(y)) < 0.05
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(out)  # the owner's class is made at conversion: save state_dicts instead


def test_rewritten_owner_refuses_arguments_it_was_not_traced_with():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x, scale=None):
            y = x + self.fc2(torch.relu(self.fc1(x)))
            return y if scale is None else y * scale

    model = nn.Sequential(Layer()).eval()
    out = convert(model, moe=MoEConfig(num_experts=2, top_k=2),
                  example_inputs=(torch.randn(2, 3, 8),))
    with pytest.raises(InputError, match="scale"):
        out[0](torch.randn(2, 3, 8), scale=torch.tensor(2.0))


def test_hf_decoder_layer_with_inline_ffn_keeps_generate_and_kv_cache():
    """OPT's decoder layer calls fc1 / activation / fc2 itself: its graph is rewritten, the
    attention (and its KV cache) stays a module call."""
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                 num_attention_heads=4, word_embed_proj_dim=32,
                                 max_position_embeddings=64)
    model = transformers.OPTForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 7))
    out = convert(model, moe=MoEConfig(num_experts=4, top_k=4), example_inputs={"input_ids": ids})
    layer = out.model.decoder.layers[0]
    assert isinstance(layer, transformers.models.opt.modeling_opt.OPTDecoderLayer)
    assert not hasattr(layer, "fc1") and isinstance(layer.moe_0, MoEFFN)
    x = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        assert _rel(out(input_ids=x).logits, model(input_ids=x).logits) < 1e-6
    prompt = x[:1, :5]
    dense = model.generate(prompt, max_new_tokens=6, do_sample=False)
    moe = out.generate(prompt, max_new_tokens=6, do_sample=False)  # KV cache on
    assert torch.equal(dense, moe)


def test_python_decision_on_an_argument_is_baked_and_guarded():
    """``if enc is not None`` cannot be carried by a placeholder: the traced graph would take
    the branch for a None argument. Such arguments are traced as their recorded value, and a
    call that passes another value is refused; arguments that only flow into child modules
    (a KV cache) stay arguments."""

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.cross, self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 20), nn.Linear(20, 8)
            self.attn = nn.Identity()

        def forward(self, x, enc=None, cache=None):
            x = self.attn(x) if cache is None else x
            if enc is not None:
                x = x + self.cross(enc)
            return x + self.fc2(torch.relu(self.fc1(x)))

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Layer()

        def forward(self, x):
            return self.layer(x, enc=None, cache=None)

    torch.manual_seed(2)
    model = Parent().double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    out = convert(model, moe=MoEConfig(num_experts=4, top_k=4), example_inputs=(x,))
    y = torch.randn(3, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(out(y), model(y)) <= 1e-12
        assert _rel(out.layer(y, enc=None), model.layer(y)) <= 1e-12
    with pytest.raises(InputError, match="enc=None"):
        out.layer(y, enc=torch.randn(3, 5, 8, dtype=torch.float64))


def test_an_ffn_called_twice_is_one_block_in_both_modes():
    """A module applied twice per layer is one FFN (one set of weights): one MoE block, called
    at both places, in module mode and in graph mode."""
    form = FORM["looped"]
    torch.manual_seed(6)
    model = form.build().eval()
    x = form_inputs(form, 2, 5)
    assert len(find_ffns(capture(model, (x,)))) == 4  # 2 layers x 2 calls
    y = form_inputs(form, 3, 11, seed=2)
    for mode in ("module", "graph"):
        out = convert(model, moe=MoEConfig(num_experts=3, top_k=3, gate="hard"),
                      example_inputs=(x,), mode=mode)
        blocks = {id(m) for m in out.modules() if isinstance(m, MoEFFN)}
        assert len(blocks) == 2, mode
        with torch.no_grad():
            assert _rel(out(y), model(y)) < 1e-6, mode
        if mode == "graph":
            calls = [n for n in out.graph.nodes if n.op == "call_module"
                     and isinstance(out.get_submodule(str(n.target)), MoEFFN)]
            assert len(calls) == 4 and len({n.target for n in calls}) == 2


class _ScaledLinear(nn.Module):
    """I-BERT style: called with (x, scaling_factor), returns (y, scaling_factor)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / 5)

    def forward(self, x, scale=None):
        return torch.nn.functional.linear(x, self.weight), scale


class _ScaledLayer(nn.Module):
    def __init__(self, d=24, f=40):
        super().__init__()
        self.up, self.down = _ScaledLinear(d, f), _ScaledLinear(f, d)

    def forward(self, x):
        h, s = self.up(x, None)
        y, _ = self.down(torch.relu(h), s)
        return x + y


def test_modules_called_with_more_than_their_input_are_not_swapped():
    """Swapping a module called as m(x, scale) by an MoE block or an FP8Linear would drop the
    extra argument and its tuple result: MoE rewrites the owner's graph, FP8 keeps them."""
    torch.manual_seed(7)
    model = _ScaledLayer().eval()
    x = torch.randn(2, 5, 24)
    moe = convert(model, moe=MoEConfig(num_experts=4, top_k=4, gate="hard"),
                  example_inputs=(x,))
    y = torch.randn(3, 7, 24)
    with torch.no_grad():
        assert _rel(moe(y), model(y)) < 1e-6
    with pytest.raises(InputError, match=r"nothing to lower.*down: _ScaledLinear\.forward "
                       "takes more than its input"):
        convert(model, fp8=FP8Config(), example_inputs=(x,))


class _DropoutLayer(nn.Module):
    """An inline FFN with batch norm and dropout, the dropout a submodule or read from
    ``self.training`` directly."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.bn, self.fc1, self.fc2 = nn.BatchNorm1d(12), nn.Linear(12, 36), nn.Linear(36, 12)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        x = self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        h = self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        h = nn.functional.dropout(h, 0.3, self.training) if self.functional else self.drop(h)
        return x + h


def _train_mode_stack(functional: bool) -> nn.Module:
    model = nn.Sequential(_DropoutLayer(functional), _DropoutLayer(functional))
    with torch.no_grad():
        for m in model:
            m.bn.running_mean.uniform_(-0.5, 0.5), m.bn.running_var.uniform_(0.5, 2.0)
    return model.train()


def test_a_model_left_in_train_mode_converts_and_keeps_its_dropout():
    """A model in train mode (dropout active; HF GPT-2's resid_pdrop) used to fail the owner's
    trace check (two dropout masks compared), and tracing it updated batch norm's running
    statistics. The owner is traced and checked in eval mode; the source keeps its modes
    and buffers; the converted model still drops in train mode and equals it in eval."""
    torch.manual_seed(7)
    model = _train_mode_stack(functional=False)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(3, 5, 12)
    out = convert(model, moe=MoEConfig(num_experts=4, top_k=4, gate="hard"),
                  example_inputs=(x,))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(m.training for m in model.modules()) and all(m.training for m in out.modules())
    y = torch.randn(2, 9, 12)
    with torch.no_grad():
        out.eval(), model.eval()
        assert _rel(out(y), model(y)) < 1e-6
        out.train(), model.train()
        torch.manual_seed(3)
        got = out(y)
        torch.manual_seed(3)
        assert _rel(got, model(y)) < 1e-6  # the same dropout masks, in the same order


def test_an_owner_that_reads_self_training_is_converted_with_a_warning():
    """F.dropout(..., training=self.training) in the owner's own forward is fixed to eval mode
    by the traced graph: said, not silent (OPT's decoder layer is such an owner)."""
    torch.manual_seed(8)
    model = _train_mode_stack(functional=True).eval()
    with pytest.warns(UserWarning, match=r"_DropoutLayer.forward reads self.training.*"
                                         r"nn.Dropout"):
        out = convert(model, moe=MoEConfig(num_experts=4, top_k=4, gate="hard"),
                      example_inputs=(torch.randn(2, 5, 12),))
    y = torch.randn(2, 9, 12)
    with torch.no_grad():
        assert _rel(out(y), model(y)) < 1e-6


class _TLinear(nn.Linear):
    def forward(self, x):  # the weight read as a tensor: the FFN's graph holds get_attr nodes
        return x @ self.weight.T + self.bias


class _TBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(20), _TLinear(20, 52), _TLinear(52, 20)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def test_modules_whose_weights_the_ffn_read_are_not_left_empty():
    """An inline rewrite of x @ fc1.weight.T deletes the weights it replaces; the linear that
    held them was left as an empty shell (repr, inspect and named_modules then failed on its
    missing weight). Emptied modules go too; the others (the norm) stay."""
    torch.manual_seed(9)
    model = nn.Sequential(_TBlock(), _TBlock()).eval()
    x = torch.randn(2, 7, 20)
    out = convert(model, moe=MoEConfig(num_experts=4, top_k=4, gate="hard"),
                  example_inputs=(x,))
    assert not any(isinstance(m, _TLinear) for m in out.modules())
    assert all(isinstance(b.norm, nn.LayerNorm) for b in out)
    assert "MoEFFN" in repr(out)
    y = torch.randn(3, 5, 20)
    with torch.no_grad():
        assert _rel(out(y), model(y)) < 1e-6
    assert sum(isinstance(m, _TLinear) for m in model.modules()) == 4  # the source keeps its own
    report = inspect(out, example_inputs=(y,))  # used to raise AttributeError on the shells
    assert report.ffns == [] and len(report.conversion.blocks) == 2
