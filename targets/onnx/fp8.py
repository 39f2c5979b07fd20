"""onnxscript translations of the ``rewriter::`` FP8 ops (traced by ``torch.onnx.export``).

Weights stay FLOAT8E4M3FN initializers dequantized by a blocked ``DequantizeLinear`` (opset
21+, ``block_size=128`` along K; the 128x128 block scales expanded to one row per weight row).
Each weight is stored transposed, W^T (K, N) with (ceil(K/128), N) scales, so ``MatMul`` takes
``DequantizeLinear``'s output directly. Activations in W8A8: per 1x128 tile ``amax`` in the
graph, ``scale = max(amax, AMAX_FLOOR) / 448`` (:func:`rewriter.targets.fp8.compute_scale`,
the same floor, so a tile of tiny values never gets a subnormal or zero scale),
``QuantizeLinear`` to FLOAT8E4M3FN (saturate) and ``DequantizeLinear`` back, then an fp32
``MatMul``. onnxruntime's QuantizeLinear divides by the scale and rounds to nearest even,
saturating at 448, exactly like ``(x / s).to(torch.float8_e4m3fn)``: the quantized values are
bit-identical to :mod:`rewriter.targets.fp8`.

FP8 embedding tables: ``Cast(table, FLOAT)`` (exact; Gather is defined on no FLOAT8 type) ->
``Gather`` rows -> ``Mul`` by the gathered row scales; a tied head is ``Gemm(x, Cast(table),
transB=1) * scales`` on the same initializer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx_ir as ir
from onnx import TensorProto
from onnxscript import opset21 as op

from ..fp8 import AMAX_FLOOR, BLOCK, E4M3_MAX

__all__ = [
    "fp8_embedding",
    "fp8_embedding_linear",
    "fp8_gemm",
    "fp8_linear",
    "fp8_linear_hp",
    "fp8_linear_weight_only",
    "fp8_quantize_blockwise",
    "fp8_quantize_rowwise",
    "fp8_weight_only_as_w8a8",
    "fp8_weight_only_linear",
]


def _ints(values: Sequence[int]):
    return op.Constant(value_ints=[int(v) for v in values])


def _static_dims(value, what: str) -> tuple[int, ...]:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        raise ValueError(f"{what} needs a static shape for FP8 export, got {shape}")
    return tuple(shape)


def _expand_block_scale(w_s, n: int, kb: int | None = None):
    """(ceil(N/128), Kb) block scales -> (N, Kb): one row per weight row (blocked QDQ)."""
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
    return op.DequantizeLinear(w_q, _expand_block_scale(w_s, n, math.ceil(k / BLOCK)),
                               axis=1, block_size=BLOCK)


def _dequant_weight_t(w_q, w_s):
    """Stored FP8 weight (N, K) -> fp32 W^T (K, N): the FP8 initializer is stored transposed
    (the Transpose is folded at export: one FLOAT8E4M3FN (K, N) initializer) and dequantized
    along axis 0 with (ceil(K/128), N) scales, so MatMul(x, DequantizeLinear(W^T)) needs no
    per-run Transpose of the weight."""
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
    two = op.Constant(value_float=2.0)
    half = op.Constant(value_float=0.5)
    e = op.Ceil(op.Div(op.Log(scale), op.Constant(value_float=math.log(2.0))))
    p = op.Pow(two, e)
    p = op.Where(op.Less(p, scale), op.Mul(p, two), p)
    return op.Where(op.GreaterOrEqual(op.Mul(p, half), scale), op.Mul(p, half), p)


def _compute_scale(amax, pow2: bool):
    """fp32 scale of a tile: max(amax, AMAX_FLOOR) / 448, as
    :func:`rewriter.targets.fp8.compute_scale` (a NaN amax stays NaN: ``Less`` is false)."""
    floor = op.Constant(value_float=AMAX_FLOOR)
    amax = op.Where(op.Less(amax, floor), floor, amax)
    scale = op.Div(amax, op.Constant(value_float=E4M3_MAX))
    return _pow2(scale) if pow2 else scale


def _tile_amax_rows(x2, k: int):
    """x2 (M, K) -> (M, ceil(K/128)) amax of |x| per 1x128 tile (partial last tile)."""
    kb = math.ceil(k / BLOCK)
    a = op.Abs(x2)
    if kb * BLOCK != k:
        a = op.Pad(a, _ints([0, 0, 0, kb * BLOCK - k]))  # zeros never raise the amax
    rows = op.Shape(x2, start=0, end=1)
    a = op.Reshape(a, op.Concat(rows, _ints([kb, BLOCK]), axis=0), allowzero=1)  # (M,Kb,128)
    return op.ReduceMax(a, _ints([2]), keepdims=0)  # (M, Kb)


def _quantize_rows(x2, k: int, pow2: bool):
    """x2 (M, K) fp32 -> (q FLOAT8E4M3FN (M, K), s (M, Kb)): 1x128 tiles."""
    scale = _compute_scale(_tile_amax_rows(x2, k), pow2)
    q = op.QuantizeLinear(x2, scale, axis=1, block_size=BLOCK, saturate=1,
                          output_dtype=TensorProto.FLOAT8E4M3FN)
    return q, scale


def _qdq_rows(x2, k: int, pow2: bool):
    q, scale = _quantize_rows(x2, k, pow2)
    return op.DequantizeLinear(q, scale, axis=1, block_size=BLOCK)


def _as_float(x):
    if x.dtype == ir.DataType.FLOAT:
        return x
    return op.Cast(x, to=TensorProto.FLOAT)


def _like(y, x):
    """Cast fp32 ``y`` back to x's dtype (no-op for fp32 activations)."""
    if x.dtype in (None, ir.DataType.FLOAT):
        return y
    return op.Cast(y, to=x.dtype.value)


def _linear(x, wt, bias, *, shape: tuple[int, int], quantize: bool, pow2: bool):
    """y (..., N) = x (..., K) @ wt (+ bias), wt fp32 (K, N), ``shape`` = (N, K); x QDQ'd per
    1x128 if asked."""
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


def fp8_linear(x, w_q, w_s, bias=None, pow2=False):
    """rewriter::fp8_linear (W8A8): x (..., K), FP8 w_q (N, K), w_s (Nb, Kb) -> (..., N)."""
    return _linear(x, _dequant_weight_t(w_q, w_s), bias, shape=_static_dims(w_q, "w"),
                   quantize=True, pow2=bool(pow2))


def fp8_linear_weight_only(x, w_q, w_s, bias=None, pow2=False):
    """rewriter::fp8_linear exported weight-only (``activations="none"`` override)."""
    return _linear(x, _dequant_weight_t(w_q, w_s), bias, shape=_static_dims(w_q, "w"),
                   quantize=False, pow2=False)


def fp8_weight_only_linear(x, w_q, w_s, bias=None):
    """rewriter::fp8_weight_only_linear (W8A16)."""
    return _linear(x, _dequant_weight_t(w_q, w_s), bias, shape=_static_dims(w_q, "w"),
                   quantize=False, pow2=False)


def fp8_weight_only_as_w8a8(x, w_q, w_s, bias=None):
    """rewriter::fp8_weight_only_linear exported W8A8 (``activations="fp8"`` override)."""
    return _linear(x, _dequant_weight_t(w_q, w_s), bias, shape=_static_dims(w_q, "w"),
                   quantize=True, pow2=False)


def _quantize_blockwise(w, pow2: bool):
    """w (N, K) -> (q FLOAT8E4M3FN (N, K), s (Nb, Kb)): 128x128 blocks, in the graph."""
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


def fp8_linear_hp(x, weight, bias=None, pow2=False):
    """rewriter::fp8_linear_hp (training-mode module, forward only): both operands quantized
    in the graph (the master weight stays high precision in the file)."""
    pow2 = bool(pow2)
    shape = _static_dims(weight, "weight")
    q, s = _quantize_blockwise(weight, pow2)
    wt = op.Transpose(_dequant_weight(q, s, shape), perm=[1, 0])  # (K, N)
    return _linear(x, wt, bias, shape=shape, quantize=True, pow2=pow2)


def fp8_quantize_rowwise(x, pow2=False):
    """rewriter::fp8_quantize_rowwise: x (M, K) -> (FP8 (M, K), scales (M, ceil(K/128)))."""
    k = _static_dims(x, "x")[1] if x.shape is not None and isinstance(x.shape[1], int) else None
    if k is None:
        raise ValueError("fp8_quantize_rowwise needs a static reduction dim")
    return _quantize_rows(_as_float(x), k, bool(pow2))


def fp8_quantize_blockwise(w, pow2=False):
    """rewriter::fp8_quantize_blockwise: w (N, K) -> (FP8 (N, K), scales (Nb, Kb))."""
    return _quantize_blockwise(w, bool(pow2))


def fp8_gemm(a_q, a_s, b_q, b_s, b_rowwise=False, bias=None, out_dtype=None):
    """rewriter::fp8_gemm: C (M, N) = dequant(A) @ dequant(B)^T (+ bias), fp32."""
    a = op.DequantizeLinear(a_q, a_s, axis=1, block_size=BLOCK)
    if b_rowwise:
        b = op.DequantizeLinear(b_q, b_s, axis=1, block_size=BLOCK)
    else:
        b = _dequant_weight(b_q, b_s)
    y = op.MatMul(a, op.Transpose(b, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, _as_float(bias))
    return y


def fp8_embedding(ids, table_q, scale):
    """rewriter::fp8_embedding: (...) ids -> (..., d) = Gather(Cast(q), ids) * Gather(s, ids)
    (Gather is not defined on FLOAT8; the Cast of the constant table is folded at load by
    onnxruntime, never by the exporter)."""
    table = op.Cast(table_q, to=TensorProto.FLOAT)  # (V, d), exact
    rows = op.Gather(table, ids, axis=0)  # (..., d)
    scale = op.Gather(scale, ids, axis=0)  # (...)
    return op.Mul(rows, op.Unsqueeze(scale, _ints([-1])))


def fp8_embedding_linear(x, table_q, scale, bias=None):
    """rewriter::fp8_embedding_linear (tied head, weight-only): (x @ Cast(q)^T) * s (+ b) as
    Gemm(transB=1), so the (V, d) table is never transposed."""
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
