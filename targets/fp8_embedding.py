"""An embedding table stored FP8 (E4M3, one fp32 scale per row), and an output head tied to it.

Deployment-only (inference; DeepSeek-V3 keeps embeddings and the head in high precision, so
``FP8Config(embeddings="fp8")`` is opt-in). Row ``v`` of the table is stored as
``q[v] = (w[v] / s[v]).to(float8_e4m3fn)`` with ``s[v] = max(amax|w[v]|, AMAX_FLOOR) / 448``
(:func:`rewriter.targets.fp8.compute_scale`: a zero or tiny row gets a normal scale, never 0 or
subnormal; ``pow2``: next power of two), so a lookup dequantizes only the gathered rows:
``emb(ids) = q[ids].float() * s[ids, None]`` (exact: an E4M3 value times an fp32 scale is one
fp32 rounding). A head whose weight is the table (``tie_word_embeddings``) reads the same
buffers, weight-only: ``logits = (x @ q.float()^T) * s (+ b)`` in fp32, so a checkpoint and an
ONNX file hold one FP8 table. ``weight_q``/``weight_scale`` keep their dtypes under
``.to(dtype)``/``.half()``/``.bfloat16()`` (they still move between devices); ``weight`` reads
the dequantized table, as ``nn.Embedding.weight`` / ``nn.Linear.weight`` would (read-only: a
write raises :class:`~rewriter.targets.fp8.FP8InferenceModeError`). No backward: the ops raise
that error when autograd reaches them.

    rewriter::fp8_embedding(ids, table_q, scale)              -> (..., d) fp32
    rewriter::fp8_embedding_linear(x, table_q, scale, bias)   -> (..., V) in x's dtype
"""

from __future__ import annotations

import torch
from rewriter.models.moe import apply_pinned
from torch import Tensor, nn

from .fp8 import FP8_DTYPE, compute_scale, read_only
from .fp8_ops import register_no_backward

__all__ = ["FP8Embedding", "FP8TiedHead", "quantize_rows", "dequantize_rows"]

_LIB = "rewriter"


def quantize_rows(w: Tensor, *, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """w (V, d) -> q (V, d) float8_e4m3fn, s (V,) fp32: one scale per row."""
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_rows needs a 2-D float table, got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    wf = w.detach().float()
    scale = compute_scale(torch.linalg.vector_norm(wf, float("inf"), dim=1), pow2)  # (V,)
    return (wf / scale[:, None]).to(FP8_DTYPE), scale


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    """fp32 (V, d) from rowwise-quantized q (V, d) and s (V,)."""
    return q.float() * scale[:, None]


# ----------------------------------------------------------------------------- ops


@torch.library.custom_op(f"{_LIB}::fp8_embedding", mutates_args=())
def fp8_embedding(ids: Tensor, table_q: Tensor, scale: Tensor) -> Tensor:
    """ids (...) int -> (..., d) fp32: gather FP8 rows and their scales, dequantize those."""
    flat = ids.reshape(-1)
    rows = table_q.view(torch.uint8).index_select(0, flat).view(FP8_DTYPE)  # (n, d)
    out = rows.float() * scale.index_select(0, flat)[:, None]  # (n, d)
    return out.reshape(*ids.shape, table_q.shape[1])


@fp8_embedding.register_fake
def _(ids, table_q, scale):
    return table_q.new_empty((*ids.shape, table_q.shape[1]), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::fp8_embedding_linear", mutates_args=())
def fp8_embedding_linear(x: Tensor, table_q: Tensor, scale: Tensor,
                         bias: Tensor | None) -> Tensor:
    """Tied head, weight-only: y (..., V) = (x (..., d) @ q^T) * s (+ bias), fp32 matmul."""
    y = torch.nn.functional.linear(x.float(), table_q.float()) * scale  # (..., V)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@fp8_embedding_linear.register_fake
def _(x, table_q, scale, bias):
    return x.new_empty((*x.shape[:-1], table_q.shape[0]))


register_no_backward(fp8_embedding, "fp8_embedding")
register_no_backward(fp8_embedding_linear, "fp8_embedding_linear")

_ops = torch.ops.rewriter
_PINNED = ("weight_q", "weight_scale")


# ----------------------------------------------------------------------------- modules


class FP8Embedding(nn.Module):
    """``nn.Embedding`` (inference) with the table stored FP8 E4M3 + one fp32 scale per row."""

    def __init__(self, weight: Tensor, *, padding_idx: int | None = None, pow2: bool = False):
        super().__init__()
        q, s = quantize_rows(weight, pow2=pow2)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx, self.pow2 = padding_idx, pow2
        self.compute_dtype = weight.dtype
        self.register_buffer("weight_q", q)  # (V, d) float8_e4m3fn
        self.register_buffer("weight_scale", s)  # (V,) fp32

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, pow2: bool = False) -> FP8Embedding:
        if embedding.max_norm is not None:
            raise ValueError("FP8Embedding cannot renormalize rows (max_norm is set)")
        return cls(embedding.weight, padding_idx=embedding.padding_idx, pow2=pow2)

    def _apply(self, fn, recurse=True):  # the FP8 table and its scales keep their dtypes
        out = fn(torch.empty(0, dtype=self.compute_dtype))
        if isinstance(out, Tensor) and out.is_floating_point():
            self.compute_dtype = out.dtype
        return apply_pinned(self, fn, recurse, super()._apply, buffers=_PINNED)

    @property
    def weight(self) -> Tensor:
        """(V, d) the table dequantized to ``compute_dtype`` (a fresh read-only tensor per
        read)."""
        return read_only(self.dequantized().to(self.compute_dtype), type(self).__name__)

    def forward(self, ids: Tensor) -> Tensor:  # (...) -> (..., d)
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"FP8Embedding needs integer ids, got {ids.dtype}")
        out = _ops.fp8_embedding(ids, self.weight_q, self.weight_scale)
        return out if self.compute_dtype == torch.float32 else out.to(self.compute_dtype)

    def dequantized(self) -> Tensor:
        """The whole table in fp32 (V, d)."""
        return dequantize_rows(self.weight_q, self.weight_scale)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, fp8=e4m3, scale=per row"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
                + (", pow2=True" if self.pow2 else ""))


class FP8TiedHead(nn.Module):
    """An output head whose weight is an :class:`FP8Embedding`'s table: it registers the
    embedding's own buffers (one table in memory, in a checkpoint and in an ONNX file) and
    runs weight-only (fp32 matmul on the FP8 values, then the per-row scales)."""

    def __init__(self, embedding: FP8Embedding, bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.register_buffer("weight_q", embedding.weight_q)  # the same tensor, not a copy
        self.register_buffer("weight_scale", embedding.weight_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _apply(self, fn, recurse=True):  # the shared FP8 table keeps its dtypes
        return apply_pinned(self, fn, recurse, super()._apply, buffers=_PINNED)

    @property
    def weight(self) -> Tensor:
        """(V, d) the tied table dequantized to fp32 (a fresh read-only tensor per read)."""
        return read_only(dequantize_rows(self.weight_q, self.weight_scale), type(self).__name__)

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., V)
        return _ops.fp8_embedding_linear(x, self.weight_q, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, tied to an FP8Embedding (weight-only)")
