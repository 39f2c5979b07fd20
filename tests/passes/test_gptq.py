import pytest
import torch
from rewriter.passes.gptq import collect_input_hessians, gptq_quantize_blockwise
from rewriter.passes.lower_fp8 import FP8Config
from rewriter.targets.fp8 import dequantize_blockwise, quantize_blockwise
from rewriter.targets.fp8_linear import FP8Linear
from torch import nn

import rewriter
from rewriter import InputError
from tests._zoo import CASES

BY_NAME = {c.name: c for c in CASES}


def _correlated_inputs(t: int, k: int, seed: int) -> torch.Tensor:
    """(t, k) activations with strongly correlated features and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k // 4, k, generator=torch.Generator().manual_seed(99))  # shared basis
    x = torch.randn(t, k // 4, generator=g) @ mix + 0.1 * torch.randn(t, k, generator=g)
    x[:, :3] *= 20
    return x


def _layer_error(x, w, q, s) -> float:
    return float((x.double() @ (w.double() - dequantize_blockwise(q, s).double()).T).norm())


@pytest.mark.parametrize("n, k", [(200, 300), (129, 257), (64, 96)])
def test_gptq_keeps_the_format_and_scales_and_lowers_the_layer_error(n, k):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05
    w[5, 7] = 1.3  # an outlier that sets one block's scale
    x = _correlated_inputs(2048, k, seed=1)
    h = (x.double().T @ x.double()) / x.shape[0]
    q, s = gptq_quantize_blockwise(w, h, dampening=0.01)
    q_near, s_near = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (n, k)
    assert torch.equal(s, s_near)  # the same block scales as nearest rounding
    assert torch.isfinite(q.float()).all() and q.float().abs().max() <= 448
    held_out = _correlated_inputs(2048, k, seed=2)
    for inputs in (x, held_out):
        assert _layer_error(inputs, w, q, s) < 0.7 * _layer_error(inputs, w, q_near, s_near)


def test_gptq_is_nearest_rounding_when_inputs_are_uncorrelated_or_damped_away():
    n, k = 150, 260
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    q_near, _ = quantize_blockwise(w)
    diag = torch.diag(torch.rand(k, dtype=torch.float64) + 0.5)  # no error to spread
    q, _ = gptq_quantize_blockwise(w, diag)
    assert torch.equal(q.view(torch.uint8), q_near.view(torch.uint8))
    x = _correlated_inputs(512, k, seed=4)
    q, _ = gptq_quantize_blockwise(w, x.double().T @ x.double(), dampening=1e12)
    assert torch.equal(q.view(torch.uint8), q_near.view(torch.uint8))
    q, _ = gptq_quantize_blockwise(w, torch.zeros(k, k))  # never active: nearest
    assert torch.equal(q.view(torch.uint8), q_near.view(torch.uint8))


def test_gptq_rejects_bad_shapes_and_dampening():
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize_blockwise(torch.randn(4, 8), torch.eye(7))
    with pytest.raises(ValueError, match="dampening"):
        gptq_quantize_blockwise(torch.randn(4, 8), torch.eye(8), dampening=0.0)


class _Pair(nn.Module):  # q and k read the same tensor; out reads another
    def __init__(self):
        super().__init__()
        self.q, self.k, self.out = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x, attention_mask=None):
        return self.out(torch.tanh(self.q(x) * self.k(x)))


def test_input_hessians_are_x_transpose_x_over_real_tokens_shared_by_readers_of_one_tensor():
    model = _Pair()
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 5, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    mask2 = torch.ones(3, 4, dtype=torch.long)
    mask2[1, 2:] = 0
    batches = [(x1,), {"x": x2, "attention_mask": mask2}]
    found = collect_input_hessians(model, {"q": 6, "k": 6, "out": 5}, batches, progress=False)
    assert found["q"] is found["k"] and found["out"] is not found["q"]
    rows = torch.cat([x1.reshape(-1, 6), x2.reshape(-1, 6)[mask2.reshape(-1) != 0]]).double()
    assert found["q"].tokens == rows.shape[0] == 10 + 10
    torch.testing.assert_close(found["q"].mean(), rows.T @ rows / rows.shape[0])
    hidden = torch.cat([torch.tanh(model.q(x) * model.k(x)).reshape(-1, 5)
                        for x in (x1, x2)]).detach().double()
    hidden = torch.cat([hidden[:10], hidden[10:][mask2.reshape(-1) != 0]])
    torch.testing.assert_close(found["out"].mean(), hidden.T @ hidden / 20)
    assert all(m.training for m in model.modules())  # training flags restored


def test_input_hessians_name_a_module_with_non_finite_inputs():
    model = _Pair()
    x = torch.randn(1, 3, 6)
    x[0, 1, 2] = float("nan")
    with pytest.raises(InputError, match="q: its calibration inputs are not finite"):
        collect_input_hessians(model, {"q": 6}, [(x,)], progress=False)


def test_fp8_linear_stores_given_codes_and_checks_them():
    w = torch.randn(130, 70)
    q, s = gptq_quantize_blockwise(w, torch.eye(70, dtype=torch.float64) + 0.5)
    lin = FP8Linear(w, mode="inference", activations="none", quantized=(q, s))
    assert torch.equal(lin.weight_q.view(torch.uint8), q.view(torch.uint8))
    with pytest.raises(ValueError, match="quantized must be"):
        FP8Linear(w, mode="inference", quantized=(q[:, :69], s))
    with pytest.raises(ValueError, match="mode='inference'"):
        FP8Linear(w, mode="training", quantized=(q, s))


def test_fp8_config_validates_rounding():
    with pytest.raises(ValueError, match="weight_rounding must be one of"):
        FP8Config(weight_rounding="stochastic")
    with pytest.raises(ValueError, match="needs mode='inference'"):
        FP8Config(mode="training", weight_rounding="gptq")
    for bad in (0, -1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="gptq_dampening"):
            FP8Config(gptq_dampening=bad)


def _err(model, conv, inputs) -> float:
    with torch.no_grad():
        a, b = model(**inputs).logits, conv(**inputs).logits
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("name", ["hf:llama", "hf:gpt2"])
def test_convert_rounds_linears_with_gptq_when_calibrated(name):
    case = BY_NAME[name]
    model = case.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [case.inputs(model, 4, 19, seed=i) for i in range(4)]
    example = case.inputs(model, 1, 8)
    cfg = FP8Config(activations="none")
    gptq = rewriter.convert(model, fp8=cfg, example_inputs=example, calibration=calib)
    near = rewriter.convert(model, fp8=cfg, example_inputs=example)
    decisions = [d for d in rewriter.conversion_info(gptq).fp8_decisions if d.lowered]
    assert decisions and all("GPTQ rounding, 304 calibration tokens" in d.reason
                             for d in decisions)
    assert not any("GPTQ" in d.reason for d in rewriter.conversion_info(near).fp8_decisions)
    changed = sum(not torch.equal(gptq.get_submodule(d.fqn).weight_q.view(torch.uint8),
                                  near.get_submodule(d.fqn).weight_q.view(torch.uint8))
                  for d in decisions)
    assert changed == len(decisions)
    held_out = case.inputs(model, 3, 23, seed=50)
    assert _err(model, gptq, held_out) < _err(model, near, held_out)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_convert_asks_for_calibration_when_gptq_is_explicit():
    case = BY_NAME["hf:llama"]
    model = case.build()
    with pytest.raises(InputError, match="give calibration=batches"):
        rewriter.convert(model, fp8=FP8Config(weight_rounding="gptq"),
                         example_inputs=case.inputs(model, 1, 8))


def test_gptq_rounded_codes_survive_save_and_load(tmp_path):
    case = BY_NAME["hf:llama"]
    model = case.build()
    calib = [case.inputs(model, 2, 13, seed=i) for i in range(2)]
    conv = rewriter.convert(model, fp8=FP8Config(), example_inputs=case.inputs(model, 1, 8),
                            calibration=calib)
    loaded = rewriter.load(rewriter.save(conv, tmp_path / "m"))
    lowered = [d.fqn for d in rewriter.conversion_info(conv).fp8_decisions if d.lowered]
    for fqn in lowered:
        a, b = conv.get_submodule(fqn), loaded.get_submodule(fqn)
        assert torch.equal(a.weight_q.view(torch.uint8), b.weight_q.view(torch.uint8))
        assert torch.equal(a.weight_scale, b.weight_scale)
    x = case.inputs(model, 2, 11, seed=7)
    with torch.no_grad():
        assert torch.equal(conv(**x).logits, loaded(**x).logits)
