"""Triton FP8 (E4M3) kernels with DeepSeek-V3 fine-grained scaling: quantization and GEMMs.

Three layers per op: a ``@triton.jit`` kernel (``_*_kernel``), a wrapper that validates and
allocates (``triton_*``), and the torch reference it must equal (``targets/fp8.py``; the grouped
one lives here). The custom ops / autograd sit on top of the wrappers elsewhere.

- ``triton_quantize_rowwise(x)``: one fp32 scale per 1x128 tile along K (activations).
- ``triton_quantize_blockwise(w)``: one fp32 scale per 128x128 block (weights).
  Both are bit-identical to ``quantize_rowwise`` / ``quantize_blockwise``: ``s = max(amax,
  AMAX_FLOOR) / 448`` (a normal fp32, also for zero tiles; NaN tile: NaN; ``pow2``:
  2^ceil(log2 s), computed exactly with integer ops), ``q =
  round_e4m3(x / s)`` with IEEE division (``div_rn``) and a rounding done in fp32 by bit tricks
  (round to nearest even, saturate at +-448, subnormals on the 2^-9 grid, NaN kept) before the
  cast, because the Triton interpreter's own fp32 -> fp8 cast is wrong (no saturation:
  500 -> 256; wrong when rounding carries into the exponent; ties away from even; subnormals
  flushed).
- ``triton_fp8_gemm(a_q, a_s, b_q, b_s)``: C = A @ B^T; A (M, K) rowwise-scaled, B (N, K)
  block-scaled (weights) or rowwise-scaled (``b_layout="row"``, Wgrad). Per K-block of 128:
  ``acc += dot(a, b^T) * (s_a[:, None] * s_b[None, :])``: the FP32 accumulator is promoted
  every 128 of K (DeepSeek-V3's fine-grained accumulation). Optional fused bias.
- ``triton_fp8_grouped_gemm(...)``: MoE experts in DeepGEMM's contiguous layout: tokens sorted
  by expert, ``offsets`` (E+1,) row boundaries, B (E, N, K). One launch; each program finds its
  expert by scanning ``offsets`` (no host sync); empty experts own no tiles.

Dims that are not multiples of 128 keep partial tiles (masks). Triton decides when a function
is decorated whether it is compiled (CUDA) or interpreted (``TRITON_INTERPRET=1``, CPU tensors),
and its own library is decorated when triton is imported: on a CPU-only machine the variable
must be set before the first ``import triton`` of the process.
"""

import math
import os

import torch
from rewriter.targets.fp8 import AMAX_FLOOR, BLOCK, FP8_DTYPE, fp8_gemm_reference

try:  # the module imports without triton; the wrappers then raise
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = [
    "triton_available",
    "triton_cast_e4m3",
    "triton_quantize_rowwise",
    "triton_quantize_blockwise",
    "triton_fp8_gemm",
    "triton_fp8_grouped_gemm",
    "fp8_grouped_gemm_reference",
]

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ------------------------------------------------------------------------------------- kernels

if triton is not None:

    _AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)  # kernels read globals only as constexpr

    @triton.jit
    def _round_e4m3_abs(a):
        """|y| (fp32, >= 0 or NaN) -> the nearest E4M3 magnitude as fp32 (RNE, saturating at
        448, Inf too); NaN comes out as some number (the caller writes NaN's code)."""
        small = a < 0.015625  # below 2^-6: E4M3 subnormals (False for NaN)
        # normal range: round to nearest even on the 3 kept mantissa bits (20 dropped); a carry
        # into the exponent is the right answer. Inf's bits bound the magnitude so NaN cannot
        # overflow the int32 add; 0xFFF00000 as int32 is -1048576.
        mag = tl.minimum(a.to(tl.int32, bitcast=True), 0x7F800000)
        normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        # subnormal range: fp32 numbers in [2^14, 2^15) are spaced 2^-9 apart, so the addition
        # rounds |y| to the E4M3 subnormal grid (nearest even); the subtraction is exact
        sub = (tl.where(small, a, 0.0) + 16384.0) - 16384.0
        return tl.minimum(tl.where(small, sub, normal), 448.0)

    @triton.jit
    def _to_e4m3(y, dtype: tl.constexpr):
        """fp32 -> E4M3 (``dtype``), bit-identical to ``rewriter.targets.fp8``'s rounding
        (RNE, saturating at +-448, -0.0 kept, NaN -> 0x7F | sign).

        The magnitude is rounded on the E4M3 grid in fp32 and cast (every backend converts
        grid values exactly); the sign bit is OR-ed into the byte, not applied as a float
        negation: compiled for an H200 (Triton 3.6), ``where(y < 0, -r, r)`` lost the sign of
        zero (-6.3e-5 came out +0x00, torch's -0 is 0x80), and the interpreter's cast turns NaN
        into a number, so NaN's code is written as bits too."""
        bits = y.to(tl.int32, bitcast=True)
        sign = ((bits >> 24) & 0x80).to(tl.uint8)  # 0x80 for a set sign bit
        a = (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True)  # |y|, NaN stays NaN
        mag = _round_e4m3_abs(a).to(dtype).to(tl.uint8, bitcast=True)
        mag = tl.where(a != a, 0x7F, mag).to(tl.uint8)
        return (mag | sign).to(dtype, bitcast=True)

    @triton.jit
    def _tile_scale(amax, has_nan, POW2: tl.constexpr, FLOOR: tl.constexpr):
        """fp32 scale from a tile's amax, as ``rewriter.targets.fp8.compute_scale``:
        max(amax, FLOOR) / 448 (FLOOR = AMAX_FLOOR: never 0 or subnormal), a NaN in the tile
        -> NaN (``has_nan``: GPU max reductions may drop NaN)."""
        amax = tl.where(amax < FLOOR, FLOOR, amax)
        amax = tl.where(has_nan != 0, float("nan"), amax)
        s = tl.div_rn(amax, 448.0)
        if POW2:
            # 2^ceil(fl32(log2 s)) exactly as torch computes it (log2 correctly rounded to
            # fp32): s = 2^k (1 + m/2^23), log2 s = k + d with d ~ m / (2^23 ln 2) =
            # m * 1.7198e-7 for the small m where it matters; fl(k + d) == k means ceil gives
            # k, else k + 1. The margins to the rounding boundaries are >= 0.2 %, far above
            # this formula's error; no log2/exp2 (approximate on GPUs) is used.
            tiny = s < 1.1754943508222875e-38  # fp32 subnormal scale: normalise first
            sn = tl.where(tiny, tl.where(tiny, s, 0.0) * 18446744073709551616.0, s)
            b = sn.to(tl.int32, bitcast=True)
            k = (b >> 23) - 127 - tl.where(tiny, 64, 0)
            kf = k.to(tl.float32)
            lg = kf + (b & 0x7FFFFF).to(tl.float32) * 1.7198265086280863e-07
            e = tl.where(lg == kf, k, k + 1)
            low = e < -126  # 2^e is subnormal: build 2^(e + 64), then scale exactly
            p = ((tl.where(low, e + 64, e) + 127) << 23).to(tl.float32, bitcast=True)
            s = tl.where(s != s, s, tl.where(low, p * 5.421010862427522e-20, p))
        return s

    @triton.jit
    def _cast_e4m3_kernel(x_ptr, q_ptr, n, BLOCK_SIZE: tl.constexpr):
        offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        tl.store(q_ptr + offs, _to_e4m3(x, q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _quant_rowwise_kernel(
        x_ptr, q_ptr, s_ptr, M, K, KB,
        POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # program: rows [pid_m * BLOCK_M, +BLOCK_M) x the 1x128 tile pid_k of each row
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
        rmask = rows < M
        mask = rmask[:, None] & (cols < K)[None, :]
        offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (BM, BK)
        amax = tl.max(tl.abs(x), axis=1)  # (BM,)
        has_nan = tl.max((x != x).to(tl.int32), axis=1)
        s = _tile_scale(amax, has_nan, POW2, _AMAX_FLOOR)
        q = _to_e4m3(tl.div_rn(x, s[:, None]), q_ptr.dtype.element_ty)
        tl.store(q_ptr + offs, q, mask=mask)
        tl.store(s_ptr + rows.to(tl.int64) * KB + pid_k, s, mask=rmask)

    @triton.jit
    def _quant_blockwise_kernel(
        w_ptr, q_ptr, s_ptr, N, K, KB,
        POW2: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # program: the 128x128 block (pid_n, pid_k)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK + tl.arange(0, BLOCK)
        cols = pid_k * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < N)[:, None] & (cols < K)[None, :]
        offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (B, B)
        amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
        has_nan = tl.max(tl.max((w != w).to(tl.int32), axis=1), axis=0)
        s = _tile_scale(amax, has_nan, POW2, _AMAX_FLOOR)
        q = _to_e4m3(tl.div_rn(w, s), q_ptr.dtype.element_ty)
        tl.store(q_ptr + offs, q, mask=mask)
        tl.store(s_ptr + pid_n * KB + pid_k, s)

    @triton.jit
    def _gemm_tile(
        a_ptr, as_ptr, b_ptr, bs_ptr, rm, rn, n0, K, KB, k_iters,
        B_ROW: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """acc (BM, BN) fp32 = sum over K-blocks of dot(a, b^T) * s_a s_b for rows rm of A and
        rows rn of B (both already valid indices: callers wrap or clamp them); n0 = the tile's
        first row of B (a valid index)."""
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]  # (BM, BK)
        b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * K + rk[:, None]  # (BK, BN): B^T, K-major
        as_ptrs = as_ptr + rm.to(tl.int64) * KB  # (BM,)
        if B_ROW:
            bs_ptrs = bs_ptr + rn.to(tl.int64) * KB  # (BN,): one scale per row of B
        elif BLOCK_K % BLOCK_N == 0:  # the tile lies in one 128-row block of B: a scalar
            bs_ptrs = bs_ptr + (n0 // BLOCK_K).to(tl.int64) * KB  # (wrapped rows are unused)
        else:
            bs_ptrs = bs_ptr + (rn // BLOCK_K).to(tl.int64) * KB  # (BN,): per 128x128 block
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, k_iters):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                kmask = rk < K - kb * BLOCK_K
                a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
            sa = tl.load(as_ptrs + kb)
            sb = tl.load(bs_ptrs + kb)
            # promotion: the tensor-core partial sum of one 128-deep block is scaled and added
            # to the fp32 accumulator. A scalar sb (one weight block per tile) makes the scale
            # a (BM, 1) column: the same products, without a register per column of the tile
            if B_ROW or BLOCK_K % BLOCK_N != 0:
                scale = sa[:, None] * sb[None, :]
            else:
                scale = sa[:, None] * sb
            acc += tl.dot(a, b, out_dtype=tl.float32) * scale
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        return acc

    @triton.jit
    def _fp8_gemm_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K, KB, M_BUCKET,
        B_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # 1-D grid, grouped ordering: GROUP_M row tiles sweep all column tiles together (L2)
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_m
        pid_n = (pid % in_group) // group_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # wrapped indices load valid (unused) data instead of masking every load
        acc = _gemm_tile(a_ptr, as_ptr, b_ptr, bs_ptr, rows % M, cols % N, pid_n * BLOCK_N,
                         K, KB, KB, B_ROW, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fp8_grouped_gemm_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, off_ptr, c_ptr, N, K, KB, NB, E,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # grid: (column tiles, row tiles). Row tile t is the t-th BLOCK_M-row tile in the
        # concatenation of the experts' tiles (each expert's rows start a new tile), found by a
        # scan over offsets; tiles past the last expert's do nothing.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        expert = pid_m * 0 - 1
        row0 = pid_m * 0
        row_end = pid_m * 0
        seen = pid_m * 0  # tiles of experts before e
        end = tl.load(off_ptr)
        for e in range(0, E):
            start = end
            end = tl.load(off_ptr + e + 1)
            tiles = tl.cdiv(end - start, BLOCK_M)
            hit = (pid_m >= seen) & (pid_m < seen + tiles)
            expert = tl.where(hit, e, expert)
            row0 = tl.where(hit, start + (pid_m - seen) * BLOCK_M, row0)
            row_end = tl.where(hit, end, row_end)
            seen += tiles
        found = expert >= 0
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < row_end
        ex = tl.maximum(expert, 0).to(tl.int64)
        acc = _gemm_tile(a_ptr, as_ptr, b_ptr + ex * N * K, bs_ptr + ex * NB * KB,
                         tl.where(rmask, rows, row0), cols % N, pid_n * BLOCK_N, K, KB,
                         tl.where(found, KB, 0), False, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        mask = rmask[:, None] & (cols < N)[None, :]
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _kernel_mode() -> str:
    """'interpret' (Triton's CPU interpreter), 'compiled' (GPU), 'mixed' (TRITON_INTERPRET was
    set between importing triton and importing this module: unusable) or 'none'."""
    if triton is None:
        return "none"
    ours = type(_fp8_gemm_kernel).__name__ == "InterpretedFunction"
    theirs = type(tl.cdiv).__name__ == "InterpretedFunction"  # triton's own @jit library
    return "mixed" if ours != theirs else ("interpret" if ours else "compiled")


def _interpreting() -> bool:
    """True when the kernels run on Triton's CPU interpreter."""
    return _kernel_mode() == "interpret"


def triton_available() -> bool:
    """Triton importable and able to run here: a CUDA device, or the interpreter
    (``TRITON_INTERPRET=1`` set before triton was first imported)."""
    mode = _kernel_mode()
    return mode == "interpret" or (mode == "compiled" and torch.cuda.is_available())


# ------------------------------------------------------------------------- launch configurations

# On a GPU, BLOCK_M/BLOCK_N are autotuned; BLOCK_K = 128 is the scaling granularity. Two fp32
# tiles live at once (accumulator + the block's dot), so a 128x128 tile wants 8 warps. The
# interpreter gets one fixed config per call (autotune with several configs fails there); its
# fp8 dot is a numpy fp16 matmul whose time grows with the padded tile, so small M gets small
# tiles.
_QUANT_BLOCK_M = 32  # rows per quantization program (x 128 columns)


def _interp_blocks(m: int) -> dict:
    return dict(BLOCK_M=16 if m <= 16 else 32, BLOCK_N=32)


def _gemm_configs() -> list:
    shapes = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        (128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4),
        (64, 256, 8, 3), (64, 64, 4, 5),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]


AUTOTUNE_ENV = "REWRITER_FP8_AUTOTUNE"
"""Set to ``0`` to launch every GEMM with its first config (128x128, 8 warps, 3 stages)
instead of benchmarking all six per new shape key. Autotuning compiles each config once per
key: a model's first FP8 training step on a GPU compiles ~6x as many kernels (minutes); the
tuned choice is at most a few percent faster at large shapes (BENCHMARKS.md)."""

_TUNED: dict = {}  # (kernel name, autotune on) -> autotuned wrapper (built on first GPU use)


def _tuned(name: str):
    autotune = os.environ.get(AUTOTUNE_ENV, "1") != "0"
    if (name, autotune) not in _TUNED:
        configs = _gemm_configs() if autotune else _gemm_configs()[:1]  # one: no benchmarking
        if name == "gemm":
            _TUNED[name, autotune] = triton.autotune(
                configs=configs, key=["M_BUCKET", "N", "K", "B_ROW", "HAS_BIAS"],
            )(_fp8_gemm_kernel)
        else:
            _TUNED[name, autotune] = triton.autotune(
                configs=configs, key=["N", "K", "E"],
            )(_fp8_grouped_gemm_kernel)
    return _TUNED[name, autotune]


# ------------------------------------------------------------------------------------ wrappers


def _require_triton(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'rewriter[gpu]')")
    if _kernel_mode() == "mixed":
        raise RuntimeError("TRITON_INTERPRET changed after triton was imported; set it before "
                           "the first import of triton")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if not _interpreting() and any(d.type != "cuda" for d in devices):
        raise ValueError(
            "Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
            f"triton is first imported (got {', '.join(sorted(map(str, devices)))})")


def _check_2d(x: torch.Tensor, name: str, dtypes: tuple) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have 2 dims, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {x.dtype}")
    return x.contiguous()


def _check_shape(x: torch.Tensor, name: str, shape: tuple) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _as_input(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype == torch.float64 else x  # fp64 -> fp32 as the reference does


def triton_cast_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Elementwise ``x.float().to(torch.float8_e4m3fn)`` through the kernels' rounding helper
    (RNE, saturating at +-448, NaN kept); any shape."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"x must be a floating tensor, got {getattr(x, 'dtype', type(x))}")
    _require_triton(x)
    xf = x.float().contiguous()
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    n = xf.numel()
    if n:
        size = 1024
        _cast_e4m3_kernel[(triton.cdiv(n, size),)](xf, q, n, BLOCK_SIZE=size)
    return q


def triton_quantize_rowwise(x: torch.Tensor, pow2: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> q (M, K) fp8, s (M, ceil(K/128)) fp32; equals ``quantize_rowwise``."""
    x = _as_input(_check_2d(x, "x", _FLOATS))
    _require_triton(x)
    m, k = x.shape
    kb = triton.cdiv(k, BLOCK)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, kb), dtype=torch.float32, device=x.device)
    if m and k:
        bm = 64 if _interpreting() else _QUANT_BLOCK_M  # interpreter: fewer programs
        _quant_rowwise_kernel[(triton.cdiv(m, bm), kb)](
            x, q, s, m, k, kb, POW2=bool(pow2), BLOCK_M=bm, BLOCK_K=BLOCK,
            **({} if _interpreting() else {"num_warps": 4}))
    return q, s


def triton_quantize_blockwise(w: torch.Tensor, pow2: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) fp8, s (ceil(N/128), ceil(K/128)) fp32; equals
    ``quantize_blockwise``."""
    w = _as_input(_check_2d(w, "w", _FLOATS))
    _require_triton(w)
    n, k = w.shape
    nb, kb = triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK)
    q = torch.empty((n, k), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((nb, kb), dtype=torch.float32, device=w.device)
    if n and k:
        _quant_blockwise_kernel[(nb, kb)](
            w, q, s, n, k, kb, POW2=bool(pow2), BLOCK=BLOCK,
            **({} if _interpreting() else {"num_warps": 8}))
    return q, s


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(d) for d in _OUT_DTYPES]}, "
                         f"got {out_dtype}")


def triton_fp8_gemm(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    *,
    b_layout: str = "block",
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """C (M, N) = A @ B^T from A (M, K) fp8 with s (M, ceil(K/128)) and B (N, K) fp8 with s
    (ceil(N/128), ceil(K/128)) (``b_layout="block"``) or (N, ceil(K/128)) (``"row"``); fp32
    accumulation promoted every 128 of K; optional bias (N,). Equals ``fp8_gemm_reference``."""
    if b_layout not in ("block", "row"):
        raise ValueError(f"b_layout must be 'block' or 'row', got {b_layout!r}")
    _check_out_dtype(out_dtype)
    a_q = _check_2d(a_q, "a_q", (FP8_DTYPE,))
    b_q = _check_2d(b_q, "b_q", (FP8_DTYPE,))
    a_s = _check_2d(a_s, "a_s", (torch.float32,))
    b_s = _check_2d(b_s, "b_s", (torch.float32,))
    m, k = a_q.shape
    n = b_q.shape[0]
    if b_q.shape[1] != k:
        raise ValueError(f"a_q {tuple(a_q.shape)} and b_q {tuple(b_q.shape)} differ in K")
    kb = math.ceil(k / BLOCK)
    _check_shape(a_s, "a_s", (m, kb))
    nb = n if b_layout == "row" else math.ceil(n / BLOCK)
    _check_shape(b_s, f"b_s ({b_layout} layout)", (nb, kb))
    tensors = [a_q, a_s, b_q, b_s]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOATS:
            raise TypeError("bias must be a floating tensor")
        _check_shape(bias, "bias", (n,))
        bias = _as_input(bias).contiguous()
        tensors.append(bias)
    _require_triton(*tensors)
    c = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        c.zero_()
        return c if bias is None else (c.float() + bias.float()).to(out_dtype)
    args = (a_q, a_s, b_q, b_s, bias if bias is not None else a_s, c, m, n, k, kb,
            min(triton.next_power_of_2(m), 4096))
    flags = dict(B_ROW=b_layout == "row", HAS_BIAS=bias is not None, EVEN_K=k % BLOCK == 0,
                 BLOCK_K=BLOCK, GROUP_M=8)
    if _interpreting():
        cfg = _interp_blocks(m)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _fp8_gemm_kernel[grid](*args, **flags, **cfg)
    else:
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _tuned("gemm")[grid](*args, **flags)
    return c


def _check_grouped(a_q, a_s, b_q, b_s, offsets):
    a_q = _check_2d(a_q, "a_q", (FP8_DTYPE,))
    a_s = _check_2d(a_s, "a_s", (torch.float32,))
    for x, name, dims in ((b_q, "b_q", 3), (b_s, "b_s", 3), (offsets, "offsets", 1)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != dims:
            raise ValueError(f"{name} must have {dims} dims, got shape {tuple(x.shape)}")
    if b_q.dtype != FP8_DTYPE:
        raise TypeError(f"b_q must be {FP8_DTYPE}, got {b_q.dtype}")
    if b_s.dtype != torch.float32:
        raise TypeError(f"b_s must be torch.float32, got {b_s.dtype}")
    if offsets.dtype != torch.int32:
        raise TypeError(f"offsets must be torch.int32, got {offsets.dtype}")
    t, k = a_q.shape
    e, n, kk = b_q.shape
    if kk != k:
        raise ValueError(f"a_q {tuple(a_q.shape)} and b_q {tuple(b_q.shape)} differ in K")
    kb = math.ceil(k / BLOCK)
    _check_shape(a_s, "a_s", (t, kb))
    _check_shape(b_s, "b_s", (e, math.ceil(n / BLOCK), kb))
    _check_shape(offsets, "offsets", (e + 1,))
    if offsets.device.type == "cpu":  # values checked where it costs no device sync
        o = offsets.tolist()
        if o[0] != 0 or o[-1] != t or any(x > y for x, y in zip(o, o[1:])):
            raise ValueError(f"offsets must rise from 0 to {t} (the rows of a_q), got {o}")
    return a_q, a_s, b_q.contiguous(), b_s.contiguous(), offsets.contiguous()


def fp8_grouped_gemm_reference(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """out[rows of e] = A[rows of e] @ B[e]^T (``fp8_gemm_reference``, block-scaled B) with rows
    of e = offsets[e]:offsets[e+1]; A (T, K) rowwise-scaled, B (E, N, K), out (T, N)."""
    t, n = a_q.shape[0], b_q.shape[1]
    out = torch.zeros((t, n), dtype=out_dtype, device=a_q.device)
    bounds = offsets.tolist()
    for e, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if hi > lo:
            out[lo:hi] = fp8_gemm_reference(a_q[lo:hi], a_s[lo:hi], b_q[e], b_s[e],
                                            out_dtype=out_dtype)
    return out


def triton_fp8_grouped_gemm(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """MoE experts in one launch (DeepGEMM contiguous layout): A (T, K) fp8 rows sorted by
    expert with s (T, ceil(K/128)); B (E, N, K) fp8 with s (E, ceil(N/128), ceil(K/128));
    offsets (E+1,) int32, 0 = offsets[0] <= ... <= offsets[E] = T. Returns (T, N), equal to
    ``fp8_grouped_gemm_reference``. Empty experts cost nothing; offsets stay on the device."""
    _check_out_dtype(out_dtype)
    a_q, a_s, b_q, b_s, offsets = _check_grouped(a_q, a_s, b_q, b_s, offsets)
    _require_triton(a_q, a_s, b_q, b_s, offsets)
    t, k = a_q.shape
    e, n, _ = b_q.shape
    c = torch.empty((t, n), dtype=out_dtype, device=a_q.device)
    if t == 0 or n == 0:
        return c
    if k == 0 or e == 0:
        return c.zero_()
    kb, nb = triton.cdiv(k, BLOCK), triton.cdiv(n, BLOCK)
    args = (a_q, a_s, b_q, b_s, offsets, c, n, k, kb, nb, e)
    flags = dict(EVEN_K=k % BLOCK == 0, BLOCK_K=BLOCK)
    if _interpreting():
        cfg = _interp_blocks(1)  # experts' row tiles are often short
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(t, cfg["BLOCK_M"]) + e)
        _fp8_grouped_gemm_kernel[grid](*args, **flags, **cfg)
    else:
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(t, meta["BLOCK_M"]) + e)
        _tuned("grouped")[grid](*args, **flags)
    return c
