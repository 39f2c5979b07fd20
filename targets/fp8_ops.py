"""FP8 ops registered with torch.library: capturable by torch.export, compilable, exportable.

Every op has a fake (meta) implementation, a CPU implementation that is the torch reference of
:mod:`rewriter.targets.fp8`, and a CUDA implementation that runs the Triton kernels of
:mod:`rewriter.targets.triton_fp8` (imported on first use).

    rewriter::fp8_quantize_rowwise(x, pow2)            -> (q, s)     1x128 tiles
    rewriter::fp8_quantize_blockwise(w, pow2)          -> (q, s)     128x128 blocks
    rewriter::fp8_gemm(a_q, a_s, b_q, b_s, b_rowwise, bias, out_dtype) -> C = A @ B^T
    rewriter::fp8_linear(x, w_q, w_s, bias, pow2)      -> y          inference, W8A8
    rewriter::fp8_weight_only_linear(x, w_q, w_s, bias) -> y         inference, W8A16
    rewriter::fp8_grouped_linear(x, w_q, w_s, offsets, pow2) -> y    MoE experts, sorted rows
    rewriter::fp8_linear_hp(x, weight, bias, pow2)     -> y          training: all 3 GEMMs FP8

The CPU bodies of the three inference linears are also exposed as plain functions that take the
weight already dequantized (``linear_dequantized``, ``weight_only_linear_dequantized``,
``grouped_linear_dequantized``): the eager modules call them with a cached fp32 weight, the ops
with a freshly dequantized one, so both give the same bits.

The inference linears (``fp8_linear``, ``fp8_weight_only_linear``, ``fp8_grouped_linear``) have
none: their weights are stored FP8 once. A backward that reaches one raises
:class:`~rewriter.targets.fp8.FP8InferenceModeError` pointing to ``FP8Config(mode="training")``.

``fp8_linear_hp`` has an autograd formula (DeepSeek-V3): Fprop ``x @ W^T`` with x per 1x128 and
W per 128x128; Dgrad ``dy @ W`` with dy per 1x128 along N and W's blocks transposed; Wgrad
``dy^T @ x`` with both operands per 1x128 along the token dim. Gradients come out in the
inputs' precision; master weights stay in their own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rewriter.capture import activation_quantization_enabled

from . import fp8 as ref
from .fp8 import FP8InferenceModeError

__all__ = [
    "fp8_quantize_rowwise",
    "fp8_quantize_blockwise",
    "fp8_gemm",
    "fp8_linear",
    "fp8_weight_only_linear",
    "fp8_grouped_linear",
    "fp8_linear_hp",
    "linear_dequantized",
    "weight_only_linear_dequantized",
    "grouped_linear_dequantized",
    "register_no_backward",
]

_LIB = "rewriter"


def _triton():
    from . import triton_fp8

    return triton_fp8


def _blocks(n: int) -> int:
    return math.ceil(n / ref.BLOCK)


# ----------------------------------------------------------------------------- quantization


@torch.library.custom_op(f"{_LIB}::fp8_quantize_rowwise", mutates_args=())
def fp8_quantize_rowwise(x: Tensor, pow2: bool) -> tuple[Tensor, Tensor]:
    """x (M, K) -> q (M, K) fp8, s (M, ceil(K/128)) fp32."""
    return ref.quantize_rowwise(x, pow2=pow2)


@fp8_quantize_rowwise.register_fake
def _(x, pow2):
    return (x.new_empty(x.shape, dtype=ref.FP8_DTYPE),
            x.new_empty((x.shape[0], _blocks(x.shape[1])), dtype=torch.float32))


@fp8_quantize_rowwise.register_kernel("cuda")
def _(x, pow2):
    return _triton().triton_quantize_rowwise(x, pow2=pow2)


@torch.library.custom_op(f"{_LIB}::fp8_quantize_blockwise", mutates_args=())
def fp8_quantize_blockwise(w: Tensor, pow2: bool) -> tuple[Tensor, Tensor]:
    """w (N, K) -> q (N, K) fp8, s (ceil(N/128), ceil(K/128)) fp32."""
    return ref.quantize_blockwise(w, pow2=pow2)


@fp8_quantize_blockwise.register_fake
def _(w, pow2):
    return (w.new_empty(w.shape, dtype=ref.FP8_DTYPE),
            w.new_empty((_blocks(w.shape[0]), _blocks(w.shape[1])), dtype=torch.float32))


@fp8_quantize_blockwise.register_kernel("cuda")
def _(w, pow2):
    return _triton().triton_quantize_blockwise(w, pow2=pow2)


# ----------------------------------------------------------------------------- GEMMs


@torch.library.custom_op(f"{_LIB}::fp8_gemm", mutates_args=())
def fp8_gemm(a_q: Tensor, a_s: Tensor, b_q: Tensor, b_s: Tensor, b_rowwise: bool,
             bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """C (M, N) = A @ B^T, A rowwise-scaled, B block- or rowwise-scaled, fp32 accumulation."""
    return ref.fp8_gemm_reference(a_q, a_s, b_q, b_s, b_layout="row" if b_rowwise else "block",
                                  bias=bias, out_dtype=out_dtype)


@fp8_gemm.register_fake
def _(a_q, a_s, b_q, b_s, b_rowwise, bias, out_dtype):
    return a_q.new_empty((a_q.shape[0], b_q.shape[0]), dtype=out_dtype)


@fp8_gemm.register_kernel("cuda")
def _(a_q, a_s, b_q, b_s, b_rowwise, bias, out_dtype):
    return _triton().triton_fp8_gemm(a_q, a_s, b_q, b_s, b_layout="row" if b_rowwise else
                                     "block", bias=bias, out_dtype=out_dtype)


def _flatten(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------- CPU bodies


def linear_dequantized(x: Tensor, w: Tensor, bias: Tensor | None, pow2: bool, *,
                       x_fq: Tensor | None = None) -> Tensor:
    """fp8_linear's CPU emulation given W dequantized (N, K) fp32: fake-quantized activations
    (fp32 values on the E4M3 grid, same as dequantize(quantize(x))) times W, i.e.
    fp8_gemm_reference in fewer passes. ``x_fq``: ``fake_quantize_rowwise`` of x flattened to
    (M, K), when the caller has it already (projections sharing an input)."""
    xd = ref.fake_quantize_rowwise(_flatten(x), pow2=pow2) if x_fq is None else x_fq  # (M, K)
    if not activation_quantization_enabled():  # a check comparing two runtimes (capture)
        xd = _flatten(x).float()
    y = F.linear(xd, w, None if bias is None else bias.float())  # (M, N)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def weight_only_linear_dequantized(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """fp8_weight_only_linear given W dequantized (N, K) fp32: x @ W^T in x's precision."""
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def grouped_linear_dequantized(x: Tensor, weight_of: Callable[[int], Tensor], offsets: Tensor,
                               out_features: int, pow2: bool, *,
                               x_fq: Tensor | None = None) -> Tensor:
    """fp8_grouped_linear's CPU emulation: rows offsets[e]:offsets[e+1] of x (T, K) times
    ``weight_of(e)``, expert e's dequantized (N, K) fp32 weight (asked only for non-empty
    experts; E = len(offsets) - 1). Activations are fake-quantized once for all rows (1x128
    tiles never straddle rows: each slice holds what dequantize_rowwise would give it).
    ``x_fq``: x fake-quantized already (as in linear_dequantized). -> (T, N) in x's dtype."""
    xd = ref.fake_quantize_rowwise(x, pow2=pow2) if x_fq is None else x_fq  # (T, K)
    if not activation_quantization_enabled():  # a check comparing two runtimes (capture)
        xd = x.float()
    out = x.new_empty((x.shape[0], out_features), dtype=torch.float32)  # (T, N)
    bounds = offsets.tolist()
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = xd[lo:hi] @ weight_of(e).T
    return out.to(x.dtype)


@torch.library.custom_op(f"{_LIB}::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, w_q: Tensor, w_s: Tensor, bias: Tensor | None, pow2: bool) -> Tensor:
    """y (..., N) = x (..., K) @ W^T (+ bias): activations quantized per 1x128 on the fly,
    W stored FP8 (N, K) with 128x128 scales. Output in x's dtype."""
    return linear_dequantized(x, ref.dequantize_blockwise(w_q, w_s), bias, pow2)


@fp8_linear.register_fake
def _(x, w_q, w_s, bias, pow2):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@fp8_linear.register_kernel("cuda")
def _(x, w_q, w_s, bias, pow2):
    if not activation_quantization_enabled():  # a check comparing two runtimes (capture)
        return linear_dequantized(x, ref.dequantize_blockwise(w_q, w_s), bias, pow2)
    t = _triton()
    xq, xs = t.triton_quantize_rowwise(_flatten(x), pow2=pow2)
    out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    y = t.triton_fp8_gemm(xq, xs, w_q, w_s, bias=bias, out_dtype=out_dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])


@torch.library.custom_op(f"{_LIB}::fp8_weight_only_linear", mutates_args=())
def fp8_weight_only_linear(x: Tensor, w_q: Tensor, w_s: Tensor, bias: Tensor | None) -> Tensor:
    """W8A16: y = x @ dequant(W)^T (+ bias) in x's precision."""
    return weight_only_linear_dequantized(x, ref.dequantize_blockwise(w_q, w_s), bias)


@fp8_weight_only_linear.register_fake
def _(x, w_q, w_s, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.custom_op(f"{_LIB}::fp8_grouped_linear", mutates_args=())
def fp8_grouped_linear(x: Tensor, w_q: Tensor, w_s: Tensor, offsets: Tensor,
                       pow2: bool) -> Tensor:
    """MoE experts in contiguous layout: rows offsets[e]:offsets[e+1] of x (T, K) use expert
    e's FP8 weight w_q[e] (N, K) with scales w_s[e]. -> (T, N) in x's dtype."""
    return grouped_linear_dequantized(x, lambda e: ref.dequantize_blockwise(w_q[e], w_s[e]),
                                      offsets[:w_q.shape[0] + 1], w_q.shape[1], pow2)


@fp8_grouped_linear.register_fake
def _(x, w_q, w_s, offsets, pow2):
    return x.new_empty((x.shape[0], w_q.shape[1]))


@fp8_grouped_linear.register_kernel("cuda")
def _(x, w_q, w_s, offsets, pow2):
    if not activation_quantization_enabled():  # a check comparing two runtimes (capture)
        return grouped_linear_dequantized(x, lambda e: ref.dequantize_blockwise(w_q[e], w_s[e]),
                                          offsets[:w_q.shape[0] + 1], w_q.shape[1], pow2)
    t = _triton()
    xq, xs = t.triton_quantize_rowwise(x, pow2=pow2)
    return t.triton_fp8_grouped_gemm(xq, xs, w_q, w_s, offsets).to(x.dtype)


# ----------------------------------------------------------------------------- training


def register_no_backward(op, name: str) -> None:
    """Give the inference op ``op`` an autograd formula that raises a clear error: FP8
    inference mode stores its weights once and has no backward (the op's default error tells
    the user to patch the library with ``register_autograd``)."""

    def backward(ctx, *grads):
        raise FP8InferenceModeError(
            f"backward through {_LIB}::{name}: the model is in FP8 inference mode "
            "(FP8Config(mode='inference'), the default), whose weights are stored FP8 once and "
            "have no backward. To train or fine-tune it (also only its other parameters: "
            "gradients flow through the FP8 layers), convert with FP8Config(mode='training') "
            "(master weights; forward and backward GEMMs in FP8); to run inference, call it "
            "under torch.no_grad() or torch.inference_mode()")

    op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


for _op, _name in ((fp8_linear, "fp8_linear"), (fp8_weight_only_linear, "fp8_weight_only_linear"),
                   (fp8_grouped_linear, "fp8_grouped_linear")):
    register_no_backward(_op, _name)


@torch.library.custom_op(f"{_LIB}::fp8_linear_hp", mutates_args=())
def fp8_linear_hp(x: Tensor, weight: Tensor, bias: Tensor | None, pow2: bool) -> Tensor:
    """Training linear: y = x @ W^T (+ bias) with both operands quantized on the fly."""
    if not activation_quantization_enabled():  # a check comparing two runtimes (capture)
        w = ref.dequantize_blockwise(*fp8_quantize_blockwise(weight, pow2))
        return linear_dequantized(x, w, bias, pow2)
    x2 = _flatten(x)
    xq, xs = fp8_quantize_rowwise(x2, pow2)
    wq, ws = fp8_quantize_blockwise(weight, pow2)
    y = fp8_gemm(xq, xs, wq, ws, False, bias, torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


@fp8_linear_hp.register_fake
def _(x, weight, bias, pow2):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, pow2 = inputs
    ctx.save_for_backward(x, weight)
    ctx.pow2 = pow2
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    pow2 = ctx.pow2
    dy = _flatten(grad_out)  # (M, N)
    x2 = _flatten(x)  # (M, K)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:  # Dgrad: dx (M, K) = dy (M, N) @ W (N, K)
        dyq, dys = fp8_quantize_rowwise(dy, pow2)  # 1x128 along N
        wq, ws = fp8_quantize_blockwise(weight, pow2)  # 128x128 blocks, used transposed
        grad_x = fp8_gemm(dyq, dys, wq.t().contiguous(), ws.t().contiguous(), False, None,
                          torch.float32)
        grad_x = grad_x.to(x.dtype).reshape(x.shape)
    if ctx.needs_input_grad[1]:  # Wgrad: dW (N, K) = dy^T (N, M) @ x (M, K)
        dytq, dyts = fp8_quantize_rowwise(dy.t().contiguous(), pow2)  # 1x128 along M
        xtq, xts = fp8_quantize_rowwise(x2.t().contiguous(), pow2)  # 1x128 along M
        grad_w = fp8_gemm(dytq, dyts, xtq, xts, True, None, torch.float32).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = dy.float().sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None


fp8_linear_hp.register_autograd(_backward, setup_context=_setup_context)
