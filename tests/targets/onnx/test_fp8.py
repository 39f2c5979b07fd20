"""targets/onnx/fp8.py: the FP8 op translations one by one against the torch reference
(:mod:`rewriter.targets.fp8`): W8A8 / W8A16 linears with partial tiles, pow2 scales, 3-D and
0-row inputs, the activation-mode override, training-mode modules, the AMAX_FLOOR on tiny
tiles (case 01), and onnxruntime's QuantizeLinear bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rewriter.targets import fp8 as ref
from rewriter.targets.fp8 import AMAX_FLOOR
from rewriter.targets.fp8_linear import FP8Linear
from rewriter.targets.onnx import export_onnx
from rewriter.targets.onnx_runtime import (
    check_fp8_linears,
    compare_with_torch,
    make_session,
    run_onnx,
)

# ------------------------------------------------------------------------------ FP8 ops one by one


def _linear_case(tmp_path, module, x, **kw):
    report = export_onnx(module, tmp_path / "lin.onnx", example_inputs=(x,), **kw)
    return report


@pytest.mark.parametrize("n, k, bias, pow2", [(200, 300, True, False), (64, 43, False, False),
                                              (130, 256, True, True)])
def test_fp8_linear_translation(tmp_path, n, k, bias, pow2):
    """W8A8 with partial 128-tiles along K and N, bias, pow2 scales, 3-D and 0-row inputs:
    bit-identical activation quantization, fp32 matmul (summation order only)."""
    torch.manual_seed(0)
    w = torch.randn(n, k) * torch.logspace(-2, 1, k)  # tiles with very different ranges
    lin = FP8Linear(w, torch.randn(n) if bias else None, mode="inference", pow2=pow2)
    report = _linear_case(tmp_path, lin, torch.randn(2, 5, k))
    session = make_session(report.path)
    for x in (torch.randn(3, 9, k) * 7, torch.zeros(1, 2, k), torch.randn(1, 1, k) * 1e-3,
              torch.randn(0, 4, k)):
        if x.numel():
            assert compare_with_torch(lin, session, (x,))["rel"] <= 1e-6
            forced = check_fp8_linears(report.path, (x,))
            assert forced["w8a8"] == 1 and forced["q_mismatches"] == 0
            assert forced["scale_mismatches"] == 0 and forced["max_rel"] <= 1e-6
        else:
            out = session.run(None, {"x": x.numpy()})[0]
            assert out.shape == (0, 4, n)


@pytest.mark.parametrize("pow2", [False, True])
def test_tiny_amax_tiles_use_the_amax_floor_and_stay_finite(tmp_path, pow2):
    """Case 01 in the graph: tiles whose amax is tiny (fp32 subnormal) or zero get the scale
    max(amax, AMAX_FLOOR) / 448, exactly as the torch reference, so onnxruntime gives finite
    outputs equal to PyTorch (no 0 or subnormal scale, no inf reciprocal, no NaN)."""
    torch.manual_seed(0)
    lin = FP8Linear(torch.randn(72, 200), torch.randn(72), mode="inference", pow2=pow2)
    x = torch.randn(3, 5, 200)  # K = 200: a full and a partial 1x128 tile per row
    x[0, 0] = 0.0
    x[0, 0, :4] = torch.tensor([2e-43, -1e-44, 7e-43, 1.4e-45])  # subnormal amax
    x[1, 2, 128:] = 1e-30 * torch.randn(72)  # partial tile at the floor's order
    x[2, 4, :128] = 0.0  # an all-zero tile beside a normal one
    x[2, 1] = 3e-39  # a whole row below the smallest normal fp32
    r = export_onnx(lin, tmp_path / "tiny.onnx", example_inputs=(x,))
    out = torch.from_numpy(run_onnx(r.path, (x,))["output"])
    with torch.no_grad():
        expected = lin(x)
    assert torch.isfinite(out).all() and torch.isfinite(expected).all()
    # fp32 summation order only: max |onnx - torch| / max |torch|
    assert float((out - expected).abs().max() / expected.abs().max()) <= 1e-6
    # the tiny rows' output is the bias (their FP8 codes round to 0 under the floored scale)
    torch.testing.assert_close(out[0, 0], lin.bias, rtol=0, atol=1e-6)
    forced = check_fp8_linears(r.path, (x,), model=lin)
    assert forced["q_mismatches"] == forced["scale_mismatches"] == 0, forced
    assert forced["weight_mismatches"] == 0 and forced["max_rel"] <= 1e-6, forced
    scale = ref.quantize_rowwise(x.reshape(-1, 200), pow2=pow2)[1]  # (15, 2)
    floor = torch.tensor(AMAX_FLOOR) / 448  # fp32, a normal number
    if pow2:
        floor = torch.exp2(torch.ceil(torch.log2(floor)))
    assert floor > torch.finfo(torch.float32).tiny
    for row, tile in ((0, 0), (0, 1), (11, 0), (11, 1), (14, 0)):  # tiny or zero tiles
        assert scale[row, tile] == floor, (row, tile, scale[row, tile])


def test_activation_override_and_weight_only(tmp_path):
    torch.manual_seed(0)
    w, x = torch.randn(96, 200), torch.randn(2, 3, 200)
    w8a8 = FP8Linear(w, None, mode="inference")
    w8a16 = FP8Linear(w, None, mode="inference", activations="none")
    # the W8A8 module exported weight-only equals the W8A16 module, and vice versa
    r = export_onnx(w8a8, tmp_path / "a.onnx", example_inputs=(x,), activations="none")
    assert r.activations == "none" and "QuantizeLinear" not in r.op_counts
    assert compare_with_torch(w8a16, r.path, (x,))["rel"] <= 1e-6
    r = export_onnx(w8a16, tmp_path / "b.onnx", example_inputs=(x,), activations="fp8")
    assert r.activations == "fp8" and r.op_counts["QuantizeLinear"] == 1
    assert compare_with_torch(w8a8, r.path, (x,))["rel"] <= 1e-6
    r = export_onnx(w8a16, tmp_path / "c.onnx", example_inputs=(x,))
    assert compare_with_torch(w8a16, r.path, (x,))["rel"] <= 1e-6
    assert check_fp8_linears(r.path, (x,))["w8a16"] == 1


def test_training_mode_linear_exports_with_in_graph_weight_quantization(tmp_path):
    torch.manual_seed(0)
    lin = FP8Linear.from_linear(torch.nn.Linear(300, 140), mode="training")
    x = torch.randn(2, 6, 300)
    r = export_onnx(lin, tmp_path / "t.onnx", example_inputs=(x,))
    assert r.op_counts["QuantizeLinear"] == 2  # weight 128x128 blocks, activations 1x128
    assert compare_with_torch(lin, r.path, (torch.randn(3, 4, 300),))["rel"] <= 1e-6


def test_fp8_reference_quantizer_matches_onnxruntime_bit_for_bit():
    """ORT's QuantizeLinear -> FLOAT8E4M3FN (blocked, saturate) == (x / s).to(fp8): every fp8
    midpoint and its neighbours, saturation, subnormals, partial last block."""
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper as h

    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([mid, mid.nextafter(torch.tensor(1e9)), mid.nextafter(torch.tensor(-1e9)),
                      grid, torch.tensor([464.0, 465, 1e6, -1e6, 2.0**-10, 1.5 * 2.0**-9])])
    torch.manual_seed(0)
    m, k = 64, 300
    x = torch.randn(m, k) * torch.exp(torch.randn(m, k) * 3)
    x.view(-1)[: vals.numel()] = vals
    s = torch.exp(torch.randn(m, 3))
    s[:4] = 1.0  # exact midpoints stay midpoints
    graph = h.make_graph(
        [h.make_node("QuantizeLinear", ["x", "s"], ["q"], axis=1, block_size=128, saturate=1,
                     output_dtype=TP.FLOAT8E4M3FN)], "g",
        [h.make_tensor_value_info("x", TP.FLOAT, [m, k]),
         h.make_tensor_value_info("s", TP.FLOAT, [m, 3])],
        [h.make_tensor_value_info("q", TP.FLOAT8E4M3FN, [m, k])])
    sess = ort.InferenceSession(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
                                .SerializeToString(), providers=["CPUExecutionProvider"])
    q = np.asarray(sess.run(None, {"x": x.numpy(), "s": s.numpy()})[0]).view(np.uint8)
    expected = (x / s.repeat_interleave(128, 1)[:, :k]).to(ref.FP8_DTYPE)
    assert (q == expected.view(torch.uint8).numpy()).all()



@pytest.mark.parametrize("activations, left", [("none", 0), ("fp8", 1)])
def test_weight_dequantization_is_folded_at_session_load(tmp_path, activations, left):
    """make_session(fold_weight_dequantization=True, the default): onnxruntime dequantizes the
    FP8 weight initializers once (no weight DequantizeLinear left in the optimized graph; W8A8
    keeps its activation QDQ) and gives what dequantizing on every run gives, but for the
    summation order of a prepacked MatMul."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    lin = FP8Linear(torch.randn(136, 200), torch.randn(136), mode="inference",
                    activations=activations)
    report = _linear_case(tmp_path, lin, torch.randn(2, 5, 200))
    x = {"x": (torch.randn(3, 7, 200) * 3).numpy()}
    outs = {}
    for fold in (False, True):
        session = make_session(report.path, ["CPUExecutionProvider"],
                               fold_weight_dequantization=fold)
        outs[fold] = session.run(None, x)[0]
    scale = np.abs(outs[False]).max()
    assert np.abs(outs[True] - outs[False]).max() <= 1e-6 * scale
    assert compare_with_torch(lin, session, {"x": torch.from_numpy(x["x"])})["rel"] <= 1e-6
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    ort.InferenceSession(str(report.path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("DequantizeLinear") == left  # W8A8: the activation's, per call
    with pytest.raises(ValueError, match="fold_weight_dequantization"):
        make_session(report.path, fold_weight_dequantization="yes")
