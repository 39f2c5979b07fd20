import torch
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
