import pytest
import torch
import torch.nn.functional as F
from rewriter.models import hf
from rewriter.passes.ffn_to_moe import MoEConfig
from rewriter.passes.lower_fp8 import FP8Config
from torch import nn

import rewriter
from rewriter import models
from rewriter.model_stats import model_stats


def test_dense_counts_match_the_modules():
    model = models.build_model("gpt-tiny", seed=0)
    s = model_stats(model)
    assert s.params == sum(p.numel() for p in model.parameters())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert s.matmul_flops_per_token == 2 * sum(m.weight.numel() for m in linears)
    assert s.active_params == s.params
    stored = {id(t): t for t in model.state_dict(keep_vars=True).values()}  # checkpoint
    assert s.weight_bytes == sum(t.numel() * t.element_size() for t in stored.values())


def test_fp8_inference_keeps_param_count_and_shrinks_bytes():
    model = models.build_model("llama-tiny", seed=0)
    fp8 = rewriter.convert(model, fp8=FP8Config())
    a, b = model_stats(model), model_stats(fp8)
    assert b.params == a.params and b.matmul_flops_per_token == a.matmul_flops_per_token
    assert b.weight_bytes < 0.6 * a.weight_bytes
    x = torch.randint(0, 256, (2, 9))
    assert torch.isfinite(fp8(x)).all()


# ---------------------------------------------------------------- graphs count like modules

LLAMA_TINY_FLOPS = 214_016  # 2 x the weights of every linear of llama-tiny, head included


def test_captured_graph_counts_the_matmuls_it_computes():
    """inspect(capture(model)) reported 0 matmul FLOPs per token: the graph's linears are
    call_function nodes on parameters, not Linear modules."""
    model = models.build_model("llama-tiny", seed=0)
    gm = rewriter.capture(model, models.example_inputs(model))
    eager = model_stats(model)
    assert eager.matmul_flops_per_token == LLAMA_TINY_FLOPS
    assert model_stats(gm) == eager
    assert rewriter.inspect(gm).stats.matmul_flops_per_token == LLAMA_TINY_FLOPS


def test_captured_hf_gpt2_conv1d_addmm_counts_like_eager():
    model = hf.build_hf("gpt2")
    gm = rewriter.capture(model, hf.hf_example_inputs(model))
    assert model_stats(gm) == model_stats(model)
    assert model_stats(gm).matmul_flops_per_token > 0


class _Functional(nn.Module):
    """Weights used through F.linear / torch.matmul / w[e] (what symbolic_trace records)."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(16, 8))  # (out, in) for F.linear
        self.w_mid = nn.Parameter(torch.randn(16, 16))  # (in, out) for matmul
        self.stacked = nn.Parameter(torch.randn(3, 8, 16))  # (E, out, in): one slice used

    def forward(self, x):  # (T, 8) -> (T, 8)
        h = torch.matmul(F.linear(x, self.w_in), self.w_mid)  # (T, 16)
        return F.linear(h, self.stacked[1])


def test_symbolic_trace_graph_counts_functional_matmuls():
    gm = torch.fx.symbolic_trace(_Functional())
    assert model_stats(gm).matmul_flops_per_token == 2 * (16 * 8 + 16 * 16 + 8 * 16)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["moe", "fp8", "moe+fp8"])
def test_graph_mode_convert_counts_like_module_mode(kind):
    """Graph-mode convert counted only the MoE blocks (0 for the FP8 graph); the routed experts
    traced through (k of E experts per token) now count top_k / E of the time."""
    model = models.build_model("llama-tiny", seed=0)
    x = models.example_inputs(model)
    kw = {"moe": MoEConfig(num_experts=4, top_k=2, shared_width=12),
          "fp8": FP8Config()}
    kw = {k: v for k, v in kw.items() if k in kind}
    graph = rewriter.convert(model, example_inputs=x, mode="graph", **kw)
    module = rewriter.convert(model, example_inputs=x, **kw)
    g, m = model_stats(graph), model_stats(module)
    assert g == m
    if kind == "fp8":
        assert g.matmul_flops_per_token == LLAMA_TINY_FLOPS
    else:
        assert g.matmul_flops_per_token < LLAMA_TINY_FLOPS  # 2 of 4 routed experts
        assert g.active_params < g.params
    assert rewriter.inspect(graph).stats == g


def test_fp8_tied_head_counts_as_a_matmul():
    """An FP8TiedHead (tied output head on an FP8 table) is a linear of V x d weights."""
    model = models.build_model("llama-tiny-tied", seed=0)
    fp8 = rewriter.convert(model, fp8=FP8Config(embeddings="fp8", keep_output_head=False))
    assert any(type(m).__name__ == "FP8TiedHead" for m in fp8.modules())
    assert model_stats(fp8).matmul_flops_per_token == model_stats(model).matmul_flops_per_token
