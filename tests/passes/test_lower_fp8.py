import pytest
import torch
from rewriter.passes.lower_fp8 import FP8Config, find_output_heads
from rewriter.targets.fp8 import sqnr_db
from rewriter.targets.fp8_linear import FP8Linear, FP8MoEFFN
from torch import nn

import rewriter
from rewriter import InputError, MoEConfig, capture, models
from rewriter.graph_ops import weight_bytes
from tests._zoo import CASES

BY_NAME = {c.name: c for c in CASES}


def _out(y):
    return y if isinstance(y, torch.Tensor) else (
        y.logits if hasattr(y, "logits") else y.last_hidden_state)


def _run(model, inputs):
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    with torch.no_grad():
        return _out(model(*args, **kwargs))


@pytest.mark.parametrize("name, head", [
    ("llama-tiny", {"output"}), ("gpt-tiny", {"lm_head"}), ("bert-tiny", set()),
    ("hf:llama", {"lm_head"}), ("hf:gpt2", {"lm_head"}), ("hf:bert", set()),
])
def test_output_heads_found_from_the_graph(captured, name, head):
    _, _, gm = captured(name)
    assert find_output_heads(gm) == head


@pytest.mark.parametrize("name", ["llama-tiny", "hf:gpt2", "hf:phi3", "bert-tiny"])
def test_lowering_reports_and_keeps_high_precision_parts(name):
    case = BY_NAME[name]
    model = case.build()
    conv = rewriter.convert(model, fp8=FP8Config(), example_inputs=case.inputs(model, 2, 7))
    info = rewriter.conversion_info(conv)
    lowered = [d for d in info.fp8_decisions if d.lowered]
    kept = {d.fqn: d.reason for d in info.fp8_decisions if not d.lowered}
    linears = [m for m in model.modules()
               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    assert len(lowered) + sum("head" in r for r in kept.values()) == len(linears)
    assert all(isinstance(conv.get_submodule(d.fqn), FP8Linear) for d in lowered)
    x = case.inputs(model, 2, 9, seed=3)
    assert sqnr_db(_run(model, x), _run(conv, x)) > 15
    assert not any(isinstance(m, FP8Linear) for m in model.modules())  # user model untouched


def test_moe_plus_fp8_keeps_router_and_lowers_experts_and_saves_bytes():
    case = BY_NAME["llama-small-test"]
    model = case.build()
    conv = rewriter.convert(model, moe=MoEConfig(num_experts=8, top_k=8), fp8=FP8Config())
    info = rewriter.conversion_info(conv)
    kept = {d.fqn: d.reason for d in info.fp8_decisions if not d.lowered}
    assert {k for k in kept if k.endswith("router")} == {
        f"layers.{i}.feed_forward.router" for i in range(4)}
    assert all("fp32" in kept[f"layers.{i}.feed_forward.router"] for i in range(4))
    blocks = [m for m in conv.modules() if isinstance(m, FP8MoEFFN)]
    assert len(blocks) == 4 and all(b.router.weight.dtype == torch.float32 for b in blocks)
    x = case.inputs(model, 2, 9, seed=3)
    assert sqnr_db(_run(model, x), _run(conv, x)) > 15
    lowered_bytes = sum(weight_bytes(conv.get_submodule(d.fqn)) for d in info.fp8_decisions
                        if d.lowered)
    dense_bf16 = sum(weight_bytes(model.get_submodule(d.fqn)) // 2 for d in info.fp8_decisions
                     if d.lowered and d.kind != "moe_experts")
    dense_bf16 += sum(2 * p.numel() for n, p in model.named_parameters()
                      if ".feed_forward." in n)
    assert lowered_bytes <= 0.52 * dense_bf16


def test_graph_mode_holds_fp8_ops_and_matches_module_mode():
    case = BY_NAME["gpt-tiny"]
    model = case.build()
    x = case.inputs(model, 3, 5, seed=2)
    g = rewriter.convert(model, fp8=FP8Config(), mode="graph")
    m = rewriter.convert(model, fp8=FP8Config())
    assert any("rewriter.fp8_linear" in str(n.target) for n in g.graph.nodes)
    assert torch.equal(g(*x), m(*x))


def test_filters_and_bad_models():
    case = BY_NAME["gpt-tiny"]
    model = case.build()
    conv = rewriter.convert(model, fp8=FP8Config(),
                            filter_fn=lambda mod, fqn: not fqn.startswith("blocks.1"))
    reasons = {d.fqn: d.reason for d in rewriter.conversion_info(conv).fp8_decisions}
    assert reasons["blocks.1.mlp.fc_in"] == "excluded by filter_fn"
    with pytest.raises(InputError, match="nothing to lower"):
        rewriter.convert(model, fp8=FP8Config(), filter_fn=lambda mod, fqn: False)
    no_linear = nn.Sequential(nn.LayerNorm(8), nn.GELU())
    with pytest.raises(InputError, match="nothing to lower"):
        rewriter.convert(no_linear, fp8=FP8Config(), example_inputs=(torch.randn(2, 8),))
    with pytest.raises(ValueError, match="FP8Config.mode"):
        FP8Config(mode="fast")
    with pytest.raises(ValueError, match="FP8Config.activations"):
        FP8Config(mode="training", activations="none")
    gm = capture(model, case.inputs(model, 2, 5))
    assert find_output_heads(gm) == {"lm_head"}


def test_cache_dequantized_is_validated_threaded_and_not_stored():
    with pytest.raises(ValueError, match="FP8Config.cache_dequantized must be a bool"):
        FP8Config(cache_dequantized=1)
    case = BY_NAME["llama-small-test"]
    model = case.build()
    x = case.inputs(model, 2, 7)
    on = rewriter.convert(model, fp8=FP8Config(), example_inputs=x)
    off = rewriter.convert(model, fp8=FP8Config(cache_dequantized=False), example_inputs=x)
    flags = [[m.cache_dequantized for m in c.modules() if isinstance(m, FP8Linear)]
             for c in (on, off)]
    assert flags[0] and all(flags[0]) and not any(flags[1])
    memos = {id(m._activation_memo) for m in on.modules() if isinstance(m, FP8Linear)}
    assert len(memos) == 1  # one per model: q/k/v and gate/up quantize their input once
    nbytes, keys = weight_bytes(on), set(on.state_dict())
    assert torch.equal(_run(on, x), _run(off, x))  # cached fp32 copies, same bits
    assert any(len(m._dequant_cache) for m in on.modules() if isinstance(m, FP8Linear))
    assert weight_bytes(on) == nbytes == weight_bytes(off) and set(on.state_dict()) == keys


class _TupleRouter(nn.Linear):
    """A gate that is an nn.Linear subclass with its own forward (PhiMoE's router)."""

    def forward(self, x):
        scores = torch.softmax(super().forward(x), dim=-1)
        weights, experts = torch.topk(scores, 2, dim=-1)
        return scores, weights, experts


class _TinyMoELayer(nn.Module):
    def __init__(self, d=32, f=48, experts=4):
        super().__init__()
        self.router = _TupleRouter(d, experts, bias=False)
        self.plain_gate = nn.Linear(d, experts, bias=False)  # Mixtral's gate: a plain Linear
        self.w_in = nn.Parameter(torch.randn(experts, f, d) / 6)
        self.w_out = nn.Parameter(torch.randn(experts, d, f) / 7)
        self.proj = nn.Linear(d, d)

    def forward(self, x):  # (B, T, d)
        _, w, e = self.router(x)
        _, e2 = torch.topk(self.plain_gate(x), 1, dim=-1)
        h = torch.einsum("btd,efd->btef", x, self.w_in).relu()
        y = torch.einsum("btef,edf->bted", h, self.w_out)
        y = (y.gather(2, e[..., None].expand(-1, -1, -1, y.shape[-1]))
             * w[..., None]).sum(2)
        return self.proj(x + y) + e2.to(x.dtype)


def _lowered(model):
    """FP8Config() lowering of a (B, T, 32)-input model: (converted, decisions by fqn, relative
    error of its output vs the model's on seeded inputs)."""
    x = torch.randn(2, 5, 32)
    out = rewriter.convert(model, fp8=FP8Config(), example_inputs=(x,))
    decisions = {d.fqn: d for d in rewriter.conversion_info(out).fp8_decisions}
    with torch.no_grad():
        ref, got = model(x), out(x)
    return out, decisions, float((got - ref).norm() / ref.norm())


def test_routers_stay_high_precision_and_custom_linear_forwards_are_not_swapped():
    torch.manual_seed(2)
    out, decisions, rel = _lowered(_TinyMoELayer().eval())
    assert not decisions["router"].lowered and not decisions["plain_gate"].lowered
    assert "router" in decisions["plain_gate"].reason.lower()
    assert decisions["proj"].lowered
    assert type(out.router) is _TupleRouter and type(out.plain_gate) is nn.Linear
    assert 0 < rel < 0.1


class _WeightReadByParent(nn.Module):
    """NeoMME: the parent multiplies by a Linear's weight; the Linear is never called."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.unembed = nn.Linear(48, 32, bias=False)  # weight (32, 48) used as (in, out)
        self.head = nn.Linear(48, 16)

    def forward(self, x):
        return self.head(self.proj(x) @ self.unembed.weight)


def test_a_linear_whose_weight_another_forward_reads_is_not_swapped():
    torch.manual_seed(4)
    _, decisions, rel = _lowered(_WeightReadByParent().eval())
    assert decisions["proj"].lowered and not decisions["unembed"].lowered
    assert "never called" in decisions["unembed"].reason
    assert 0 < rel < 0.1


# ------------------------------------------------------------------------------ non-finite weights


class _TwoLinears(nn.Module):
    def __init__(self, d=136, h=200, out=9, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a, self.b, self.head = nn.Linear(d, h), nn.Linear(h, d), nn.Linear(d, out)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("config", [
    FP8Config(), FP8Config(activations="none"), FP8Config(mode="training"),
    FP8Config(pow2_scales=True, weight_rounding="nearest")],
    ids=["w8a8", "w8a16", "training", "pow2"])
@pytest.mark.parametrize("value, where", [(float("nan"), (1, 1)), (float("inf"), (199, 135)),
                                          (float("-inf"), (130, 7))])
def test_non_finite_weight_is_refused_before_anything_changes(config, value, where):
    """A NaN/inf would make its 128x128 block scale non-finite, the whole block NaN."""
    model = _TwoLinears().eval()
    with torch.no_grad():
        model.a.weight[where] = value
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 136, generator=torch.Generator().manual_seed(3))
    with pytest.raises(InputError, match=r"a\.weight has NaN or Inf values.*filter_fn"):
        rewriter.convert(model, fp8=config, example_inputs=(x,))
    assert isinstance(model.a, nn.Linear) and isinstance(model.b, nn.Linear)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # bit for bit, the NaN/inf included
        assert torch.equal(before[k].view(torch.int32), after[k].view(torch.int32)), k
    # the remedy the message names: keep it in high precision, the rest lowers
    conv = rewriter.convert(model, fp8=config, example_inputs=(x,),
                            filter_fn=lambda m, fqn: fqn != "a")
    assert isinstance(conv.a, nn.Linear) and isinstance(conv.b, FP8Linear)


def test_non_finite_weight_outside_the_lowered_set_is_fine():
    """The output head stays in high precision: its non-finite weight is not FP8's concern."""
    model = _TwoLinears(seed=2).eval()
    with torch.no_grad():
        model.head.weight[3, 4] = float("nan")
    x = torch.randn(3, 136, generator=torch.Generator().manual_seed(1))
    conv = rewriter.convert(model, fp8=FP8Config(activations="none"), example_inputs=(x,))
    assert isinstance(conv.a, FP8Linear) and isinstance(conv.head, nn.Linear)
    with torch.no_grad():
        y_ref, y = model(x), conv(x)
    assert torch.equal(torch.isfinite(y_ref), torch.isfinite(y))  # column 3 NaN in both
    assert int((~torch.isfinite(y)).sum()) == 3


def test_non_finite_embedding_and_expert_weights_are_refused():
    model = models.build_model("llama-tiny", seed=4, n_layer=1)
    x = models.example_inputs(model, 2, 7)
    with torch.no_grad():
        model.tok_embeddings.weight[17, 5] = float("inf")
    with pytest.raises(InputError, match=r"tok_embeddings\.weight has NaN or Inf"):
        rewriter.convert(model, fp8=FP8Config(activations="none", embeddings="fp8"),
                         example_inputs=x)
    assert isinstance(model.tok_embeddings, nn.Embedding)
    # kept in high precision by default: nothing to refuse there
    conv = rewriter.convert(model, fp8=FP8Config(), example_inputs=x)
    assert isinstance(conv.tok_embeddings, nn.Embedding)

    moe = rewriter.convert(models.build_model("llama-tiny", seed=4, n_layer=1),
                           moe=MoEConfig(num_experts=4, shared_experts=0, top_k=2),
                           example_inputs=x)
    block = next(m for m in moe.modules() if type(m).__name__ == "MoEFFN")
    fqn = next(n for n, m in moe.named_modules() if m is block)
    with torch.no_grad():
        block.w_down[2, 3, 1] = float("nan")
    with pytest.raises(InputError, match=rf"{fqn}\.w_down has NaN or Inf values"):
        rewriter.convert(moe, fp8=FP8Config(), example_inputs=x)
    assert type(moe.get_submodule(fqn)).__name__ == "MoEFFN"
