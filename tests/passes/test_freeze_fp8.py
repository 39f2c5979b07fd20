import copy

import pytest
import torch
from rewriter.passes.freeze_fp8 import freeze_fp8
from rewriter.targets.fp8_linear import FP8Linear, FP8MoEFFN

import rewriter
from rewriter import InputError, models
from rewriter.graph_ops import weight_bytes


def test_freeze_stores_fp8_weights_and_keeps_the_forward():
    model = rewriter.convert(models.build_model("llama-tiny", seed=3), recipe="deepseek-v3")
    x = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        ref = model(x)
    frozen = copy.deepcopy(model)
    assert freeze_fp8(frozen) == 2 * (4 + 1 + 3)  # per layer: attention, experts, shared
    assert all(m.mode == "inference" for m in frozen.modules()
               if isinstance(m, (FP8Linear, FP8MoEFFN)))
    assert freeze_fp8(frozen) == 0  # idempotent
    with torch.no_grad():
        got = frozen(x)
    # same quantized operands; only the grouped GEMM's fp32 summation order differs
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-6
    assert weight_bytes(frozen) < 0.55 * weight_bytes(model)
    dtypes = {t.dtype for t in frozen.state_dict().values()}
    assert torch.float8_e4m3fn in dtypes


def test_freeze_refuses_a_non_finite_master_weight_before_any_swap():
    model = rewriter.convert(models.build_model("llama-tiny", seed=3, n_layer=2),
                             recipe="deepseek-v3")
    late = [(n, m) for n, m in model.named_modules() if isinstance(m, FP8Linear)][-1]
    with torch.no_grad():
        late[1].weight[5, 9] = float("nan")  # e.g. a diverged step, in the last FP8 linear
    with pytest.raises(InputError, match=rf"freeze_fp8: parameter {late[0]}\.weight has NaN"):
        freeze_fp8(model)
    assert all(m.mode == "training" for m in model.modules()
               if isinstance(m, (FP8Linear, FP8MoEFFN)))  # nothing swapped
    expert = next(m for m in model.modules() if isinstance(m, FP8MoEFFN))
    with torch.no_grad():
        late[1].weight[5, 9] = 0.25
        expert.w_up[1, 2, 3] = float("-inf")
    with pytest.raises(InputError, match=r"\.w_up has NaN or Inf values"):
        freeze_fp8(model)
