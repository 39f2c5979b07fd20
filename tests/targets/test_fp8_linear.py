import copy

import pytest
import torch

from models.moe import MoEFFN
from targets.fp8 import sqnr_db
from targets.fp8_linear import FP8Linear, FP8MoEFFN


def test_inference_and_training_modes_compute_the_same_forward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 96)
    x = torch.randn(4, 7, 200)
    inf = FP8Linear.from_linear(lin, mode="inference")
    tr = FP8Linear.from_linear(lin, mode="training")
    torch.testing.assert_close(inf(x), tr(x), rtol=1e-6, atol=1e-6)
    assert tr.weight is lin.weight  # training shares the master weight
    assert sqnr_db(lin(x), inf(x)) > 27
    only_w = FP8Linear.from_linear(lin, mode="inference", activations="none")
    assert sqnr_db(lin(x), only_w(x)) > sqnr_db(lin(x), inf(x))  # W8A16 is closer to fp32
    bytes_fp8 = inf.weight_q.numel() + 4 * inf.weight_scale.numel()
    assert bytes_fp8 <= 0.52 * 2 * lin.weight.numel()  # vs bf16 weights
    with pytest.raises(ValueError, match="activations must be 'fp8'"):
        FP8Linear.from_linear(lin, mode="training", activations="none")


def test_conv1d_layout_is_transposed():
    class Conv1D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(200, 96) * 0.05)
            self.bias = torch.nn.Parameter(torch.randn(96))

        def forward(self, x):
            return x @ self.weight + self.bias

    conv = Conv1D()
    x = torch.randn(3, 200)
    fp8 = FP8Linear.from_linear(conv, transposed=True, mode="inference")
    assert sqnr_db(conv(x), fp8(x)) > 27


def _moe(glu=True, bias=False, shared=8):
    torch.manual_seed(1)
    block = MoEFFN(40, 24, 5, 2, shared_dim=shared, activation="silu", glu=glu, bias=bias,
                   gate="softmax")
    with torch.no_grad():
        block.router.weight.normal_(0, 1.0)
    return block.eval()


@pytest.mark.parametrize("glu, bias", [(True, False), (False, True)])
def test_fp8_moe_grouped_path_equals_per_expert_path(glu, bias):
    block = _moe(glu, bias)
    x = torch.randn(3, 11, 40)
    inf = FP8MoEFFN(copy.deepcopy(block), mode="inference")
    tr = FP8MoEFFN(copy.deepcopy(block), mode="training")
    grouped = inf(x)
    per_expert = inf._dispatch_masked(
        x.reshape(-1, 40), *inf._route(x.reshape(-1, 40))[:2]).reshape(x.shape)
    if inf.shared is not None:
        per_expert = per_expert + inf.shared(x)
    if inf.b_out is not None:
        per_expert = per_expert + inf.b_out
    torch.testing.assert_close(grouped, per_expert, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped, tr(x), rtol=1e-5, atol=1e-6)
    assert sqnr_db(block(x), grouped) > 25
    assert inf.w_up_q.dtype == torch.float8_e4m3fn and inf.w_up_scale.shape == (5, 1, 1)


def test_fp8_moe_training_reaches_used_experts_and_router():
    block = _moe()
    fp8 = FP8MoEFFN(block, mode="training")
    x = torch.randn(2, 9, 40)
    fp8(x).pow(2).mean().backward()
    used = fp8.last_load > 0
    g = fp8.w_up.grad.flatten(1).norm(dim=1)
    assert bool((g[used] > 0).all()) and bool((g[~used] == 0).all())
    assert fp8.router.weight.grad.abs().sum() > 0
    assert fp8.router.weight.dtype == torch.float32
