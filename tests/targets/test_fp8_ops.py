import pytest
import torch
import torch.nn.functional as F
from rewriter.targets import fp8_ops  # noqa: F401  registers torch.ops.rewriter.*
from rewriter.targets.fp8 import (
    FP8InferenceModeError,
    fp8_gemm_reference,
    quantize_blockwise,
    quantize_rowwise,
    sqnr_db,
)

import rewriter

ops = torch.ops.rewriter


def _data(seed=0, m=300, k=200, n=96):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05,
            torch.randn(n, generator=g) * 0.1)


def test_opcheck_every_op():
    x, w, b = _data(m=7)
    wq, ws = quantize_blockwise(w)
    xq, xs = quantize_rowwise(x)
    offsets = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    wq3 = torch.stack([wq, wq, wq])
    ws3 = torch.stack([ws, ws, ws])
    cases = [
        (ops.fp8_quantize_rowwise.default, (x, False)),
        (ops.fp8_quantize_blockwise.default, (w, True)),
        (ops.fp8_gemm.default, (xq, xs, wq, ws, False, b, torch.float32)),
        (ops.fp8_linear.default, (x.reshape(7, 1, 200), wq, ws, b, False)),
        (ops.fp8_weight_only_linear.default, (x, wq, ws, None)),
        (ops.fp8_grouped_linear.default, (x, wq3, ws3, offsets, False)),
        (ops.fp8_linear_hp.default, (x.requires_grad_(), w.requires_grad_(), b, False)),
    ]
    for op, args in cases:
        takes_fp8 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn
                        for a in args)
        # the schema check compares inputs with ops fp8 tensors lack on CPU: fake check only
        utils = ("test_faketensor",) if takes_fp8 else ("test_schema", "test_faketensor")
        torch.library.opcheck(op, args, test_utils=utils)


def test_linear_op_equals_reference_composition():
    x, w, b = _data()
    wq, ws = quantize_blockwise(w)
    y = ops.fp8_linear(x.reshape(3, 100, 200), wq, ws, b, False)
    ref = fp8_gemm_reference(*quantize_rowwise(x), wq, ws, bias=b).reshape(3, 100, 96)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    grouped = ops.fp8_grouped_linear(x, torch.stack([wq, wq]), torch.stack([ws, ws]),
                                     torch.tensor([0, 0, 300], dtype=torch.int32), False)
    torch.testing.assert_close(grouped, ref.reshape(300, 96) - b, rtol=1e-6, atol=1e-6)


def test_training_gradients_within_fp8_band():
    """Fprop, Dgrad and Wgrad all in FP8 (E4M3: 3 mantissa bits, ~31 dB per quantized
    Gaussian operand; a product of two quantized operands lands near 28-29 dB). Band: >= 25 dB
    for outputs and both gradients; the bias gradient is exact (a high-precision sum)."""
    x, w, b = _data(seed=4)
    x1, w1, b1 = (t.clone().requires_grad_() for t in (x, w, b))
    x2, w2, b2 = (t.clone().requires_grad_() for t in (x, w, b))
    y1 = ops.fp8_linear_hp(x1.reshape(3, 100, 200), w1, b1, False)
    y2 = F.linear(x2.reshape(3, 100, 200), w2, b2)
    grad = torch.randn_like(y2)
    y1.backward(grad)
    y2.backward(grad)
    bands = {"y": sqnr_db(y2, y1), "dx": sqnr_db(x2.grad, x1.grad),
             "dw": sqnr_db(w2.grad, w1.grad)}
    print({k: round(v, 1) for k, v in bands.items()})
    assert all(v >= 25 for v in bands.values()), bands
    torch.testing.assert_close(b1.grad, b2.grad)
    assert w1.grad.dtype == w1.dtype and x1.grad.shape == x1.shape


def test_bf16_master_weights_get_bf16_grads():
    x, w, b = _data(seed=5, m=9)
    w = w.bfloat16().requires_grad_()
    x = x.bfloat16().requires_grad_()
    y = ops.fp8_linear_hp(x, w, None, True)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


def test_nan_propagates_and_zero_inputs_give_zeros():
    x, w, b = _data(seed=6, m=5)
    wq, ws = quantize_blockwise(w)
    x[2, 10] = float("nan")
    y = ops.fp8_linear(x, wq, ws, None, False)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4]]).all()
    z = ops.fp8_linear(torch.zeros(4, 200), wq, ws, None, False)
    assert torch.equal(z, torch.zeros(4, 96))


def test_export_and_compile_keep_the_custom_ops():
    from rewriter.targets.fp8_linear import FP8Linear

    lin = torch.nn.Linear(200, 96)
    mod = torch.nn.Sequential(FP8Linear.from_linear(lin, mode="inference"), torch.nn.GELU())
    x = torch.randn(2, 5, 200)
    ep = torch.export.export(mod, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO,
                                                          1: torch.export.Dim.AUTO},))
    targets = {str(n.target) for n in ep.graph.nodes}
    assert "rewriter.fp8_linear.default" in targets
    x2 = torch.randn(3, 7, 200)
    assert torch.equal(ep.module()(x2), mod(x2))
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x2), mod(x2))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float8_e4m3fn])
def test_unsupported_dtypes_are_rejected(dtype):
    with pytest.raises((TypeError, RuntimeError)):
        ops.fp8_quantize_rowwise(torch.ones(2, 4).to(dtype), False)


def test_inference_ops_backward_raises_the_clear_error():
    """No register_autograd hint: the error names FP8 inference mode and training mode."""
    x, w, b = _data(seed=3, m=13, k=200, n=72)
    wq, ws = quantize_blockwise(w)
    offsets = torch.tensor([0, 6, 6, 13], dtype=torch.int32)
    cases = {
        "fp8_linear": lambda x: ops.fp8_linear(x.reshape(13, 1, 200), wq, ws, b, False),
        "fp8_weight_only_linear": lambda x: ops.fp8_weight_only_linear(x, wq, ws, b),
        "fp8_grouped_linear": lambda x: ops.fp8_grouped_linear(
            x, torch.stack([wq] * 3), torch.stack([ws] * 3), offsets, False),
    }
    for name, op in cases.items():
        xg = x.clone().requires_grad_()
        y = op(xg)  # the forward records the node and runs as before
        with torch.no_grad():
            assert torch.equal(y, op(x))
        with pytest.raises(FP8InferenceModeError,
                           match=rf"rewriter::{name}: .*FP8Config\(mode='training'\)") as err:
            y.sum().backward()
        assert isinstance(err.value, rewriter.RewriterError)
        assert isinstance(err.value, RuntimeError)  # what torch raised before
        assert "register_autograd" not in str(err.value)
