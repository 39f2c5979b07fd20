"""FP8 (E4M3) formats with DeepSeek-V3 fine-grained scaling, and the torch reference.

Scaling is online (no amax history): activations (and output gradients) get one fp32 scale per
1x128 tile along the reduction dim, weights one per 128x128 block. ``s = amax / 448`` (or the
next power of two with ``pow2=True``), the amax floored at :data:`AMAX_FLOOR`; the stored value
is ``(x / s).to(torch.float8_e4m3fn)``
(round to nearest even, saturating at 448), so dequantisation is ``q.float() * s``. Dims that are
not multiples of 128 keep partial tiles (the padding is conceptual: never materialised, never
rejected). ``s = max(amax, AMAX_FLOOR) / 448``: an all-zero tile, or one whose amax underflows
the floor, gets the normal scale ``AMAX_FLOOR / 448`` (DeepGEMM clamps amax the same way, to
1e-4), so a scale is never 0 or an fp32 subnormal whose reciprocal is inf (0 * inf = NaN,
pytorch/ao#1766); a NaN in a tile makes its scale, hence the whole tile, NaN (never silently
wrong values).

This module is the ground truth of the tests and the CPU execution path: the Triton kernels
quantize exactly like it, and their GEMMs equal ``fp8_gemm_reference`` (dequantise, fp32 matmul).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rewriter.errors import FP8InferenceModeError

__all__ = [
    "FP8InferenceModeError",
    "ReadOnlyWeight",
    "read_only",
    "E4M3_MAX",
    "AMAX_FLOOR",
    "BLOCK",
    "FP8_DTYPE",
    "compute_scale",
    "quantize_rowwise",
    "quantize_blockwise",
    "quantize_tensorwise",
    "dequantize_rowwise",
    "fake_quantize_rowwise",
    "dequantize_blockwise",
    "fp8_gemm_reference",
    "sqnr_db",
]

E4M3_MAX = 448.0
# Smallest amax a scale is computed from (the ONNX graph imports this name). DeepGEMM uses 1e-4
# for forward activations; here the floor also guards Dgrad/Wgrad, whose output-gradient tiles
# are often ~1e-8 in fp32 training (a loss averaged over many tokens), and a 1e-4 floor would
# push those into E4M3 subnormals or to 0. At 1e-30 every scale (>= 2.2e-33, pow2 too) and
# every dequantized non-zero value (>= 2^-9 * scale) is a normal fp32, 1/scale is finite, and
# tiles with amax >= 1e-30 keep the usual E4M3 relative error; smaller ones round to 0.
AMAX_FLOOR = 1e-30
BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn


# in-place dunders (``w += 1``, ``w[i] = v``); every other in-place op's name ends in "_"
_INPLACE_DUNDERS = frozenset(f"__{op}__" for op in (
    "setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
    "iand", "ior", "ixor", "ilshift", "irshift"))
_NOT_WRITES = frozenset({"requires_grad_", "share_memory_", "detach_", "retain_grad_"})


def _write_target(func, args: tuple, kwargs: dict) -> str | None:
    """How ``func(*args, **kwargs)`` would write into a :class:`ReadOnlyWeight` argument (its
    name), or None when it does not."""
    name = getattr(func, "__name__", "") or ""
    first = args[0] if args else next((kwargs[k] for k in ("tensor", "input", "self")
                                       if k in kwargs), None)  # nn.init.*_(tensor=w)
    if isinstance(first, ReadOnlyWeight):
        if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")
                                        and name not in _NOT_WRITES):
            return name
        if name == "__set__" and getattr(func, "__self__", None) is torch.Tensor.data:
            return ".data = ..."
    out = kwargs.get("out")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if any(isinstance(o, ReadOnlyWeight) for o in outs):
        return f"{name}(out=...)"
    return None


def _storages(values) -> set[int]:
    return {v.untyped_storage().data_ptr() for v in values
            if isinstance(v, ReadOnlyWeight) and v.numel()}


def _flat(args: tuple, kwargs: dict) -> list:
    flat = list(args) + list(kwargs.values())
    return flat + [v for a in flat if isinstance(a, (tuple, list)) for v in a]


class ReadOnlyWeight(torch.Tensor):
    """A dequantized copy of FP8-stored weights, as an inference-mode FP8 module's ``weight``
    hands it out (a fresh tensor per read): it reads like a plain tensor (``dtype``,
    ``shape``, ``x @ w.T``, ``p.copy_(w)``; results are plain tensors), but writes into it or
    into a view of its memory (``mul_``, ``.data.mul_``, ``copy_``, ``w[i] = v``, ``out=w``,
    ``.data = t``, a NumPy view) raise :class:`FP8InferenceModeError`: they would change a
    throw-away copy, never the FP8 weights the module computes with. ``owner`` names the
    module class in the message."""

    owner: str = "FP8 module"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        how = _write_target(func, args, kwargs)
        if how is not None:
            owner = next((a.owner for a in _flat(args, kwargs)
                          if isinstance(a, ReadOnlyWeight)), cls.owner)
            raise FP8InferenceModeError(
                f"{owner}.weight in FP8 inference mode is a dequantized copy of the FP8 "
                f"weight (weight_q, weight_scale), made anew on every read: writing to it "
                f"({how}) would change nothing the module computes with. To train or edit "
                "the weights, convert with FP8Config(mode='training') (master weights); to "
                "replace them, load a state_dict (weight_q, weight_scale) or re-convert the "
                "high-precision model")
        with torch._C.DisableTorchFunctionSubclass():
            ptrs = _storages(_flat(args, kwargs))
            out = func(*args, **kwargs)
            owner = next((a.owner for a in _flat(args, kwargs)
                          if isinstance(a, ReadOnlyWeight)), cls.owner)
            return _alias_read_only(out, ptrs, cls, owner)

    def __setattr__(self, name, value):
        if name == "_is_param" and value:  # nn.Parameter(w): the caller's own tensor now
            super().__setattr__("__class__", torch.nn.Parameter)
            return
        super().__setattr__(name, value)

    def __deepcopy__(self, memo):  # a copy is the caller's own: a plain tensor
        with torch._C.DisableTorchFunctionSubclass():
            out = self.as_subclass(torch.Tensor).clone().requires_grad_(self.requires_grad)
        memo[id(self)] = out
        return out

    def __reduce_ex__(self, protocol):  # pickled / torch.save'd as a plain tensor
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def _alias_read_only(out, ptrs: set[int], cls: type, owner: str):
    """``out`` with every tensor that shares memory with a read-only weight read-only too
    (views, ``.data``, ``detach()``), NumPy views not writeable; other tensors plain."""
    if isinstance(out, (tuple, list)):
        return type(out)(_alias_read_only(o, ptrs, cls, owner) for o in out) \
            if not hasattr(out, "_fields") else type(out)(
                *(_alias_read_only(o, ptrs, cls, owner) for o in out))
    if isinstance(out, np.ndarray) and ptrs:
        out.flags.writeable = False
        return out
    if type(out) is torch.Tensor and ptrs and out.untyped_storage().data_ptr() in ptrs:
        out = out.as_subclass(cls)
        out.owner = owner
    return out


def read_only(t: torch.Tensor, owner: str) -> torch.Tensor:
    """``t`` (a fresh dequantized weight) as a :class:`ReadOnlyWeight` naming ``owner``; a
    plain tensor unchanged while torch.export/compile/JIT traces or a dispatch mode runs
    (fake tensors: model code reading ``weight.dtype`` there must trace as before)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if type(t) is not torch.Tensor or torch.compiler.is_compiling() or \
            torch.compiler.is_exporting() or torch.jit.is_tracing() or \
            _get_current_dispatch_mode() is not None:
        return t
    out = t.as_subclass(ReadOnlyWeight)
    out.owner = owner
    return out


def _check(x: torch.Tensor, name: str, dims: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {x.dtype}")


def compute_scale(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """fp32 scale from a tile's amax (any shape): ``max(amax, AMAX_FLOOR) / 448`` (pow2: the
    next power of two). A NaN amax gives a NaN scale."""
    amax = amax.float()
    floored = torch.where(amax < AMAX_FLOOR, torch.full_like(amax, AMAX_FLOOR), amax)  # NaN kept
    scale = floored / E4M3_MAX
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    size = x.shape[dim]
    extra = (-size) % multiple
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + [0, extra]
    return torch.nn.functional.pad(x, pad)


def _row_tiles(x: torch.Tensor, block: int) -> torch.Tensor:
    """(M, K) -> (M, Kb, block) fp32 view (zero-padded copy only when K % block != 0)."""
    m, k = x.shape
    xf = _pad_to(x.float(), 1, block)
    return xf.view(m, xf.shape[1] // block, block)


def quantize_rowwise(
    x: torch.Tensor, *, block: int = BLOCK, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> q (M, K) fp8, s (M, ceil(K/block)) fp32: one scale per 1 x block tile."""
    _check(x, "x", 2)
    m, k = x.shape
    tiles = _row_tiles(x, block)  # (M, Kb, 128)
    scale = compute_scale(torch.linalg.vector_norm(tiles, float("inf"), dim=2), pow2)  # (M, Kb)
    q = (tiles / scale[:, :, None]).to(FP8_DTYPE).view(m, tiles.shape[1] * block)
    return (q if q.shape[1] == k else q[:, :k].contiguous()), scale


# every E4M3 value by bit pattern (NaN at 0x7f/0xff, -0 at 0x80): a 256-entry lookup decodes fp8
# to fp32 ~4x faster on CPU than ``.float()`` (a scalar loop there), with the same bits
_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()


def fake_quantize_rowwise(x: torch.Tensor, *, block: int = BLOCK,
                          pow2: bool = False) -> torch.Tensor:
    """dequantize_rowwise(*quantize_rowwise(x)) bit for bit, in fewer passes (the CPU
    emulation path). Returns (M, K) fp32; when K % block != 0, a view of an
    (M, ceil(K/block)*block) buffer (the layout dequantize_rowwise gives)."""
    _check(x, "x", 2)
    m, k = x.shape
    tiles = _row_tiles(x, block)  # (M, Kb, 128)
    if tiles.device.type != "cpu":
        scale = compute_scale(tiles.abs().amax(dim=2), pow2)[:, :, None]
        out = (tiles / scale).to(FP8_DTYPE).float().mul_(scale).view(m, tiles.shape[1] * block)
    else:  # one fp32 buffer reused: |x| for the amax, then x / s, then the decoded grid values
        buf = tiles.abs()  # (M, Kb, 128)
        scale = compute_scale(buf.amax(dim=2), pow2)[:, :, None]  # (M, Kb, 1)
        q = torch.div(tiles, scale, out=buf).to(FP8_DTYPE)
        idx = q.view(torch.uint8).view(-1).to(torch.int32)
        torch.index_select(_E4M3_VALUES, 0, idx, out=buf.view(-1))  # == q.float()
        out = buf.mul_(scale).view(m, tiles.shape[1] * block)
    return out if out.shape[1] == k else out[:, :k]


def quantize_blockwise(
    w: torch.Tensor, *, block: int = BLOCK, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) fp8, s (ceil(N/block), ceil(K/block)) fp32: 128x128 blocks."""
    _check(w, "w", 2)
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    wf = _pad_to(_pad_to(w.float(), 0, block), 1, block).view(nb, block, kb, block)
    scale = compute_scale(torch.linalg.vector_norm(wf, float("inf"), dim=(1, 3)), pow2)
    q = (wf / scale[:, None, :, None]).to(FP8_DTYPE).view(nb * block, kb * block)[:n, :k]
    return q.contiguous(), scale


def quantize_tensorwise(x: torch.Tensor, *, pow2: bool = False) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """One scale for the whole tensor (the baseline fine-grained scaling must beat)."""
    scale = compute_scale(x.float().abs().amax(), pow2)
    return (x.float() / scale).to(FP8_DTYPE), scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor, *, block: int = BLOCK) -> torch.Tensor:
    """fp32 (M, K) from rowwise-quantized q and s (M, ceil(K/block))."""
    m, k = q.shape
    tiles = _row_tiles(q, block) if k % block else q.float().view(m, k // block, block)
    out = tiles.mul_(scale[:, :, None]).view(m, tiles.shape[1] * block)  # m may be 0
    return out if out.shape[1] == k else out[:, :k]


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, *,
                         block: int = BLOCK) -> torch.Tensor:
    """fp32 (N, K) from blockwise-quantized q and s (ceil(N/block), ceil(K/block))."""
    n, k = q.shape
    nb, kb = scale.shape
    full = _pad_to(_pad_to(q.float(), 0, block), 1, block).view(nb, block, kb, block)
    out = full.mul_(scale[:, None, :, None]).view(nb * block, kb * block)
    return out if (n, k) == tuple(out.shape) else out[:n, :k]


def fp8_gemm_reference(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    *,
    b_layout: str = "block",
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    block: int = BLOCK,
) -> torch.Tensor:
    """C = A @ B^T in fp32 from FP8 operands: A (M, K) rowwise-scaled; B (N, K) block-scaled
    (``b_layout="block"``, weights) or rowwise-scaled (``"row"``, e.g. Wgrad's activations)."""
    if b_layout not in ("block", "row"):
        raise ValueError(f"b_layout must be 'block' or 'row', got {b_layout!r}")
    a = dequantize_rowwise(a_q, a_s, block=block)
    b = (dequantize_blockwise(b_q, b_s, block=block) if b_layout == "block"
         else dequantize_rowwise(b_q, b_s, block=block))
    c = a @ b.T
    if bias is not None:
        c = c + bias.float()
    return c.to(out_dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
