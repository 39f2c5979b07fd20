"""targets/onnx/cleanup.py: the onnx_ir clean-up passes on small hand-made graphs (FP8 data
movement folded bit-exactly, FP8 never constant-folded to fp32, dims renamed, node metadata
stripped) and op_counts over subgraphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper
from rewriter.targets.onnx.cleanup import (
    FoldFP8DataMovement,
    InterfaceNames,
    RenameDims,
    StripNodeMetadata,
    WidenFP8Operands,
    count_fp8_initializers,
    ir_op_counts,
    op_counts,
    optimize,
)


def _fp8(shape, seed=0) -> tuple[onnx.TensorProto, torch.Tensor]:
    """A FLOAT8E4M3FN initializer of random bits (NaN codes avoided) and its torch tensor."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 126, shape, generator=gen, dtype=torch.uint8)  # finite codes
    bits |= torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8) << 7  # signs
    t = bits.view(torch.float8_e4m3fn)
    proto = h.make_tensor("w", TP.FLOAT8E4M3FN, list(shape), bits.numpy().tobytes(), raw=True)
    return proto, t


def _stacked_expert_model():
    """(E=3, N=5, K=130) FP8 stack -> Gather expert 1 -> Transpose -> blocked DequantizeLinear
    -> MatMul: the shape an MoE block's FP8 weights take after export."""
    w, t = _fp8((3, 5, 130))
    scale = numpy_helper.from_array(np.array([[0.5, 2.0, 1.0, 0.25, 4.0],
                                              [1.5, 0.75, 3.0, 1.0, 2.0]], np.float32), "s")
    e = numpy_helper.from_array(np.array(1, np.int64), "e")
    nodes = [
        h.make_node("Gather", ["w", "e"], ["w1"], axis=0),  # (5, 130) FP8: invalid ONNX
        h.make_node("Transpose", ["w1"], ["w1t"], perm=[1, 0]),  # (130, 5)
        h.make_node("DequantizeLinear", ["w1t", "s"], ["wf"], axis=0, block_size=128),
        h.make_node("MatMul", ["x", "wf"], ["y"]),
    ]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, ["s0", 130])],
                         [h.make_tensor_value_info("y", TP.FLOAT, ["s0", 5])], [w, scale, e])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    return model, t, scale


def test_fp8_data_movement_folds_into_new_fp8_initializers_bit_exactly():
    proto, t, scale = _stacked_expert_model()
    x = np.random.default_rng(0).standard_normal((7, 130)).astype(np.float32)
    model = ir.serde.deserialize_model(proto)
    result = FoldFP8DataMovement()(model)
    assert result.modified
    assert ir_op_counts(model) == {"DequantizeLinear": 1, "MatMul": 1}
    assert count_fp8_initializers(model) == 1  # the stack is gone, expert 1 transposed stays
    (init,) = [v for v in model.graph.initializers.values()
               if v.dtype == ir.DataType.FLOAT8E4M3FN]
    expected = t[1].T.contiguous().view(torch.uint8).numpy()
    assert init.shape == ir.Shape([130, 5])
    assert np.array_equal(init.const_value.numpy().view(np.uint8), expected)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    y = ort.InferenceSession(out.SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    s = torch.from_numpy(numpy_helper.to_array(scale).copy()).repeat_interleave(128, 0)[:130]
    ref = torch.from_numpy(x) @ (t[1].T.float() * s)
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert not FoldFP8DataMovement()(model).modified  # nothing left to fold


def test_fp8_slice_with_run_time_bounds_runs_in_float16_exactly():
    """A Slice of an FP8 weight whose end is computed at run time (the input's length) cannot
    be folded: it is widened to float16 and narrowed back, so the file is valid and exact."""
    w, t = _fp8((9, 130), seed=3)
    scale = numpy_helper.from_array(np.array([[0.5, 2.0]], np.float32).T.repeat(9, 1).T, "s")
    nodes = [
        h.make_node("Shape", ["x"], ["xs"], start=0, end=1),  # (1,): the number of rows n
        h.make_node("Slice", ["w", "zero", "xs"], ["wn"]),  # (n, 130) FP8: invalid ONNX
        h.make_node("Transpose", ["wn"], ["wt"], perm=[1, 0]),  # (130, n)
        h.make_node("Slice", ["s", "zero", "xs"], ["sn"]),  # (n, 2) scales
        h.make_node("Transpose", ["sn"], ["st"], perm=[1, 0]),
        h.make_node("DequantizeLinear", ["wt", "st"], ["wf"], axis=0, block_size=128),
        h.make_node("MatMul", ["x", "wf"], ["y"]),  # (n, 130) @ (130, n)
    ]
    zero = numpy_helper.from_array(np.array([0], np.int64), "zero")
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, ["n", 130])],
                         [h.make_tensor_value_info("y", TP.FLOAT, ["n", "n"])],
                         [w, scale, zero])
    model = ir.serde.deserialize_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]))
    optimize(model, fold=True)
    ops = ir_op_counts(model)
    assert ops["Cast"] == 2 and ops["DequantizeLinear"] == 1, ops  # fp8 -> fp16 -> fp8
    assert count_fp8_initializers(model) == 1  # the file keeps the FP8 bytes
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (4, 7):
        x = np.random.default_rng(n).standard_normal((n, 130)).astype(np.float32)
        s = torch.from_numpy(numpy_helper.to_array(scale)[:n].T.copy()).repeat_interleave(
            128, 0)[:130]
        ref = torch.from_numpy(x) @ (t[:n].T.float() * s)
        y = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert not WidenFP8Operands()(model).modified  # nothing left on FP8 that needs it


def test_optimize_never_folds_fp8_into_fp32():
    proto, _, _ = _stacked_expert_model()
    model = ir.serde.deserialize_model(proto)
    optimize(model, fold=True)
    ops = ir_op_counts(model)
    assert ops == {"DequantizeLinear": 1, "MatMul": 1}, ops
    floats = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT]
    assert all(v.const_value.numpy().size <= 10 for v in floats)  # scales, no (130, 5) copy
    assert count_fp8_initializers(model) == 1


def test_rename_dims_and_strip_metadata():
    proto, _, _ = _stacked_expert_model()
    model = ir.serde.deserialize_model(proto)
    for node in model.graph:
        node.metadata_props["pkg.torch.onnx.stack_trace"] = "File x.py, line 1" * 50
    assert StripNodeMetadata()(model).modified
    assert all(not node.metadata_props for node in model.graph)
    assert not StripNodeMetadata()(model).modified
    assert RenameDims({"s0": "batch"})(model).modified
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "130"]
    assert [str(d) for d in model.graph.outputs[0].shape] == ["batch", "5"]
    assert not RenameDims({"s9": "sequence"})(model).modified


def test_op_counts_walks_subgraphs_and_functions(tmp_path):
    branch = h.make_graph([h.make_node("Neg", ["a"], ["b"]), h.make_node("Abs", ["b"], ["c"])],
                          "then", [], [h.make_tensor_value_info("c", TP.FLOAT, [2])])
    other = h.make_graph([h.make_node("Relu", ["a"], ["d"])], "else", [],
                         [h.make_tensor_value_info("d", TP.FLOAT, [2])])
    graph = h.make_graph(
        [h.make_node("Neg", ["a"], ["n"]),
         h.make_node("If", ["cond"], ["o"], then_branch=branch, else_branch=other)],
        "g", [h.make_tensor_value_info("a", TP.FLOAT, [2]),
              h.make_tensor_value_info("cond", TP.BOOL, [])],
        [h.make_tensor_value_info("o", TP.FLOAT, [2])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    expected = {"Neg": 2, "If": 1, "Abs": 1, "Relu": 1}
    assert op_counts(model) == expected
    onnx.save(model, str(tmp_path / "if.onnx"))
    assert op_counts(tmp_path / "if.onnx") == expected
    assert ir_op_counts(ir.serde.deserialize_model(model)) == expected


def test_a_folder_failure_leaves_the_graph_unfolded_with_a_warning(tmp_path, monkeypatch):
    """onnxscript's folder raised on ProphetNet's SplitToSequence: the export goes on."""
    import pytest
    from rewriter.targets.onnx import cleanup, export_onnx
    from rewriter.targets.onnx_runtime import compare_with_torch

    def broken(*args, **kwargs):
        raise RuntimeError("Error during constant folding for node 'n' (::SplitToSequence)")

    monkeypatch.setattr(cleanup, "fold_constants", broken)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 6))
    x = torch.randn(2, 3, 6)
    with pytest.warns(UserWarning, match="constant folding stopped early"):
        r = export_onnx(model, tmp_path / "m.onnx", example_inputs=(x,))
    assert compare_with_torch(model, r.path, (torch.randn(3, 5, 6),))["rel"] <= 1e-6


def test_interface_names_split_an_input_returned_as_an_output():
    """The state torch.onnx.export leaves for ``return {"out": hidden * scale, "res": hidden,
    "dup": out}``: the input value renamed to its output's name, one value as two outputs.
    InterfaceNames gives the inputs the argument names back and each output its own value."""
    f32 = ir.TensorType(ir.DataType.FLOAT)
    hidden = ir.Value(name="res", type=f32, shape=ir.Shape(["s0", 3, 5]))
    scale = ir.Value(name="scale", type=f32, shape=ir.Shape([]))
    mul = ir.node("Mul", [hidden, scale])
    mul.outputs[0].name = "hidden"  # an intermediate holding a wanted name: renamed away
    mul.outputs[0].type, mul.outputs[0].shape = f32, ir.Shape(["s0", 3, 5])
    graph = ir.Graph([hidden, scale], [mul.outputs[0], hidden, mul.outputs[0]], nodes=[mul],
                     name="g", opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    assert InterfaceNames(["hidden", "scale"], ["out", "res", "dup"])(model).modified
    assert [v.name for v in graph.inputs] == ["hidden", "scale"]
    assert [v.name for v in graph.outputs] == ["out", "res", "dup"]
    assert len({id(v) for v in graph.outputs}) == 3
    assert not any(v.is_graph_input() for v in graph.outputs)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((2, 3, 5)).astype(np.float32)
    out, res, dup = session.run(None, {"hidden": x, "scale": np.array(-1.25, np.float32)})
    np.testing.assert_array_equal(res, x)
    np.testing.assert_array_equal(out, x * np.float32(-1.25))
    np.testing.assert_array_equal(dup, out)
    assert not InterfaceNames(["hidden", "scale"], ["out", "res", "dup"])(model).modified
