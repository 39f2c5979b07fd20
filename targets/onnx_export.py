"""ONNX export of dense, MoE and FP8 models: ``export_onnx(model, path, example_inputs=...)``.

    report = export_onnx(model, "model.onnx", example_inputs=(ids,))   # ExportReport
    report = export_onnx(fp8_moe, "m.onnx", example_inputs={"input_ids": ids},
                         activations="none", dense_moe=False, external_data=None)

What it emits:

- ``torch.export`` (non-strict) capture, then ``torch.onnx.export`` (dynamo) of the program;
  batch and sequence axes of every input are dynamic and named ``batch`` / ``sequence``;
  inputs and outputs are named (forward's parameter names or the dict keys; ``logits``,
  HF output fields, ...); ``onnx.checker`` full check of the saved file.
- MoE blocks (:class:`rewriter.models.moe.MoEFFN`): sparse routing. TopK picks the experts, then per
  expert ``Equal -> NonZero -> Gather`` collects its tokens, the expert runs on those rows
  only and ``ScatterND(reduction=add)`` adds them back, so an expert no token chose costs
  nothing (it runs on zero rows). ``dense_moe=True`` runs every expert on every token and
  weights them by a (T, E) matrix that is zero off the top-k (static shapes, more FLOPs).
- FP8 (:mod:`rewriter.targets.fp8_ops`): the weights stay FLOAT8E4M3FN initializers dequantized by a
  blocked ``DequantizeLinear`` (opset 21+, ``block_size=128`` along K; the 128x128 block
  scales are expanded to one row per weight row). Each weight is stored transposed, W^T
  (K, N) with [K/128, N] scales (the [N, K/128] layout, transposed), so ``MatMul`` takes
  ``DequantizeLinear``'s output directly, with no per-run Transpose of a dequantized weight;
  MoE experts get one initializer each (Slice/Gather are not defined on FLOAT8 in ONNX, so
  the stacked expert buffer is split at export). Activations, ``"fp8"`` (W8A8): per 1x128 tile
  ``amax`` in the graph, scale ``amax/448`` (zero tile: 1), ``QuantizeLinear`` to
  FLOAT8E4M3FN (saturate) and ``DequantizeLinear`` back, then an fp32 ``MatMul``; ``"none"``
  (W8A16): the activations stay in their precision. onnxruntime's QuantizeLinear divides by
  the scale and rounds to nearest even, saturating at 448, exactly like
  ``(x / s).to(torch.float8_e4m3fn)``: the quantized values are bit-identical to
  :mod:`rewriter.targets.fp8`; only the matmul's summation order differs (~1e-7 relative).
  DequantizeLinear is never constant-folded by the exporter's optimizer, so no fp32 copy of
  an FP8 weight reaches the file (checked before saving).
- FP8 embedding tables (:mod:`rewriter.targets.fp8_embedding`, ``FP8Config(embeddings="fp8")``): one
  FLOAT8E4M3FN (V, d) initializer and (V,) fp32 row scales. ONNX defines Gather on no FLOAT8
  type, so the lookup is ``Cast(table, FLOAT)`` (exact) -> ``Gather`` rows -> ``Mul`` by the
  ``Gather``-ed row scales: only the looked-up rows are scaled, and the Cast is a constant
  subgraph that the exporter never folds (the file keeps FP8) and onnxruntime folds once at
  session load. A head tied to the table is ``Gemm(x, Cast(table), transB=1) * scales`` on
  the same initializer (the two Casts merge): the file holds one FP8 table.
- Metadata props: the conversion config (experts, top_k, shared width, FP8 recipe), read from
  the model's ``rewriter_conversion`` attribute (duck-typed) or given as ``config=``.

Errors: bad arguments (opset too old for FP8, unknown activation mode, a path that cannot be
written) raise :class:`ExportInputError` before anything runs; a model the exporter cannot
handle raises :class:`OnnxExportError` naming the stage and the node / op. The file is written
to a temporary folder beside ``path`` and moved into place only after the checker passed:
nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rewriter.models.moe import MoEFFN
from torch import Tensor, nn

from rewriter.errors import ExportInputError, OnnxExportError

from . import fp8_ops  # noqa: F401  (registers torch.ops.rewriter.*)
from .fp8 import BLOCK, E4M3_MAX
from .fp8_embedding import FP8Embedding
from .fp8_linear import FP8Linear, FP8MoEFFN

__all__ = [
    "ACTIVATION_MODES",
    "DEFAULT_OPSET",
    "FP8_MIN_OPSET",
    "MAX_OPSET",
    "ExportInputError",
    "ExportReport",
    "OnnxExportError",
    "export_onnx",
    "fp8_translation_table",
    "op_counts",
]

DEFAULT_OPSET = 20  # models without FP8
FP8_MIN_OPSET = 21  # DequantizeLinear / QuantizeLinear with block_size, FLOAT8 in QDQ
MIN_OPSET = 18  # torchlib's own opset: the oldest the dynamo exporter writes
MAX_OPSET = 23
ACTIVATION_MODES = ("fp8", "none")
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights above which they go to a .data file
DIM_NAMES = ("batch", "sequence")
_ops = torch.ops.rewriter


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote."""

    path: Path
    data_path: Path | None  # external-data file, when used
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    activations: str | None  # FP8 activation mode of the graph ("fp8", "none", None: no FP8)
    dense_moe: bool
    moe_blocks: int
    fp8_initializers: int  # FLOAT8E4M3FN initializers
    file_bytes: int  # .onnx plus external data
    metadata: Mapping[str, str]
    op_counts: Mapping[str, int] = field(repr=False)
    seconds: float = 0.0

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items(),
                                                     key=lambda kv: -kv[1])[:12])
        return (f"{self.path} ({self.file_bytes / 1e6:.2f} MB"
                + (f" with {self.data_path.name}" if self.data_path else "")
                + f"), opset {self.opset}, inputs {list(self.input_names)}, outputs "
                f"{list(self.output_names)}, MoE blocks {self.moe_blocks}"
                + (" (dense)" if self.dense_moe and self.moe_blocks else "")
                + (f", FP8 activations {self.activations!r}, {self.fp8_initializers} FP8 "
                   "initializers" if self.activations else "")
                + f", {self.seconds:.1f} s\n  ops: {ops}")


# =============================================================================================
# FP8 translation functions (onnxscript, traced by the exporter)
# =============================================================================================


def _opset():
    from onnxscript import opset21

    return opset21


def _ints(values: Sequence[int]):
    return _opset().Constant(value_ints=[int(v) for v in values])


def _static_dims(value, what: str) -> tuple[int, ...]:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        raise ValueError(f"{what} needs a static shape for FP8 export, got {shape}")
    return tuple(shape)


def _expand_block_scale(w_s, n: int, kb: int | None = None):
    """(ceil(N/128), Kb) block scales -> (N, Kb): one row per weight row (blocked QDQ)."""
    op = _opset()
    nb = math.ceil(n / BLOCK)
    kb = _static_dims(w_s, "weight scale")[1] if kb is None else kb
    s = op.Unsqueeze(w_s, _ints([1]))  # (Nb, 1, Kb)
    s = op.Expand(s, _ints([nb, BLOCK, kb]))  # (Nb, 128, Kb)
    s = op.Reshape(s, _ints([nb * BLOCK, kb]))  # (Nb*128, Kb)
    if nb * BLOCK != n:
        s = op.Slice(s, _ints([0]), _ints([n]), _ints([0]))  # (N, Kb)
    return s


def _dequant_weight(w_q, w_s, shape: tuple[int, int] | None = None):
    """FLOAT8E4M3FN (N, K) and (Nb, Kb) scales -> fp32 (N, K) via blocked DequantizeLinear."""
    n, k = _static_dims(w_q, "FP8 weight") if shape is None else shape
    return _opset().DequantizeLinear(w_q, _expand_block_scale(w_s, n, math.ceil(k / BLOCK)),
                                     axis=1, block_size=BLOCK)


def _dequant_weight_t(w_q, w_s):
    """Stored FP8 weight (N, K) -> fp32 W^T (K, N): the FP8 initializer is stored transposed
    (the Transpose is folded at export: one FLOAT8E4M3FN (K, N) initializer) and dequantized
    along axis 0 with (ceil(K/128), N) scales, so MatMul(x, DequantizeLinear(W^T)) needs no
    per-run Transpose of the weight."""
    op = _opset()
    n, k = _static_dims(w_q, "FP8 weight")
    nb, kb = math.ceil(n / BLOCK), math.ceil(k / BLOCK)
    s = op.Transpose(w_s, perm=[1, 0])  # (Kb, Nb)
    s = op.Unsqueeze(s, _ints([2]))  # (Kb, Nb, 1)
    s = op.Expand(s, _ints([kb, nb, BLOCK]))  # (Kb, Nb, 128)
    s = op.Reshape(s, _ints([kb, nb * BLOCK]))  # (Kb, Nb*128)
    if nb * BLOCK != n:
        s = op.Slice(s, _ints([0]), _ints([n]), _ints([1]))  # (Kb, N)
    return op.DequantizeLinear(op.Transpose(w_q, perm=[1, 0]), s, axis=0, block_size=BLOCK)


def _pow2(scale):
    """Next power of two >= scale (log estimate, then corrected both ways)."""
    op = _opset()
    two = op.Constant(value_float=2.0)
    half = op.Constant(value_float=0.5)
    e = op.Ceil(op.Div(op.Log(scale), op.Constant(value_float=math.log(2.0))))
    p = op.Pow(two, e)
    p = op.Where(op.Less(p, scale), op.Mul(p, two), p)
    return op.Where(op.GreaterOrEqual(op.Mul(p, half), scale), op.Mul(p, half), p)


def _compute_scale(amax, pow2: bool):
    op = _opset()
    scale = op.Where(op.Equal(amax, op.Constant(value_float=0.0)), op.Constant(value_float=1.0),
                     op.Div(amax, op.Constant(value_float=E4M3_MAX)))
    return _pow2(scale) if pow2 else scale


def _tile_amax_rows(x2, k: int):
    """x2 (M, K) -> (M, ceil(K/128)) amax of |x| per 1x128 tile (partial last tile)."""
    op = _opset()
    kb = math.ceil(k / BLOCK)
    a = op.Abs(x2)
    if kb * BLOCK != k:
        a = op.Pad(a, _ints([0, 0, 0, kb * BLOCK - k]))  # zeros never raise the amax
    rows = op.Shape(x2, start=0, end=1)
    a = op.Reshape(a, op.Concat(rows, _ints([kb, BLOCK]), axis=0), allowzero=1)  # (M,Kb,128)
    return op.ReduceMax(a, _ints([2]), keepdims=0)  # (M, Kb)


def _quantize_rows(x2, k: int, pow2: bool):
    """x2 (M, K) fp32 -> (q FLOAT8E4M3FN (M, K), s (M, Kb)): 1x128 tiles."""
    from onnx import TensorProto

    op = _opset()
    scale = _compute_scale(_tile_amax_rows(x2, k), pow2)
    q = op.QuantizeLinear(x2, scale, axis=1, block_size=BLOCK, saturate=1,
                          output_dtype=TensorProto.FLOAT8E4M3FN)
    return q, scale


def _qdq_rows(x2, k: int, pow2: bool):
    q, scale = _quantize_rows(x2, k, pow2)
    return _opset().DequantizeLinear(q, scale, axis=1, block_size=BLOCK)


def _as_float(x):
    import onnx_ir as ir
    from onnx import TensorProto

    if x.dtype == ir.DataType.FLOAT:
        return x
    return _opset().Cast(x, to=TensorProto.FLOAT)


def _like(y, x):
    """Cast fp32 ``y`` back to x's dtype (no-op for fp32 activations)."""
    import onnx_ir as ir

    if x.dtype in (None, ir.DataType.FLOAT):
        return y
    return _opset().Cast(y, to=x.dtype.value)


def _linear_onnx(x, wt, bias, *, shape: tuple[int, int], quantize: bool, pow2: bool):
    """y (..., N) = x (..., K) @ wt (+ bias), wt fp32 (K, N), ``shape`` = (N, K); x QDQ'd per
    1x128 if asked."""
    op = _opset()
    n, k = shape
    xf = _as_float(x)
    lead = op.Shape(xf, start=0, end=-1)
    rank = len(x.shape) if x.shape is not None else None
    if quantize:
        x2 = xf if rank == 2 else op.Reshape(xf, _ints([-1, k]))  # (M, K)
        x2 = _qdq_rows(x2, k, pow2)  # (M, K) fp32, on the E4M3 grid times its scale
        y = op.MatMul(x2, wt)  # (M, N)
        if bias is not None:
            y = op.Add(y, _as_float(bias))
        if rank != 2:
            y = op.Reshape(y, op.Concat(lead, _ints([n]), axis=0), allowzero=1)
    else:
        y = op.MatMul(xf, wt)  # (..., N)
        if bias is not None:
            y = op.Add(y, _as_float(bias))
    return _like(y, x)


def _fp8_linear_onnx(x, w_q, w_s, bias=None, pow2=False):
    """rewriter::fp8_linear (W8A8)."""
    return _linear_onnx(x, _dequant_weight_t(w_q, w_s), bias, shape=_static_dims(w_q, "w"),
                        quantize=True, pow2=bool(pow2))


def _fp8_linear_weight_only_onnx(x, w_q, w_s, bias=None, pow2=False):
    """rewriter::fp8_linear exported weight-only (``activations="none"`` override)."""
    return _linear_onnx(x, _dequant_weight_t(w_q, w_s), bias, shape=_static_dims(w_q, "w"),
                        quantize=False, pow2=False)


def _fp8_weight_only_linear_onnx(x, w_q, w_s, bias=None):
    """rewriter::fp8_weight_only_linear (W8A16)."""
    return _linear_onnx(x, _dequant_weight_t(w_q, w_s), bias, shape=_static_dims(w_q, "w"),
                        quantize=False, pow2=False)


def _fp8_weight_only_as_w8a8_onnx(x, w_q, w_s, bias=None):
    """rewriter::fp8_weight_only_linear exported W8A8 (``activations="fp8"`` override)."""
    return _linear_onnx(x, _dequant_weight_t(w_q, w_s), bias, shape=_static_dims(w_q, "w"),
                        quantize=True, pow2=False)


def _quantize_blockwise_onnx(w, pow2: bool):
    """w (N, K) -> (q FLOAT8E4M3FN (N, K), s (Nb, Kb)): 128x128 blocks, in the graph."""
    from onnx import TensorProto

    op = _opset()
    n, k = _static_dims(w, "weight")
    nb, kb = math.ceil(n / BLOCK), math.ceil(k / BLOCK)
    a = op.Abs(_as_float(w))
    if (nb * BLOCK, kb * BLOCK) != (n, k):
        a = op.Pad(a, _ints([0, 0, nb * BLOCK - n, kb * BLOCK - k]))
    a = op.Reshape(a, _ints([nb, BLOCK, kb, BLOCK]))
    scale = _compute_scale(op.ReduceMax(a, _ints([1, 3]), keepdims=0), pow2)  # (Nb, Kb)
    q = op.QuantizeLinear(_as_float(w), _expand_block_scale(scale, n, kb), axis=1,
                          block_size=BLOCK, saturate=1, output_dtype=TensorProto.FLOAT8E4M3FN)
    return q, scale


def _fp8_linear_hp_onnx(x, weight, bias=None, pow2=False):
    """rewriter::fp8_linear_hp (training-mode module, forward only): both operands quantized
    in the graph (the master weight stays high precision in the file)."""
    pow2 = bool(pow2)
    shape = _static_dims(weight, "weight")
    q, s = _quantize_blockwise_onnx(weight, pow2)
    wt = _opset().Transpose(_dequant_weight(q, s, shape), perm=[1, 0])  # (K, N)
    return _linear_onnx(x, wt, bias, shape=shape, quantize=True, pow2=pow2)


def _fp8_quantize_rowwise_onnx(x, pow2=False):
    k = _static_dims(x, "x")[1] if x.shape is not None and isinstance(x.shape[1], int) else None
    if k is None:
        raise ValueError("fp8_quantize_rowwise needs a static reduction dim")
    return _quantize_rows(_as_float(x), k, bool(pow2))


def _fp8_quantize_blockwise_onnx(w, pow2=False):
    return _quantize_blockwise_onnx(w, bool(pow2))


def _fp8_gemm_onnx(a_q, a_s, b_q, b_s, b_rowwise=False, bias=None, out_dtype=None):
    """rewriter::fp8_gemm: C = dequant(A) @ dequant(B)^T (+ bias), fp32."""
    op = _opset()
    a = op.DequantizeLinear(a_q, a_s, axis=1, block_size=BLOCK)
    if b_rowwise:
        b = op.DequantizeLinear(b_q, b_s, axis=1, block_size=BLOCK)
    else:
        b = _dequant_weight(b_q, b_s)
    y = op.MatMul(a, op.Transpose(b, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, _as_float(bias))
    return y


def _fp8_embedding_onnx(ids, table_q, scale):
    """rewriter::fp8_embedding: (...) ids -> (..., d) = Gather(Cast(q), ids) * Gather(s, ids)
    (Gather is not defined on FLOAT8; the Cast of the constant table is folded at load by
    onnxruntime, never by the exporter)."""
    from onnx import TensorProto

    op = _opset()
    table = op.Cast(table_q, to=TensorProto.FLOAT)  # (V, d), exact
    rows = op.Gather(table, ids, axis=0)  # (..., d)
    scale = op.Gather(scale, ids, axis=0)  # (...)
    return op.Mul(rows, op.Unsqueeze(scale, _ints([-1])))


def _fp8_embedding_linear_onnx(x, table_q, scale, bias=None):
    """rewriter::fp8_embedding_linear (tied head, weight-only): (x @ Cast(q)^T) * s (+ b) as
    Gemm(transB=1), so the (V, d) table is never transposed."""
    from onnx import TensorProto

    op = _opset()
    v, d = _static_dims(table_q, "FP8 table")
    xf = _as_float(x)
    rank = len(x.shape) if x.shape is not None else None
    x2 = xf if rank == 2 else op.Reshape(xf, _ints([-1, d]))  # (M, d)
    y = op.Gemm(x2, op.Cast(table_q, to=TensorProto.FLOAT), transB=1)  # (M, V)
    y = op.Mul(y, scale)
    if bias is not None:
        y = op.Add(y, _as_float(bias))
    if rank != 2:
        y = op.Reshape(y, op.Concat(op.Shape(xf, start=0, end=-1), _ints([v]), axis=0),
                       allowzero=1)
    return _like(y, x)


def fp8_translation_table(activations: str | None = None) -> dict:
    """torch op -> onnxscript translation function for every ``rewriter::`` FP8 op.

    ``activations=None`` keeps each op's own mode; ``"fp8"`` exports every FP8 linear as W8A8
    (activations QDQ'd per 1x128 in the graph), ``"none"`` as W8A16 (weight-only)."""
    if activations not in (None, *ACTIVATION_MODES):
        raise ExportInputError(
            f"activations must be one of None, {', '.join(map(repr, ACTIVATION_MODES))}, "
            f"got {activations!r}")
    linear = _fp8_linear_weight_only_onnx if activations == "none" else _fp8_linear_onnx
    weight_only = (_fp8_weight_only_as_w8a8_onnx if activations == "fp8"
                   else _fp8_weight_only_linear_onnx)
    return {
        _ops.fp8_linear.default: linear,
        _ops.fp8_weight_only_linear.default: weight_only,
        _ops.fp8_linear_hp.default: _fp8_linear_hp_onnx,
        _ops.fp8_quantize_rowwise.default: _fp8_quantize_rowwise_onnx,
        _ops.fp8_quantize_blockwise.default: _fp8_quantize_blockwise_onnx,
        _ops.fp8_gemm.default: _fp8_gemm_onnx,
        _ops.fp8_embedding.default: _fp8_embedding_onnx,
        _ops.fp8_embedding_linear.default: _fp8_embedding_linear_onnx,
    }


# =============================================================================================
# MoE: dense all-experts form (behind dense_moe=True)
# =============================================================================================


def _dense_dispatch(block: MoEFFN, x: Tensor, topk_idx: Tensor, weights: Tensor) -> Tensor:
    """Every expert on every token, weighted by a (T, E) matrix that is zero off the top-k:
    static shapes, E/top_k times the expert FLOPs. Same sum, in the same order, as the sparse
    path (an unselected expert adds an exact zero)."""
    dense = torch.zeros(x.shape[0], block.config.num_experts, dtype=weights.dtype,
                        device=weights.device).scatter(1, topk_idx, weights)  # (T, E)
    out = x.new_zeros(x.shape)  # (T, d)
    for e, params in enumerate(block._experts()):
        out = out + block._expert(params, x, dense[:, e])  # (T, d)
    return out


@contextlib.contextmanager
def _moe_dispatch(model: nn.Module, dense: bool):
    """Route every MoE block of ``model`` through the dense form while exporting."""
    blocks = [m for m in model.modules() if isinstance(m, MoEFFN)] if dense else []
    for block in blocks:
        block._dispatch_masked = _bind_dense(block)
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("_dispatch_masked", None)


def _bind_dense(block: MoEFFN):
    def dispatch(x, topk_idx, weights):
        return _dense_dispatch(block, x, topk_idx, weights)

    return dispatch


# =============================================================================================
# inputs, outputs and the module that is exported
# =============================================================================================


def _input_names(model: nn.Module, count: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:count]]
    return names + [f"input_{i}" for i in range(len(names), count)]


def _normalize_inputs(model: nn.Module, example_inputs: Any) -> tuple[list[str], list[Tensor],
                                                                      bool]:
    """-> (names, tensors, as_kwargs)."""
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        names, tensors, kwargs = list(example_inputs), list(example_inputs.values()), True
    elif isinstance(example_inputs, (tuple, list)):
        tensors, kwargs = list(example_inputs), False
        names = _input_names(model, len(tensors))
    else:
        raise ExportInputError("example_inputs must be a tensor, a tuple of tensors or a dict "
                               f"of tensors, got {type(example_inputs).__name__}")
    if not tensors:
        raise ExportInputError("example_inputs is empty: the model needs at least one input")
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise ExportInputError(f"example input {name!r} must be a tensor, got "
                                   f"{type(t).__name__}")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
            raise ExportInputError(f"input name {name!r} is not a valid ONNX name")
    return names, tensors, kwargs


def _flatten_outputs(out: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Model output -> [(name, tensor)]: tensors, tuples, dicts, HF ModelOutputs."""
    if isinstance(out, Tensor):
        return [(prefix or "output", out)]
    if isinstance(out, Mapping) or hasattr(out, "to_tuple") and hasattr(out, "keys"):
        items = [(k, out[k]) for k in out.keys() if out[k] is not None]
        flat = []
        for k, v in items:
            flat += _flatten_outputs(v, f"{prefix}.{k}" if prefix else str(k))
        return flat
    if isinstance(out, (tuple, list)):
        flat = []
        for i, v in enumerate(out):
            if v is not None:
                flat += _flatten_outputs(v, f"{prefix}_{i}" if prefix else f"output_{i}")
        return flat
    return []  # non-tensor leaves (None, ints) are not graph outputs


def _default_output_names(model: nn.Module, flat: list[tuple[str, Tensor]]) -> list[str]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if len(flat) == 1 and flat[0][0] == "output" and isinstance(vocab, int) \
            and flat[0][1].shape[-1:] == (vocab,):
        return ["logits"]
    return [name for name, _ in flat]


class _Exported(nn.Module):
    """The module handed to torch.export: positional inputs, flat tuple of tensor outputs."""

    def __init__(self, model: nn.Module, names: Sequence[str], as_kwargs: bool):
        super().__init__()
        self.model = model
        self._names, self._as_kwargs = tuple(names), as_kwargs

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        if self._as_kwargs:
            out = self.model(**dict(zip(self._names, args)))
        else:
            out = self.model(*args)
        return tuple(t for _, t in _flatten_outputs(out))

    def __repr__(self) -> str:  # the exporter prints the model; keep it cheap and safe
        return f"Exported({type(self.model).__name__})"


def _widen(t: Tensor, dims: Sequence[int]) -> Tensor:
    """Repeat size-1 dynamic dims to 2 so torch.export keeps them symbolic."""
    for d in dims:
        if t.shape[d] == 1:
            t = torch.cat([t, t], dim=d)
    return t


# =============================================================================================
# model facts: FP8, MoE, conversion config
# =============================================================================================


def _fp8_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (FP8Linear, FP8MoEFFN))]


def _fp8_tables(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, FP8Embedding))


def _fp8_mode(model: nn.Module) -> str | None:
    modes = {m.activations for m in _fp8_modules(model)}
    if not modes:
        return None
    return modes.pop() if len(modes) == 1 else "mixed"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_")}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return repr(value)


def _metadata(model: nn.Module, config: Mapping[str, Any] | None, *, activations: str | None,
              dense_moe: bool, opset: int) -> dict[str, str]:
    """String metadata props: the conversion config, what the graph does, versions."""
    meta: dict[str, str] = {}
    info = getattr(model, "rewriter_conversion", None)
    if config is None and info is not None:
        config = {
            "moe": getattr(info, "moe", None),
            "fp8": getattr(info, "fp8", None),
            "modules": list(getattr(info, "modules", ()) or ()),
        }
    blocks = [m for m in model.modules() if isinstance(m, MoEFFN)]
    if config is not None:
        if not isinstance(config, Mapping):
            raise ExportInputError(f"config must be a dict, got {type(config).__name__}")
        conf = _jsonable(dict(config))
        meta["rewriter.conversion"] = json.dumps(conf, sort_keys=True)
        moe, fp8 = conf.get("moe"), conf.get("fp8")
        if isinstance(moe, Mapping):
            for key in ("num_experts", "top_k", "shared_experts", "shared_width", "gate"):
                if moe.get(key) is not None:
                    meta[f"rewriter.moe.{key}"] = str(moe[key])
        if isinstance(fp8, Mapping):
            meta["rewriter.fp8.recipe"] = (
                "deepseek-v3: E4M3, activations 1x128 tiles, weights 128x128 blocks, "
                "fp32 accumulation")
            for key, value in fp8.items():
                meta[f"rewriter.fp8.{key}"] = str(value)
    if blocks:
        cfg = blocks[0].config
        meta.setdefault("rewriter.moe.num_experts", str(cfg.num_experts))
        meta.setdefault("rewriter.moe.top_k", str(cfg.top_k))
        meta["rewriter.moe.blocks"] = str(len(blocks))
        ks = [b.config.top_k for b in blocks]
        if len(set(ks)) > 1:  # MoEConfig(allocation="calibrated")
            meta["rewriter.moe.top_k_per_block"] = ",".join(map(str, ks))
        meta["rewriter.moe.expert_dim"] = str(cfg.expert_dim)
        meta["rewriter.moe.shared_dim"] = str(cfg.shared_dim)
        meta["rewriter.onnx.moe_dispatch"] = "dense" if dense_moe else "sparse"
    if activations is not None:
        meta["rewriter.onnx.fp8_activations"] = activations
        meta["rewriter.onnx.fp8_pow2_scales"] = str(any(
            getattr(m, "pow2", False) for m in _fp8_modules(model)))
        meta["rewriter.onnx.fp8_form"] = (
            "W8A8: weights FLOAT8E4M3FN + blocked DequantizeLinear, activations QDQ per 1x128"
            if activations == "fp8" else
            "W8A16: weights FLOAT8E4M3FN + blocked DequantizeLinear, activations unquantized")
    if _fp8_tables(model):
        meta["rewriter.onnx.fp8_embeddings"] = (
            "tables FLOAT8E4M3FN with one fp32 scale per row; Cast -> Gather -> Mul; tied "
            "heads Gemm on the same table")
    meta["rewriter.onnx.opset"] = str(opset)
    meta["rewriter.torch_version"] = torch.__version__
    return meta


# =============================================================================================
# the graph after export
# =============================================================================================


def op_counts(model_proto) -> dict[str, int]:
    """op_type -> count over the main graph and its subgraphs (ONNX ModelProto or path)."""
    import onnx

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


def _rename_dims(ir_model, mapping: dict[str, str]) -> None:
    """Rename symbolic dims (s0 -> batch, ...) everywhere in the graph."""
    import onnx_ir as ir

    if not mapping:
        return

    def fix(value):
        shape = value.shape
        if shape is None:
            return
        dims = [ir.SymbolicDim(mapping.get(d.value, d.value))
                if isinstance(d, ir.SymbolicDim) and d.value in mapping else d for d in shape]
        value.shape = ir.Shape(dims)

    graph = ir_model.graph
    for value in list(graph.inputs) + list(graph.outputs):
        fix(value)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.outputs:
            fix(value)


def _np_slice(data, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else [int(a) % data.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * data.ndim
    for a, s, e, st in zip(axes, starts, ends, steps):
        index[a] = slice(int(s), int(e), int(st))
    return [data[tuple(index)]]


def _np_fold(node, data, rest):
    """numpy value(s) of a data-movement node on a constant; None when not handled."""
    import numpy as np

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
            n = len(node.outputs)
            size = -(-data.shape[axis] // n)
            bounds = list(range(size, data.shape[axis], size))
        return np.split(data, bounds, axis=axis)
    if op == "Reshape" and 0 not in list(rest[0]):
        return [data.reshape([int(d) for d in rest[0]])]
    if op == "Transpose":
        return [np.transpose(data, attrs.get("perm"))]
    if op == "Identity":
        return [data]
    return None


def _fold_fp8_constants(ir_model) -> int:
    """Slice/Squeeze/Gather/Split... of an FP8 initializer -> new FP8 initializers.

    ONNX defines Slice, Gather and Split only up to IR-4 types: on FLOAT8E4M3FN they are
    invalid. They appear where an MoE block takes expert e's weight out of the stacked
    (E, N, K) FP8 buffer; folding them stores one FP8 initializer per expert instead (same
    bytes) and leaves DequantizeLinear as the only consumer of FP8 weights."""
    import numpy as np
    import onnx_ir as ir

    graph = ir_model.graph
    folded = folded_names = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            data = node.inputs[0] if node.inputs else None
            if data is None or data.dtype != ir.DataType.FLOAT8E4M3FN \
                    or node.op_type == "DequantizeLinear" or data.const_value is None:
                continue
            rest = [None if v is None else (None if v.const_value is None
                                            else v.const_value.numpy()) for v in node.inputs[1:]]
            if any(r is None for v, r in zip(node.inputs[1:], rest) if v is not None):
                continue
            values = _np_fold(node, data.const_value.numpy(), rest)
            if values is None or len(values) != len(node.outputs):
                continue
            for out, arr in zip(node.outputs, values):
                folded_names += 1
                name = f"{data.name.split('.fp8_')[0]}.fp8_{folded_names}"
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
            folded += 1
            changed = True
    return folded


def _leave_fp8_to_us(node) -> bool | None:
    """The generic folder does not fold nodes on FP8 values (its evaluator's float8 support
    varies by version); :func:`_fold_fp8_constants` does, bit-exactly."""
    import onnx_ir as ir

    if any(v is not None and v.dtype == ir.DataType.FLOAT8E4M3FN
           for v in list(node.inputs) + list(node.outputs)):
        return False
    return None


def _optimize(ir_model, fold: bool) -> None:
    """onnxscript's optimizer minus its pattern rewriter (most of the export time on small
    graphs, and onnxruntime does the same fusions at load): constant folding (never of
    Quantize/DequantizeLinear, so FP8 weights stay FP8), dead-code removal, FP8 weight
    slicing folded into per-expert initializers, CSE (shared activation QDQ of q/k/v)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding

    passes = [common.InlinePass()]
    if fold:
        passes.append(ir.passes.PassManager(
            [_constant_folding.FoldConstantsPass(
                shape_inference=True,
                input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                should_fold=_leave_fp8_to_us),
             common.RemoveUnusedNodesPass()], steps=2, early_stop=True))
    ir.passes.Sequential(*passes)(ir_model)
    _fold_fp8_constants(ir_model)
    tail = [common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass()]
    if fold:
        tail += [common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                 common.DeduplicateInitializersPass(),
                 common.CommonSubexpressionEliminationPass()]
    tail += [common.OutputFixPass(), common.NameFixPass()]
    ir.passes.Sequential(*tail)(ir_model)


def _strip_node_metadata(ir_model) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, FX nodes, module paths):
    ~1 KB a node, more than the weights of a small model."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(ir_model.graph):
        node.metadata_props.clear()


def _fp8_guard(ir_model, expected: int) -> int:
    """Count FLOAT8E4M3FN initializers; refuse a graph where the FP8 weights were folded."""
    import onnx_ir as ir

    n = sum(1 for v in ir_model.graph.initializers.values()
            if v.dtype == ir.DataType.FLOAT8E4M3FN)
    if expected and n == 0:
        raise OnnxExportError("translate", "the FP8 weights did not survive: no FLOAT8E4M3FN "
                              "initializer in the graph (were they constant-folded to fp32?)")
    return n


def _weights_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


_NODE_RE = re.compile(r"translating node %(?P<node>[\w.]+)\s*:.*?target=(?P<op>[\w.:]+)",
                      re.S)
_OP_RE = re.compile(r"No ONNX function found for <OpOverload\(op='(?P<op>[\w.:]+)', "
                    r"overload='(?P<ov>\w+)'\)>")


def _translate_error(exc: BaseException) -> OnnxExportError:
    """Name the node / op of an exporter failure; keep the innermost reason."""
    text = "\n".join(str(e) for e in _chain(exc))
    node = op = None
    m = _NODE_RE.search(text)
    if m:
        node, op = m.group("node"), m.group("op")
    m2 = _OP_RE.search(text)
    if m2:
        op = op or f"{m2.group('op')}.{m2.group('ov')}"
    reasons = [str(e).strip().splitlines()[0] for e in _chain(exc) if str(e).strip()]
    reason = reasons[-1] if reasons else type(exc).__name__
    if m2:
        reason = (f"no ONNX translation for {m2.group('op')}.{m2.group('ov')} (register one in "
                  "the custom translation table)")
    return OnnxExportError("translate", reason, node=node, op=op)


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


# =============================================================================================
# the export
# =============================================================================================


def _check_path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ExportInputError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ExportInputError(f"path {str(path)!r} names no file")
    if path.is_dir():
        raise ExportInputError(f"path {str(path)!r} is a directory, not a file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        why = "is not a folder" if parent.exists() else "does not exist"
        raise ExportInputError(f"cannot write {str(path)!r}: {str(parent)!r} {why}")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".rewriter-write-test-"):
            pass
    except OSError as e:
        raise ExportInputError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    if path.exists() and not os.access(path, os.W_OK):
        raise ExportInputError(f"cannot write {str(path)!r}: the file exists and is read-only")
    return path


def _check_opset(opset: Any, has_fp8: bool) -> int:
    if opset is None:
        return FP8_MIN_OPSET if has_fp8 else DEFAULT_OPSET
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise ExportInputError(f"opset must be an int, got {opset!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportInputError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}] (what the dynamo "
                               f"exporter writes), got {opset}")
    if has_fp8 and opset < FP8_MIN_OPSET:
        raise ExportInputError(
            f"opset {opset} is too old for FP8: the model has FP8 layers, which need opset >= "
            f"{FP8_MIN_OPSET} (DequantizeLinear/QuantizeLinear with block_size and "
            "FLOAT8E4M3FN); pass opset=21 or newer")
    return opset


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: Any,
    opset: int | None = None,
    activations: str | None = None,
    dense_moe: bool = False,
    external_data: bool | None = None,
    check: bool = True,
    dynamic: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
    optimize: bool = True,
    node_metadata: bool = False,
) -> ExportReport:
    """Export ``model`` to ``path`` (see the module docstring for what the graph contains).

    ``example_inputs``: a tensor, a tuple (positional) or a dict (keyword, HF style).
    ``opset``: default 20, or 21 when the model has FP8 layers (the minimum for them).
    ``activations``: FP8 activation mode in the graph: None (each layer's own), "fp8" (W8A8,
    1x128 QDQ in the graph) or "none" (W8A16). ``dense_moe``: every expert on every token
    (static shapes) instead of sparse routing. ``external_data``: weights in
    ``<name>.data`` beside the file; None: only above 1 GiB of weights. ``check``: run
    ``onnx.checker`` (full check) on the saved file. ``dynamic``: batch and sequence axes
    symbolic. ``input_names``/``output_names``: override the names. ``config``: conversion
    config for the metadata (default: the model's ``rewriter_conversion``). ``optimize``:
    constant folding and clean-up. ``node_metadata``: keep the exporter's per-node debug
    metadata (stack traces, module paths; ~1 KB a node).
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ExportInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = _check_path(path)
    has_fp8 = bool(_fp8_modules(model)) or bool(_fp8_tables(model))
    opset = _check_opset(opset, has_fp8)
    table = fp8_translation_table(activations)
    for name, value in (("dense_moe", dense_moe), ("check", check), ("dynamic", dynamic),
                        ("optimize", optimize), ("node_metadata", node_metadata)):
        if not isinstance(value, bool):
            raise ExportInputError(f"{name} must be a bool, got {value!r}")
    if external_data is not None and not isinstance(external_data, bool):
        raise ExportInputError(f"external_data must be None or a bool, got {external_data!r}")
    names, tensors, as_kwargs = _normalize_inputs(model, example_inputs)
    if input_names is not None:
        if len(input_names) != len(tensors) or len(set(input_names)) != len(input_names):
            raise ExportInputError(f"input_names must be {len(tensors)} distinct names, got "
                                   f"{list(input_names)}")
        onnx_inputs = [str(n) for n in input_names]
    else:
        onnx_inputs = list(names)
    graph_activations = activations if has_fp8 and activations else _fp8_mode(model)
    moe_blocks = sum(1 for m in model.modules() if isinstance(m, MoEFFN))
    meta = _metadata(model, config, activations=graph_activations, dense_moe=dense_moe,
                     opset=opset)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        wrapper = _Exported(model, names, as_kwargs)
        try:
            with torch.no_grad():
                reference = _flatten_outputs(
                    model(**dict(zip(names, tensors))) if as_kwargs else model(*tensors))
        except Exception as e:
            raise OnnxExportError("run", f"the model failed on example_inputs: "
                                  f"{type(e).__name__}: {e}") from e
        if not reference:
            raise OnnxExportError("run", "the model returned no tensor")
        if output_names is not None:
            if len(output_names) != len(reference) or \
                    len(set(output_names)) != len(output_names):
                raise ExportInputError(f"output_names must be {len(reference)} distinct names, "
                                       f"got {list(output_names)}")
            onnx_outputs = [str(n) for n in output_names]
        else:
            onnx_outputs = _default_output_names(model, reference)

        dyn_axes = {}
        dims_spec = []
        args = []
        for name, t in zip(onnx_inputs, tensors):
            axes = {i: DIM_NAMES[i] for i in range(min(t.dim(), 2))} if dynamic else {}
            dyn_axes[name] = axes
            # AUTO: a dim the model fixes (a feature dim) becomes static instead of failing
            dims_spec.append({i: torch.export.Dim.AUTO for i in axes} or None)
            args.append(_widen(t, list(axes)).contiguous())  # no stride guards
        program = _capture(wrapper, tuple(args), tuple(dims_spec), dense_moe)
        onnx_program = _translate(program, table, opset, onnx_inputs, onnx_outputs, optimize)
    finally:
        for m, training in modes:
            m.training = training

    ir_model = onnx_program.model
    try:
        _optimize(ir_model, optimize)
    except OnnxExportError:
        raise
    except Exception as e:
        raise OnnxExportError("optimize", f"{type(e).__name__}: {e}") from e
    if not node_metadata:
        _strip_node_metadata(ir_model)
    _rename_dims(ir_model, _dim_mapping(ir_model, onnx_inputs, dyn_axes))
    dyn_axes = _symbolic_axes(ir_model)
    n_fp8 = _fp8_guard(ir_model, (len(_fp8_modules(model)) if has_fp8 and not _training_fp8(
        model) else 0) + _fp8_tables(model))
    ir_model.producer_name = "rewriter"
    ir_model.metadata_props.update(meta)
    if external_data is None:
        external_data = _weights_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_path, size = _save(onnx_program, path, external_data, check)
    return ExportReport(
        path=path, data_path=data_path, opset=opset, input_names=tuple(onnx_inputs),
        output_names=tuple(onnx_outputs), dynamic_axes=dyn_axes,
        activations=graph_activations, dense_moe=dense_moe, moe_blocks=moe_blocks,
        fp8_initializers=n_fp8, file_bytes=size, metadata=meta,
        op_counts=_ir_op_counts(ir_model), seconds=time.perf_counter() - start)


def _training_fp8(model: nn.Module) -> bool:
    return any(getattr(m, "mode", None) == "training" for m in _fp8_modules(model))


def _capture(wrapper: nn.Module, args: tuple, dims: tuple, dense_moe: bool):
    with _moe_dispatch(wrapper.model, dense_moe), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(wrapper, args, dynamic_shapes={"args": dims},
                                       strict=False)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OnnxExportError("capture", f"torch.export could not capture the model: "
                                  f"{type(e).__name__}: {reason}") from e


def _translate(program, table: dict, opset: int, inputs: list[str], outputs: list[str],
               optimize: bool):
    """ExportedProgram -> ONNXProgram (unoptimized; see :func:`_optimize`)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(_Null()):
        warnings.simplefilter("ignore")
        try:
            core = _fast_exporter(opset, table)
            if core is not None:
                export, registry = core
                onnx_program = export(program, (), None, registry=registry, input_names=inputs,
                                      output_names=outputs, optimize=False, verbose=False,
                                      opset_version=opset)
            else:
                onnx_program = torch.onnx.export(
                    program, (), dynamo=True, opset_version=opset,
                    custom_translation_table=table, input_names=inputs,
                    output_names=outputs, optimize=False, verbose=False)
        except Exception as e:
            raise _translate_error(e) from e
    if onnx_program is None:
        raise OnnxExportError("translate", "torch.onnx.export returned nothing")
    return onnx_program


@functools.lru_cache(maxsize=4)
def _torchlib_registry(opset: int):
    from torch.onnx._internal.exporter import _registration

    return _registration.ONNXRegistry.from_torchlib(opset_version=opset)


def _fast_exporter(opset: int, table: dict):
    """(torch's exporter core, a registry with our translations) or None.

    ``torch.onnx.export`` rebuilds torchlib's registry on every call (~3 s, most of a small
    model's export); this builds it once per opset and copies it. Private torch API, so any
    mismatch falls back to the public function."""
    try:
        from torch.onnx._internal.exporter import _core, _registration

        base = _torchlib_registry(opset)
        registry = _registration.ONNXRegistry()
        registry._opset_version = base._opset_version
        registry.functions = {k: list(v) for k, v in base.functions.items()}
        for torch_op, fn in table.items():
            registry.register_op(torch_op, fn, is_complex=False)
        return _core.export, registry
    except Exception:  # noqa: BLE001  (any drift in torch's internals: use the public API)
        return None


class _Null:
    def write(self, *_):
        return 0

    def flush(self):
        pass


def _symbolic_axes(ir_model) -> dict[str, dict[int, str]]:
    """input name -> {axis: dim name} of the axes that stayed symbolic."""
    import onnx_ir as ir

    return {v.name: {i: d.value for i, d in enumerate(v.shape or ())
                     if isinstance(d, ir.SymbolicDim) and d.value}
            for v in ir_model.graph.inputs}


def _dim_mapping(ir_model, inputs: list[str], dyn_axes: dict) -> dict[str, str]:
    import onnx_ir as ir

    mapping = {}
    for value in ir_model.graph.inputs:
        axes = dyn_axes.get(value.name, {})
        if value.shape is None:
            continue
        for i, d in enumerate(value.shape):
            if i in axes and isinstance(d, ir.SymbolicDim) and d.value:
                mapping.setdefault(d.value, axes[i])
    return mapping


def _ir_op_counts(ir_model) -> dict[str, int]:
    import onnx_ir as ir

    counts: Counter = Counter()
    for node in ir.traversal.RecursiveGraphIterator(ir_model.graph):
        counts[node.op_type] += 1
    return dict(counts)


def _save(onnx_program, path: Path, external_data: bool, check: bool) -> tuple[Path | None, int]:
    """Write into a temporary folder beside ``path``, check, then move into place."""
    import onnx

    parent = path.parent if str(path.parent) else Path(".")
    data_name = f"{path.name}.data"
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.tmp-"))
    try:
        tmp_path = tmp / path.name
        try:
            onnx_program.save(tmp_path, external_data=external_data)
        except Exception as e:
            raise OnnxExportError("save", f"{type(e).__name__}: {e}") from e
        written = sorted(p.name for p in tmp.iterdir())
        data = [n for n in written if n != path.name]
        if check:
            try:
                onnx.checker.check_model(str(tmp_path), full_check=True)
            except Exception as e:
                raise OnnxExportError("check", f"onnx.checker rejected the model: "
                                      f"{str(e).strip().splitlines()[0] if str(e) else e}") from e
        size = sum((tmp / n).stat().st_size for n in written)
        if data and data != [data_name]:
            raise OnnxExportError("save", f"unexpected files written: {data}")
        for n in data:
            os.replace(tmp / n, parent / n)
        os.replace(tmp_path, path)
        return (parent / data_name if data else None), size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
