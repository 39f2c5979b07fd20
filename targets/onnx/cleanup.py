"""Clean-up of the exported graph, as ``onnx_ir`` passes.

:func:`optimize` is onnxscript's optimizer minus its pattern rewriter (most of the export time
on small graphs, and onnxruntime does the same fusions at load): inlining, constant folding
(never of anything touching FP8, so FP8 weights stay FP8 and ``DequantizeLinear`` is never
folded into an fp32 copy), :class:`FoldFP8DataMovement` (FP8 weight slicing folded into
per-expert initializers), dead-code removal, CSE (shared activation QDQ of q/k/v), and
:class:`WidenFP8Operands` for what could not be folded.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants

__all__ = [
    "FoldConstants",
    "InterfaceNames",
    "FoldFP8DataMovement",
    "RenameDims",
    "StripNodeMetadata",
    "WidenFP8Operands",
    "count_fp8_initializers",
    "ir_op_counts",
    "op_counts",
    "optimize",
]


def op_counts(model_proto) -> dict[str, int]:
    """op_type -> count over the main graph, its subgraphs and functions (ONNX ModelProto or
    path; external data is not loaded)."""
    if isinstance(model_proto, (str, os.PathLike)):
        model_proto = onnx.load(str(model_proto), load_external_data=False)
    counts: Counter = Counter()

    def walk(graph):
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model_proto.graph)
    for fn in model_proto.functions:
        for node in fn.node:
            counts[node.op_type] += 1
    return dict(counts)


def ir_op_counts(model: ir.Model) -> dict[str, int]:
    """op_type -> count over an onnx_ir model's graph and subgraphs."""
    return dict(Counter(node.op_type
                        for node in ir.traversal.RecursiveGraphIterator(model.graph)))


def count_fp8_initializers(model: ir.Model) -> int:
    """Number of FLOAT8E4M3FN initializers."""
    return sum(1 for v in model.graph.initializers.values()
               if v.dtype == ir.DataType.FLOAT8E4M3FN)


def _touches_fp8(node: ir.Node) -> bool | None:
    """``should_fold`` of the generic folder: never nodes on FP8 values (its evaluator's
    float8 support varies by version); :class:`FoldFP8DataMovement` folds those bit-exactly."""
    if any(v is not None and v.dtype == ir.DataType.FLOAT8E4M3FN
           for v in list(node.inputs) + list(node.outputs)):
        return False
    return None


class FoldConstants(ir.passes.InPlacePass):
    """onnxscript's public constant folder (with shape inference), FP8 nodes excluded. When the
    folder itself fails on a node (its SplitToSequence rewrite on ProphetNet's graph), folding
    stops there with a warning: it is an optimisation, and every fold it made is complete."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            result = fold_constants(model, onnx_shape_inference=True, should_fold=_touches_fp8)
        except Exception as e:
            warnings.warn(f"ONNX constant folding stopped early (onnxscript: {e}); the rest of "
                          "the graph is exported unfolded", stacklevel=2)
            return ir.passes.PassResult(model, False)
        return ir.passes.PassResult(model, bool(result.modified))


def _np_slice(data, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else [int(a) % data.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * data.ndim
    for a, s, e, st in zip(axes, starts, ends, steps):
        index[a] = slice(int(s), int(e), int(st))
    return [data[tuple(index)]]


def _np_fold(node: ir.Node, data: np.ndarray, rest: list) -> list[np.ndarray] | None:
    """numpy value(s) of a data-movement node on a constant; None when not handled."""
    attrs = {k: a.value for k, a in node.attributes.items()}
    op = node.op_type
    if op == "Slice":
        return _np_slice(data, *rest)
    if op == "Squeeze":
        axes = rest[0] if rest else [i for i, d in enumerate(data.shape) if d == 1]
        return [np.squeeze(data, axis=tuple(int(a) for a in axes))]
    if op == "Unsqueeze":
        out = data
        for a in sorted(int(a) % (data.ndim + len(rest[0])) for a in rest[0]):
            out = np.expand_dims(out, a)
        return [out]
    if op == "Gather":
        return [np.take(data, rest[0].astype(np.int64), axis=int(attrs.get("axis", 0)))]
    if op == "Split":
        axis = int(attrs.get("axis", 0))
        if rest and rest[0] is not None:
            bounds = np.cumsum(rest[0])[:-1]
        else:
            size = -(-data.shape[axis] // len(node.outputs))
            bounds = list(range(size, data.shape[axis], size))
        return np.split(data, bounds, axis=axis)
    if op == "Reshape" and 0 not in list(rest[0]):
        return [data.reshape([int(d) for d in rest[0]])]
    if op == "Transpose":
        return [np.transpose(data, attrs.get("perm"))]
    if op == "Identity":
        return [data]
    return None


class FoldFP8DataMovement(ir.passes.InPlacePass):
    """Slice/Squeeze/Gather/Split/Transpose... of an FP8 initializer -> new FP8 initializers.

    ONNX defines Slice, Gather and Split only up to IR-4 types: on FLOAT8E4M3FN they are
    invalid. They appear where an MoE block takes expert e's weight out of the stacked
    (E, N, K) FP8 buffer, and where a weight is transposed for MatMul; folding them stores one
    FP8 initializer per expert (same bytes) and leaves DequantizeLinear as the only consumer
    of FP8 weights."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        made = 0
        changed, modified = True, False
        while changed:
            changed = False
            for node in list(graph):
                data = node.inputs[0] if node.inputs else None
                if data is None or data.dtype != ir.DataType.FLOAT8E4M3FN \
                        or node.op_type == "DequantizeLinear" or data.const_value is None:
                    continue
                rest = [None if v is None or v.const_value is None else v.const_value.numpy()
                        for v in node.inputs[1:]]
                if any(r is None for v, r in zip(node.inputs[1:], rest) if v is not None):
                    continue
                values = _np_fold(node, data.const_value.numpy(), rest)
                if values is None or len(values) != len(node.outputs):
                    continue
                for out, arr in zip(node.outputs, values):
                    made += 1
                    name = f"{data.name.split('.fp8_')[0]}.fp8_{made}"
                    new = ir.Value(name=name, shape=ir.Shape(arr.shape),
                                   type=ir.TensorType(ir.DataType.FLOAT8E4M3FN),
                                   const_value=ir.Tensor(np.ascontiguousarray(arr), name=name))
                    graph.register_initializer(new)
                    ir.convenience.replace_all_uses_with(out, new)
                    if out in graph.outputs:
                        graph.outputs[graph.outputs.index(out)] = new
                graph.remove(node, safe=True)
                if not data.uses() and data.is_initializer() and data not in graph.outputs:
                    graph.initializers.pop(data.name)
                changed = modified = True
        return ir.passes.PassResult(model, modified)


_FP8_TYPE = "tensor(float8e4m3fn)"


def _fp8_formals(node: ir.Node, opset: int) -> tuple[list[str | None], list[str | None]]:
    """The type parameters (e.g. ``T``) of ``node``'s inputs and outputs whose ONNX schema at
    ``opset`` does NOT allow FLOAT8E4M3FN (None where it does, or for an op onnx does not know:
    a custom domain is not ours to judge)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except Exception:
        return [None] * len(node.inputs), [None] * len(node.outputs)
    allowed = {t.type_param_str: _FP8_TYPE in t.allowed_type_strs
               for t in schema.type_constraints}

    def params(formals, n):
        out = []
        for i in range(n):
            f = formals[min(i, len(formals) - 1)] if formals else None
            ok = f is None or allowed.get(f.type_str, f.type_str == _FP8_TYPE)
            out.append(None if ok else f.type_str)
        return out

    return params(list(schema.inputs), len(node.inputs)), \
        params(list(schema.outputs), len(node.outputs))


class WidenFP8Operands(ir.passes.InPlacePass):
    """An op whose schema at the model's opset does not take FLOAT8E4M3FN (Slice, Gather,
    Split, Concat at opset <= 21), left on an FP8 value that could not be folded (its indices
    are computed at run time, e.g. where the constant folder stopped early: ProphetNet), runs
    in float16: each FP8 input is ``Cast`` to float16, and each output of the same type
    parameter cast back. Exact both ways: every E4M3 value is a float16 value, and data
    movement creates no new values. Without it the file fails ``onnx.checker`` (and
    onnxruntime's shape inference)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 21)
        fp8, half = ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT16
        modified = False
        for node in list(graph):
            ins, outs = _fp8_formals(node, opset)
            bad = [i for i, (v, t) in enumerate(zip(node.inputs, ins))
                   if v is not None and v.dtype == fp8 and t is not None]
            if not bad:
                continue
            widened = {ins[i] for i in bad}  # type parameters now float16
            for i in bad:
                cast = ir.node("Cast", inputs=[node.inputs[i]], attributes={"to": half})
                cast.outputs[0].type = ir.TensorType(half)
                cast.outputs[0].shape = node.inputs[i].shape
                graph.insert_before(node, cast)
                node.replace_input_with(i, cast.outputs[0])
            for out, t in zip(node.outputs, outs):
                if t not in widened:
                    continue
                back = ir.node("Cast", inputs=[out], attributes={"to": fp8})
                back.outputs[0].type, back.outputs[0].shape = ir.TensorType(fp8), out.shape
                for user, index in list(out.uses()):
                    if user is not back:
                        user.replace_input_with(index, back.outputs[0])
                if out in graph.outputs:
                    graph.outputs[graph.outputs.index(out)] = back.outputs[0]
                out.type = ir.TensorType(half)
                graph.insert_after(node, back)
            modified = True
        return ir.passes.PassResult(model, modified)


class StripNodeMetadata(ir.passes.InPlacePass):
    """Drop the exporter's per-node debug metadata (stack traces, FX nodes, module paths):
    ~1 KB a node, more than the weights of a small model."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            modified |= bool(node.metadata_props)
            node.metadata_props.clear()
        return ir.passes.PassResult(model, modified)


class RenameDims(ir.passes.InPlacePass):
    """Rename symbolic dims (s0 -> batch, ...) everywhere in the graph."""

    def __init__(self, mapping: dict[str, str]):
        super().__init__()
        self.mapping = dict(mapping)

    def _fix(self, value: ir.Value) -> bool:
        shape = value.shape
        if shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value in self.mapping
                                    for d in shape):
            return False
        value.shape = ir.Shape([ir.SymbolicDim(self.mapping[d.value])
                                if isinstance(d, ir.SymbolicDim) and d.value in self.mapping
                                else d for d in shape])
        return True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for value in list(graph.inputs) + list(graph.outputs):
            modified |= self._fix(value)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for value in node.outputs:
                modified |= self._fix(value)
        return ir.passes.PassResult(model, modified)


class InterfaceNames(ir.passes.InPlacePass):
    """Give the graph's inputs and outputs the names asked for, by position.

    ``torch.onnx.export`` names inputs and outputs by renaming *values*: a forward that returns
    one of its inputs (``return {"out": ..., "res": hidden}``) or one tensor twice has one value
    in two places, and the last name wins (the input became ``res``, then ``OutputFixPass``
    made it ``res_orig``). Here ``OutputFixPass`` first gives every such output its own
    ``Identity`` value (ONNX forbids an input as an output and a value as two outputs), then
    the inputs take the forward's argument names and the outputs theirs; ``NameFixPass``
    renames any other value that held one of those names (interface names take precedence)."""

    def __init__(self, inputs: list[str], outputs: list[str]):
        super().__init__()
        self.inputs, self.outputs = list(inputs), list(outputs)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = common.OutputFixPass()(model).modified
        for values, names in ((graph.inputs, self.inputs), (graph.outputs, self.outputs)):
            if len(values) != len(names):
                raise ValueError(f"the graph has {len(values)} inputs/outputs "
                                 f"{[v.name for v in values]}, {len(names)} names given")
            for value, name in zip(values, names):
                if value.name != name:
                    value.name = name
                    modified = True
        if modified:
            common.NameFixPass()(model)
        return ir.passes.PassResult(model, modified)


def optimize(model: ir.Model, fold: bool) -> None:
    """Clean ``model`` in place (see the module docstring); ``fold=False``: inline and remove
    dead code only (FP8 data movement is folded, or else widened, either way: the graph is
    invalid without)."""
    passes: list[ir.passes.PassBase] = [common.InlinePass()]
    if fold:
        passes.append(ir.passes.PassManager([FoldConstants(), common.RemoveUnusedNodesPass()],
                                            steps=2, early_stop=True))
    passes += [FoldFP8DataMovement(), WidenFP8Operands(), common.RemoveUnusedNodesPass(),
               common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()]
    if fold:
        passes += [common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                   common.DeduplicateInitializersPass(),
                   common.CommonSubexpressionEliminationPass()]
    passes += [common.OutputFixPass(), common.NameFixPass()]
    ir.passes.Sequential(*passes)(model)
