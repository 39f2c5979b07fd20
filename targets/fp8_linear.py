"""Modules that run their matmuls in FP8: a drop-in ``nn.Linear`` and an FP8 MoE block.

``mode="training"``: the master weight stays a Parameter in its dtype (fp32/bf16) and every
forward/backward quantizes on the fly (all three GEMMs in FP8, ``rewriter::fp8_linear_hp``).
``mode="inference"``: the weight is quantized once and stored as FP8 + 128x128 scales (half the
bytes of bf16); activations are quantized per 1x128 (``activations="fp8"``, W8A8) or kept in
their precision (``"none"``, W8A16).

CPU eager inference (``cache_dequantized=True``, the default) keeps the weights' dequantized
fp32 form (``q.float() * block scale``, built on first use) instead of dequantizing on every
call: same ops on the same values, so the same bits as the ops. The cache is a plain attribute
(never in ``state_dict``, not counted by ``weight_bytes``; 5 bytes per weight of RAM while it
lives: the fp32 copy and a snapshot of the FP8 bytes), dropped by ``.to()``/``deepcopy``/
pickling, and validated on every use by comparing the FP8 weight and scale tensors with the
snapshot it was built from, bit for bit: any change (``load_state_dict``, ``.data.copy_``,
writes through a NumPy view, ``.data`` assignment, none of which a version counter sees
reliably) rebuilds it. The check reads 1 byte per weight (NumPy compare; measured on this
2-core CPU under load, a 1536x576 weight at M=1 token: ~0.1-0.5 ms of a ~1 ms forward, vs
~40 ms with no cache, since dequantizing anew costs ~30 ms; at M >= 16 it is a few %).
Modules given one :class:`ActivationMemo` (the lowering pass gives one per model and scopes
it to the model's forward call) also share a fake-quantized activation: projections reading the
same tensor in one forward (attention's q/k/v, a GLU's gate/up) quantize it once; nothing is
reused across forward calls, and within one a memoized quantization is returned only while its
input still holds the bytes it was quantized from (the same snapshot compare as the weight
cache: a state buffer rewritten through ``.data`` or NumPy between two projections in one
forward is quantized anew). The registered ops run instead (no caches) under
``torch.export``/``torch.compile``/JIT tracing, dispatch modes and autocast, on other devices
(CUDA: Triton), and when autograd would record the input (``torch.is_grad_enabled() and
x.requires_grad``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from rewriter.models.moe import MoEFFN, apply_pinned
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import fp8_ops  # noqa: F401  (registers torch.ops.rewriter.*)
from .fp8 import (
    BLOCK,
    dequantize_blockwise,
    fake_quantize_rowwise,
    quantize_blockwise,
    read_only,
)
from .fp8_ops import (
    grouped_linear_dequantized,
    linear_dequantized,
    weight_only_linear_dequantized,
)

__all__ = ["FP8Linear", "FP8MoEFFN", "ActivationMemo", "MODES", "ACTIVATION_MODES",
           "scope_activation_memos"]

MODES = ("training", "inference")
ACTIVATION_MODES = ("fp8", "none")
_ops = torch.ops.rewriter


def _check_modes(mode: str, activations: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
    if mode == "training" and activations != "fp8":
        raise ValueError("training runs all three GEMMs in FP8: activations must be 'fp8'")


def _check_quantized(quantized: tuple[Tensor, Tensor] | None, weight: Tensor,
                     mode: str) -> None:
    """``quantized``: codes and block scales made elsewhere (GPTQ rounding) for ``weight``."""
    if quantized is None:
        return
    if mode != "inference":
        raise ValueError("quantized=(q, scale) stores fixed FP8 weights: it needs "
                         "mode='inference' (training re-quantizes the master weight each step)")
    q, s = quantized
    n, k = weight.shape
    blocks = (-(-n // BLOCK), -(-k // BLOCK))  # quantize_blockwise's scale grid
    if q.dtype != torch.float8_e4m3fn or tuple(q.shape) != (n, k) or \
            s.dtype != torch.float32 or tuple(s.shape) != blocks:
        raise ValueError(f"quantized must be (q float8_e4m3fn {(n, k)}, scale float32 "
                         f"{blocks}) for a weight of shape {(n, k)}, got ({q.dtype} "
                         f"{tuple(q.shape)}, {s.dtype} {tuple(s.shape)})")


def _check_cache_flag(cache_dequantized: bool) -> None:
    if not isinstance(cache_dequantized, bool):
        raise ValueError(f"cache_dequantized must be a bool, got {cache_dequantized!r}")


def _stamp(t: Tensor) -> tuple | None:
    """What changes when ``t``'s values change through autograd-visible ops: storage, layout,
    version counter (None for inference-mode tensors, which have no version counter). A cheap
    first test only: writes through ``.data`` or NumPy do not bump the version, so a match
    must still be confirmed against a :func:`_snapshot` with :func:`_same`."""
    try:
        version = t._version
    except RuntimeError:
        return None
    return (t.data_ptr(), version, tuple(t.shape), t.stride(), t.dtype, t.device)


def _bits(t: Tensor) -> Tensor:
    """t's bytes as a flat integer tensor, 8 bytes a word when they divide evenly (an exact
    compare: NaN == NaN, -0 != +0)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() % 8 == 0 and raw.storage_offset() % 8 == 0:
        return raw.view(torch.int64)
    return raw


def _snapshot(t: Tensor) -> Tensor:
    """A private copy of ``t``'s bytes (detached, no autograd history) for :func:`_same`."""
    return t.detach().clone()


def _same(snapshot: Tensor, t: Tensor) -> bool:
    """``snapshot`` and ``t`` hold the same bytes (same shape, dtype, device). On the CPU
    through NumPy: ~6x faster than ``torch.equal`` here (90 us vs 600 us for 885 KB)."""
    if snapshot.shape != t.shape or snapshot.dtype != t.dtype or snapshot.device != t.device:
        return False
    a, b = _bits(snapshot), _bits(t)
    if a.device.type == "cpu":
        return bool(np.array_equal(a.numpy(), b.numpy()))
    return torch.equal(a, b)


class _DequantCache:
    """Dequantized fp32 weights by name, each stored with a snapshot of the FP8 tensors it was
    built from and returned only while those tensors still hold exactly those bytes.

    Not a buffer: ``state_dict``, ``weight_bytes`` and checkpoints never see it; a deep copy
    or a pickle starts empty (no fp32 copy travels)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple] = {}

    def get(self, name: str, sources: tuple[Tensor, ...], build: Callable[[], object]):
        hit = self._entries.get(name)
        if hit is not None and all(_same(a, b) for a, b in zip(hit[0], sources)):
            return hit[1]
        self._entries.pop(name, None)  # free the stale copy before building the new one
        with torch.no_grad():
            snapshot = tuple(_snapshot(t) for t in sources)
            value = build()
        self._entries[name] = (snapshot, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo) -> _DequantCache:
        return _DequantCache()

    def __reduce__(self):
        return (_DequantCache, ())


class ActivationMemo:
    """The last activation fake-quantized by the FP8 modules that share this object (one
    entry: the eager CPU path only), kept only inside :meth:`scope` (the lowering pass opens
    one per forward call of the model, :func:`scope_activation_memos`): outside a scope every
    call quantizes anew, and closing the outermost scope drops the entry, so nothing computed
    from one forward's activations is reused by another (an input buffer refilled in place
    through NumPy between calls keeps its identity and version counter). Within a scope the
    entry is keyed on the input tensor's identity (weak), storage, layout and version counter,
    and ``pow2``, and holds a snapshot of the input's bytes: it is returned only while the input
    still holds exactly those bytes (``.data`` writes and NumPy-view writes leave the version
    counter alone; a state buffer updated that way between two projections of one forward is
    quantized anew). A deep copy or a pickle starts empty and closed."""

    def __init__(self) -> None:
        self._entry: tuple | None = None
        self._depth = 0

    def open(self, *_) -> None:
        """Enter a scope (also a forward pre-hook: extra arguments ignored)."""
        self._depth = getattr(self, "_depth", 0) + 1

    def close(self, *_) -> None:
        """Leave a scope (also a forward hook); the outermost one drops the entry."""
        self._depth = max(getattr(self, "_depth", 0) - 1, 0)
        if self._depth == 0:
            self._entry = None

    @contextlib.contextmanager
    def scope(self):
        """``with memo.scope():`` one forward's worth of sharing."""
        self.open()
        try:
            yield self
        finally:
            self.close()

    def fake_quantized(self, x: Tensor, pow2: bool) -> Tensor:
        """``fake_quantize_rowwise`` of x flattened to (M, K), computed once per input within
        a scope while the input's bytes stay unchanged."""
        if not getattr(self, "_depth", 0):
            self._entry = None
            return fake_quantize_rowwise(x.reshape(-1, x.shape[-1]), pow2=pow2)
        stamp = _stamp(x)
        entry = self._entry
        if stamp is not None and entry is not None and entry[0]() is x \
                and entry[1] == (stamp, pow2) and _same(entry[2], x):
            return entry[3]
        self._entry = None  # free the stale copy before building the new one
        xd = fake_quantize_rowwise(x.reshape(-1, x.shape[-1]), pow2=pow2)  # (M, K)
        if stamp is not None:  # the bytes xd was computed from, checked on every hit
            self._entry = (weakref.ref(x), (stamp, pow2), _snapshot(x), xd)
        return xd

    def clear(self) -> None:
        self._entry = None

    def __deepcopy__(self, memo) -> ActivationMemo:
        return ActivationMemo()

    def __reduce__(self):
        return (ActivationMemo, ())


def scope_activation_memos(model: nn.Module) -> int:
    """Open every :class:`ActivationMemo` of ``model``'s FP8 modules for the duration of each
    forward call of ``model`` (a pre-hook and an always-called forward hook; a call of
    ``model.forward`` itself bypasses them: no sharing, same results). Returns the number of
    memos scoped."""
    memos = {id(m._activation_memo): m._activation_memo for m in model.modules()
             if isinstance(m, (FP8Linear, FP8MoEFFN)) and m._activation_memo is not None}
    for memo in memos.values():
        model.register_forward_pre_hook(memo.open)
        model.register_forward_hook(memo.close, always_call=True)
    return len(memos)


def _check_memo(activation_memo: ActivationMemo | None) -> None:
    if activation_memo is not None and not isinstance(activation_memo, ActivationMemo):
        raise ValueError(f"activation_memo must be an ActivationMemo or None, got "
                         f"{type(activation_memo).__name__}")


def _eager_cpu(x: object, *weights: Tensor) -> bool:
    """True when an inference forward may run the eager CPU body on cached weights: a plain
    CPU tensor that autograd won't record, outside export/compile/tracing/dispatch modes and
    autocast, weights on the CPU."""
    return (type(x) in (Tensor, nn.Parameter) and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())
            and all(w.device.type == "cpu" for w in weights)
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not torch.jit.is_tracing() and _get_current_dispatch_mode() is None
            and not torch.is_autocast_enabled("cpu"))


def _clear(module: nn.Module) -> None:
    for cache in (module._dequant_cache, module._activation_memo):
        if cache is not None:
            cache.clear()


def _cast_dtype(fn, dtype: torch.dtype) -> torch.dtype:
    """The floating dtype ``fn`` (an ``_apply`` function) turns ``dtype`` into."""
    out = fn(torch.empty(0, dtype=dtype))
    return out.dtype if isinstance(out, Tensor) and out.is_floating_point() else dtype


# FP8 weights and their fp32 scales: pinned under .to(dtype)/.half()/... (they still move)
_PINNED = ("weight_q", "weight_scale")
_PINNED_EXPERTS = tuple(f"{n}_{k}" for n in ("w_up", "w_gate", "w_down") for k in ("q", "scale"))


class FP8Linear(nn.Module):
    """``y = x @ W^T + b`` with FP8 GEMMs (DeepSeek-V3 1x128 / 128x128 scaling).

    Keeps ``nn.Linear``'s attribute surface: ``in_features``, ``out_features``, ``bias`` and
    ``weight`` (N, K): the master Parameter in training mode; in inference mode a dequantized
    copy in ``compute_dtype``, read-only (:class:`~rewriter.targets.fp8.ReadOnlyWeight`: an
    in-place write raises :class:`~rewriter.targets.fp8.FP8InferenceModeError` instead of
    changing a throw-away copy; load new weights through ``weight_q``/``weight_scale`` or
    ``load_state_dict``, or train with ``mode="training"``). ``weight_q``
    (float8_e4m3fn) and ``weight_scale`` (fp32) keep their dtypes under ``.to(dtype)``,
    ``.half()``, ``.bfloat16()``; ``compute_dtype`` and the bias follow such casts.
    ``quantized``: inference mode only, ``(q, scale)`` to store instead of nearest-rounding
    ``weight`` (e.g. :func:`rewriter.passes.gptq.gptq_quantize_blockwise`'s result), in
    :func:`~rewriter.targets.fp8.quantize_blockwise`'s format."""

    cache_dequantized = True  # class defaults: modules pickled before the cache existed
    _dequant_cache: _DequantCache | None = None
    _activation_memo: ActivationMemo | None = None

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, mode: str = "training",
                 activations: str = "fp8", pow2: bool = False, cache_dequantized: bool = True,
                 activation_memo: ActivationMemo | None = None,
                 quantized: tuple[Tensor, Tensor] | None = None):
        super().__init__()
        _check_modes(mode, activations)
        _check_quantized(quantized, weight, mode)
        _check_cache_flag(cache_dequantized)
        _check_memo(activation_memo)
        self.out_features, self.in_features = weight.shape
        self.mode, self.activations, self.pow2 = mode, activations, pow2
        self.cache_dequantized = cache_dequantized  # inference mode, CPU eager only
        self._dequant_cache = _DequantCache()
        self._activation_memo = activation_memo  # shared with sibling modules, or None
        self.compute_dtype = weight.dtype
        if mode == "training":
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        else:
            q, s = quantized or quantize_blockwise(weight.detach(), pow2=pow2)
            self.register_buffer("weight_q", q)  # (N, K) float8_e4m3fn
            self.register_buffer("weight_scale", s)  # (N/128, K/128) fp32
        if bias is None:
            self.bias = None
        elif mode == "training":
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        else:
            self.register_buffer("bias", bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Module, *, transposed: bool = False, **kwargs) -> FP8Linear:
        """From an ``nn.Linear`` (or GPT-2's Conv1D with ``transposed=True``: W is (in, out)).
        Training mode shares the module's Parameters; inference mode copies them quantized."""
        weight = linear.weight
        if transposed:
            weight = nn.Parameter(weight.detach().t().contiguous())
        return cls(weight, linear.bias, **kwargs)

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): new tensors, drop copies
        _clear(self)
        self.compute_dtype = _cast_dtype(fn, self.compute_dtype)
        return apply_pinned(self, fn, recurse, super()._apply, buffers=_PINNED)

    @property
    def weight(self) -> Tensor:
        """(N, K): the master weight (training), or the FP8 weight dequantized to
        ``compute_dtype`` (inference: a fresh read-only tensor per read)."""
        p = self._parameters.get("weight")
        if p is not None:
            return p
        q, s = self._buffers.get("weight_q"), self._buffers.get("weight_scale")
        if q is None or s is None:
            raise AttributeError(f"{type(self).__name__} has no weight yet")
        with torch.no_grad():
            return read_only(dequantize_blockwise(q, s).to(self.compute_dtype),
                             type(self).__name__)

    def dequantized_weight(self, x: Tensor | None = None) -> Tensor | None:
        """The cached fp32 weight (N, K) for an eager CPU forward on ``x``, built on first use;
        None when the cache is off or does not apply (see the module docstring)."""
        if self.mode != "inference" or not self.cache_dequantized or not _eager_cpu(
                self.weight_q if x is None else x, self.weight_q, self.weight_scale):
            return None
        if self._dequant_cache is None:
            self._dequant_cache = _DequantCache()
        q, s = self.weight_q, self.weight_scale
        return self._dequant_cache.get("weight", (q, s), lambda: dequantize_blockwise(q, s))

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N)
        if self.mode == "training":
            return _ops.fp8_linear_hp(x, self.weight, self.bias, self.pow2)
        w = self.dequantized_weight(x)
        if w is not None:  # the ops' CPU bodies on the cached weight: the same bits
            if self.activations == "fp8":
                memo = self._activation_memo
                return linear_dequantized(x, w, self.bias, self.pow2, x_fq=None if memo is None
                                          else memo.fake_quantized(x, self.pow2))
            return weight_only_linear_dequantized(x, w, self.bias)
        if self.activations == "fp8":
            return _ops.fp8_linear(x, self.weight_q, self.weight_scale, self.bias, self.pow2)
        return _ops.fp8_weight_only_linear(x, self.weight_q, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}, activations="
                f"{self.activations}, pow2={self.pow2}")


class FP8MoEFFN(MoEFFN):
    """An :class:`MoEFFN` whose routed experts run FP8 GEMMs; router stays fp32.

    Training: per-expert ``fp8_linear_hp`` on the stacked master weights. Inference: the stacked
    expert weights are stored FP8 (E, N, K) with (E, N/128, K/128) scales, and the eager path
    runs each projection of all experts as one grouped GEMM over tokens sorted by expert
    (DeepGEMM's contiguous layout): three launches per block, whatever E.
    """

    cache_dequantized = True
    _dequant_cache: _DequantCache | None = None
    _activation_memo: ActivationMemo | None = None

    def __init__(self, block: MoEFFN, *, mode: str = "training", activations: str = "fp8",
                 pow2: bool = False, cache_dequantized: bool = True,
                 activation_memo: ActivationMemo | None = None):
        nn.Module.__init__(self)
        _check_modes(mode, activations)
        _check_cache_flag(cache_dequantized)
        _check_memo(activation_memo)
        self.__dict__.update({k: v for k, v in block.__dict__.items()
                              if k not in ("_parameters", "_buffers", "_modules")})
        self._parameters = dict(block._parameters)
        self._buffers = dict(block._buffers)
        self._modules = dict(block._modules)
        self.mode, self.activations, self.pow2 = mode, activations, pow2
        self.cache_dequantized = cache_dequantized  # inference mode, CPU eager only
        self._dequant_cache = _DequantCache()
        self._activation_memo = activation_memo  # grouped up/gate read the same rows
        self._compute_dtype = block.w_up.dtype
        if mode == "inference":
            for name in ("w_up", "w_gate", "w_down"):
                w = self._parameters.pop(name, None)
                if w is None:
                    self.register_buffer(f"{name}_q", None)
                    self.register_buffer(f"{name}_scale", None)
                    object.__setattr__(self, name, None)
                    continue
                qs = [quantize_blockwise(we.detach(), pow2=pow2) for we in w.unbind(0)]
                self.register_buffer(f"{name}_q", torch.stack([q for q, _ in qs]))
                self.register_buffer(f"{name}_scale", torch.stack([s for _, s in qs]))
                self._buffers.pop(name, None)
                object.__setattr__(self, name, None)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    def _apply(self, fn, recurse=True):  # router, expert_bias, FP8 experts keep their dtype
        _clear(self)
        self._compute_dtype = _cast_dtype(fn, self._compute_dtype)
        return apply_pinned(self, fn, recurse, partial(nn.Module._apply, self),
                            buffers=("expert_bias", "last_load") + _PINNED_EXPERTS,
                            children=("router",))

    def dequantized_experts(self, name: str, x: Tensor | None = None) -> list[Tensor] | None:
        """Cached fp32 weights of every expert of projection ``name`` ("w_up", "w_gate",
        "w_down") for an eager CPU forward on ``x``: E tensors, built on first use; None when
        the cache is off, does not apply, or the projection does not exist."""
        q, s = getattr(self, f"{name}_q", None), getattr(self, f"{name}_scale", None)
        if self.mode != "inference" or not self.cache_dequantized or q is None or not \
                _eager_cpu(q if x is None else x, q, s):
            return None
        if self._dequant_cache is None:
            self._dequant_cache = _DequantCache()
        return self._dequant_cache.get(name, (q, s), lambda: [
            dequantize_blockwise(qe, se) for qe, se in zip(q.unbind(0), s.unbind(0))])

    def _cached_experts(self, x: Tensor) -> list[tuple] | None:
        """Per expert (gate, up, down, b_gate, b_up) with the cached fp32 weights, each
        projection's cache validated once for this call (not once per expert); None when the
        cache does not apply."""
        names = [n for n in ("w_gate", "w_up", "w_down") if getattr(self, f"{n}_q") is not None]
        cached = {n: self.dequantized_experts(n, x) for n in names}
        if any(c is None for c in cached.values()):
            return None
        E = self.config.num_experts
        none = [None] * E
        b_gate = self.b_gate.unbind(0) if self.b_gate is not None else none
        b_up = self.b_up.unbind(0) if self.b_up is not None else none
        return list(zip(cached.get("w_gate", none), cached["w_up"], cached["w_down"], b_gate,
                        b_up))

    # per-expert params: (gate, up, down, b_gate, b_up) as the base class expects
    def _experts(self):
        if self.mode == "training":
            return super()._experts()
        E = self.config.num_experts

        def split(name):  # per expert (name, e, q, s): _linear finds the cached weight by name
            q = getattr(self, f"{name}_q")
            s = getattr(self, f"{name}_scale")
            return [None] * E if q is None else [(name, e, qe, se) for e, (qe, se) in
                                                 enumerate(zip(q.unbind(0), s.unbind(0)))]

        b_gate = self.b_gate.unbind(0) if self.b_gate is not None else [None] * E
        b_up = self.b_up.unbind(0) if self.b_up is not None else [None] * E
        return list(zip(split("w_gate"), split("w_up"), split("w_down"), b_gate, b_up))

    def _linear(self, x: Tensor, w, b: Tensor | None) -> Tensor:
        if self.mode == "training":
            return _ops.fp8_linear_hp(x, w, b, self.pow2)
        if isinstance(w, Tensor):  # W8A16, the expert's cached fp32 weight (_dispatch_sorted)
            return weight_only_linear_dequantized(x, w, b)
        name, e, q, s = w
        cached = self.dequantized_experts(name, x)
        if cached is not None:  # the ops' CPU bodies on the cached weight: the same bits
            if self.activations == "fp8":
                return linear_dequantized(x, cached[e], b, self.pow2)
            return weight_only_linear_dequantized(x, cached[e], b)
        if self.activations == "fp8":
            return _ops.fp8_linear(x, q, s, b, self.pow2)
        return _ops.fp8_weight_only_linear(x, q, s, b)

    def _expert(self, params, xe: Tensor, we: Tensor) -> Tensor:
        w_gate, w_up, w_down, b_gate, b_up = params
        up = self._linear(xe, w_up, b_up)  # (n, F)
        h = self.act(self._linear(xe, w_gate, b_gate)) * up if w_gate is not None else \
            self.act(up)
        return self._linear(h, w_down, None) * we.unsqueeze(-1)  # (n, d): after down_proj (HF)

    def _dispatch_sorted(self, x: Tensor, topk_idx: Tensor, weights: Tensor):
        if self.mode == "training":
            return super()._dispatch_sorted(x, topk_idx, weights)
        if self.activations != "fp8":  # W8A16: the cache checked once per projection
            return super()._dispatch_sorted(x, topk_idx, weights, self._cached_experts(x))
        if self._activation_memo is not None:
            with self._activation_memo.scope():  # grouped up/gate share xs within this call
                return self._dispatch_grouped(x, topk_idx, weights)
        return self._dispatch_grouped(x, topk_idx, weights)

    def _dispatch_grouped(self, x: Tensor, topk_idx: Tensor, weights: Tensor):
        """Inference W8A8: tokens sorted by expert, one grouped GEMM per projection."""
        K, E = self.config.top_k, self.config.num_experts
        flat = topk_idx.reshape(-1)  # (T*K,)
        order = torch.argsort(flat, stable=True)  # slots grouped by expert
        counts = torch.bincount(flat, minlength=E)  # (E,)
        offsets = F.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)  # (E+1,)
        token = torch.div(order, K, rounding_mode="floor")  # (T*K,)
        ws = weights.reshape(-1).index_select(0, order)  # (T*K,)
        expert_of_row = flat.index_select(0, order)  # (T*K,)
        xs = x.index_select(0, token)  # (T*K, d) contiguous per expert
        up = self._grouped(xs, "w_up", offsets)
        if self.b_up is not None:
            up = up + self.b_up.index_select(0, expert_of_row)
        if self.w_gate_q is not None:
            gate = self._grouped(xs, "w_gate", offsets)
            if self.b_gate is not None:
                gate = gate + self.b_gate.index_select(0, expert_of_row)
            h = self.act(gate) * up  # (T*K, F)
        else:
            h = self.act(up)
        y = self._grouped(h, "w_down", offsets) * ws.unsqueeze(-1).to(h.dtype)  # after down
        out = x.new_zeros(x.shape).index_add_(0, token, y.to(x.dtype))  # (T, d)
        return out, counts

    def _grouped(self, x: Tensor, name: str, offsets: Tensor) -> Tensor:
        """One grouped GEMM of projection ``name`` over expert-sorted rows x (T, K)."""
        q, s = getattr(self, f"{name}_q"), getattr(self, f"{name}_scale")
        cached = self.dequantized_experts(name, x)
        if cached is not None:  # the op's CPU body on the cached weights: the same bits
            memo = self._activation_memo
            return grouped_linear_dequantized(
                x, cached.__getitem__, offsets, q.shape[1], self.pow2,
                x_fq=None if memo is None else memo.fake_quantized(x, self.pow2))
        return _ops.fp8_grouped_linear(x, q, s, offsets, self.pow2)
