"""MoE blocks in the ONNX graph.

Sparse routing (the default) is traced from :class:`rewriter.models.moe.MoEFFN` as it is:
``TopK`` picks the experts (ties: the lowest expert index wins, in ONNX as in the torch
routing), then per expert ``Equal -> NonZero -> Gather`` collects its tokens, the expert runs
on those rows only and ``ScatterND(reduction=add)`` adds them back, so an expert no token chose
costs nothing. ``dense_moe=True`` swaps in :func:`dense_dispatch` while exporting: every expert
on every token, weighted by a (T, E) matrix that is zero off the top-k (static shapes, more
FLOPs). ``fused_moe=True`` swaps in :func:`fused_dispatch`: each block's routed experts become
one node of onnxruntime's fused ``com.microsoft.MoE`` contrib op (a file only onnxruntime runs).

The fused op routes by itself (softmax of its router input, top-k, optional renormalisation),
so :func:`fused_dispatch` hands it our routing instead of our router logits: the router input
is ``log(w)`` at the k experts our router selected (ties and the selection bias already
resolved) and ``-inf`` elsewhere, and ``normalize_routing_weights=0``. The op's softmax then
gives each selected expert ``w / sum(w)`` and no other expert any weight, and the output is
multiplied by ``sum(w)`` per token: our weights, within fp32 rounding (``exp(log w)``), for
every gate mode (hard gates: w = 1; sigmoid with or without renormalisation; softmax). Weights
below the smallest normal float are taken as that value (log 0 would leave the op a row of
-inf): a token whose selected weights all underflow gets ~1e-38 of its experts' outputs
instead of exactly 0.

What the fused op computes is checked by :func:`fused_supported`: onnxruntime's CPU kernel runs
gated experts only as interleaved SwiGLU, ``x * sigmoid(alpha x) * up`` (alpha 1: SiLU;
1.702: quick-GELU), and ungated experts with relu / silu / tanh-GELU (its "gelu" is the tanh
form: 1e-4 off the exact one); another activation, a captured one or an FP8 block keeps the
sparse form, named with the reason in the export report's ``unfused``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import torch
from rewriter.models.moe import MoEFFN
from torch import Tensor, nn

from ..fp8_linear import FP8MoEFFN

__all__ = ["FUSED_ACTIVATIONS", "dense_dispatch", "fused_dispatch", "fused_supported",
           "moe_blocks", "moe_dispatch", "ort_moe"]

_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32
# (glu, activation) -> the fused op's (activation_type, activation_alpha)
FUSED_ACTIVATIONS: Mapping[tuple[bool, str], tuple[str, float]] = MappingProxyType({
    (True, "silu"): ("swiglu", 1.0),
    (True, "quick_gelu"): ("swiglu", 1.702),
    (False, "relu"): ("relu", 1.0),
    (False, "silu"): ("silu", 1.0),
    (False, "gelu_tanh"): ("gelu", 1.0),
})


def moe_blocks(model: nn.Module) -> list[MoEFFN]:
    """Every MoE block of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def dense_dispatch(block: MoEFFN, x: Tensor, topk_idx: Tensor, weights: Tensor) -> Tensor:
    """x (T, d), topk_idx (T, K), weights (T, K) -> (T, d): every expert on every token,
    weighted by a (T, E) matrix that is zero off the top-k. Same sum, in the same order, as
    the sparse path (an unselected expert adds an exact zero)."""
    dense = torch.zeros(x.shape[0], block.config.num_experts, dtype=weights.dtype,
                        device=weights.device).scatter(1, topk_idx, weights)  # (T, E)
    out = x.new_zeros(x.shape)  # (T, d)
    for e, params in enumerate(block._experts()):
        out = out + block._expert(params, x, dense[:, e])  # (T, d)
    return out


def fused_supported(block: MoEFFN) -> str | None:
    """None when ``block`` exports as one ``com.microsoft.MoE`` node; else why not."""
    if isinstance(block, FP8MoEFFN):
        return "FP8 experts (the fused op takes float weights)"
    cfg = block.config
    if block.activation_fn is not None or (cfg.glu, cfg.activation) not in FUSED_ACTIVATIONS:
        form = "gated" if cfg.glu else "ungated"
        return f"{form} {cfg.activation} experts (the fused op's CPU kernel has no such form)"
    if block.compute_dtype != torch.float32:
        return f"{block.compute_dtype} experts (exported fused in float32 only)"
    return None


def _interleaved(gate: Tensor, up: Tensor) -> Tensor:
    """(E, F, ...) gate and up -> (E, 2F, ...) rows gate_0, up_0, gate_1, up_1, ... (the fused
    op's interleaved SwiGLU layout; on parameters, so folded into one initializer)."""
    return torch.stack([gate, up], dim=2).reshape(gate.shape[0], 2 * gate.shape[1],
                                                  *gate.shape[2:])


def ort_moe(block: MoEFFN, x: Tensor, router: Tensor) -> Tensor:
    """x (T, d), router (T, E) -> (T, d): one ``com.microsoft.MoE`` node for ``block``'s routed
    experts (``torch.onnx.ops.symbolic``: a placeholder outside an ONNX export). onnxruntime
    computes sum over the top_k largest p = softmax(router) of p_e * expert_e(x)
    (``normalize_routing_weights=0``); fc1 is (E, 2F, d) gate/up interleaved, or (E, F, d)."""
    cfg = block.config
    kind, alpha = FUSED_ACTIVATIONS[(cfg.glu, cfg.activation)]
    fc1 = _interleaved(block.w_gate, block.w_up) if cfg.glu else block.w_up  # (E, 2F | F, d)
    fc1_bias = None
    if block.b_up is not None:
        fc1_bias = _interleaved(block.b_gate, block.b_up) if cfg.glu else block.b_up
    attrs: dict = {"k": cfg.top_k, "activation_type": kind, "normalize_routing_weights": 0}
    if cfg.glu:
        attrs.update(swiglu_fusion=1, activation_alpha=alpha, activation_beta=0.0,
                     swiglu_limit=float("inf"))
    return torch.onnx.ops.symbolic("com.microsoft::MoE", [x, router, fc1, fc1_bias,
                                                          block.w_down],
                                   attrs, dtype=x.dtype, shape=x.shape, version=1)


def fused_dispatch(block: MoEFFN, x: Tensor, topk_idx: Tensor, weights: Tensor) -> Tensor:
    """x (T, d), topk_idx (T, K), weights (T, K) -> (T, d) through :func:`ort_moe`: router
    input log(w) at the selected experts, -inf elsewhere; the output times sum(w) per token."""
    w = weights.clamp_min(_TINY)  # (T, K)
    router = torch.full((x.shape[0], block.config.num_experts), float("-inf"), dtype=w.dtype,
                        device=w.device).scatter(1, topk_idx, w.log())  # (T, E)
    out = ort_moe(block, x, router)  # (T, d)
    return out * w.sum(dim=-1, keepdim=True)


def _bind(block: MoEFFN, dispatch):
    def bound(x, topk_idx, weights):
        return dispatch(block, x, topk_idx, weights)

    return bound


@contextlib.contextmanager
def moe_dispatch(model: nn.Module, dense: bool, fused: bool = False) -> Iterator[list[str]]:
    """Route every MoE block of ``model`` through :func:`dense_dispatch` (``dense``) or, where
    :func:`fused_supported`, :func:`fused_dispatch` (``fused``) while the context is open;
    neither: nothing changes. Yields the list it fills with "<module>: <reason>" for each block
    ``fused`` left sparse."""
    kept: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}
    bound = []
    for block in moe_blocks(model) if dense or fused else []:
        why = None if dense else fused_supported(block)
        if why is not None:
            kept.append(f"{names.get(id(block)) or '(the model)'}: {why}")
            continue
        block._dispatch_masked = _bind(block, dense_dispatch if dense else fused_dispatch)
        bound.append(block)
    try:
        yield kept
    finally:
        for block in bound:
            block.__dict__.pop("_dispatch_masked", None)
