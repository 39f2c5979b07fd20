"""MoE blocks in the ONNX graph.

Sparse routing (the default) is traced from :class:`rewriter.models.moe.MoEFFN` as it is:
``TopK`` picks the experts (ties: the lowest expert index wins, in ONNX as in the torch
routing), then per expert ``Equal -> NonZero -> Gather`` collects its tokens, the expert runs
on those rows only and ``ScatterND(reduction=add)`` adds them back, so an expert no token chose
costs nothing. ``dense_moe=True`` swaps in :func:`dense_dispatch` while exporting: every expert
on every token, weighted by a (T, E) matrix that is zero off the top-k (static shapes, more
FLOPs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from rewriter.models.moe import MoEFFN
from torch import Tensor, nn

__all__ = ["dense_dispatch", "moe_blocks", "moe_dispatch"]


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


def _bind(block: MoEFFN):
    def dispatch(x, topk_idx, weights):
        return dense_dispatch(block, x, topk_idx, weights)

    return dispatch


@contextlib.contextmanager
def moe_dispatch(model: nn.Module, dense: bool) -> Iterator[None]:
    """Route every MoE block of ``model`` through :func:`dense_dispatch` while the context is
    open (``dense=False``: nothing changes)."""
    blocks = moe_blocks(model) if dense else []
    for block in blocks:
        block._dispatch_masked = _bind(block)
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("_dispatch_masked", None)
