"""FP8 block-scaled GEMMs (Triton) vs torch bf16 matmul vs torch._scaled_mm (a benchmark).

    python bench/fp8_gemm.py --out fp8_gemm.json     # on a GPU (H100/H200): the full table
    python bench/fp8_gemm.py --quick                 # tiny shapes; on a CPU via the interpreter

Checks first (exit status 1 if one fails): on the device, the quantization kernels are
bit-identical to targets/fp8.py and the dense and grouped GEMMs equal the dequantise-then-fp32
references (relative error = max abs error / max abs reference). Then, per shape, TFLOP/s
(2 M N K / time, median of triton.testing.do_bench) of:

- bf16: ``a @ w.T`` in bf16 (grouped: the faster of ``torch._grouped_mm`` and a loop over
  experts);
- scaled_mm: ``torch._scaled_mm`` with rowwise fp32 scales (one per row of A and of B), bf16 out
  (grouped: a loop over experts); "n/a" where this torch/GPU lacks it;
- ours: ``triton_fp8_gemm`` (1x128 activation scales, 128x128 weight scales, fp32 promotion
  every 128 of K), bf16 out; grouped: ``triton_fp8_grouped_gemm``, one launch.

Operands are quantized before timing (the GEMM alone is timed). Autotuning happens on the first
call of each shape, outside the timed region. Prints a markdown table; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


import triton  # noqa: E402
from rewriter.targets import fp8 as ref  # noqa: E402
from rewriter.targets import triton_fp8 as tf  # noqa: E402

DENSE = [(4096, 4096, 4096), (8192, 7168, 2048), (16384, 4096, 7168), (128, 7168, 4096)]
GROUPED = [  # (name, tokens per expert, N, K)
    ("moe balanced 8x2048", [2048] * 8, 4096, 7168),
    ("moe imbalanced", [6144, 3072, 2048, 2048, 1536, 1024, 512, 0], 4096, 7168),
]
QUICK_DENSE = [(64, 96, 256), (7, 130, 200)]
QUICK_GROUPED = [("moe tiny", [16, 0, 5, 11], 64, 256)]
GEMM_TOL = 2e-3  # GPU tensor cores add a 128-deep block with < fp32 precision; CPU: exact


def bench_ms(fn, cuda: bool) -> float:
    if cuda:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rowwise_full(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row over the whole K (torch._scaled_mm's rowwise format): q, s (rows, 1)."""
    s = ref.compute_scale(x.float().abs().amax(dim=1, keepdim=True))
    return (x.float() / s).to(ref.FP8_DTYPE), s


def scaled_mm_fn(a: torch.Tensor, w: torch.Tensor):
    """A callable computing a @ w.T with torch._scaled_mm (rowwise scales), or the reason it
    cannot run here."""
    if not hasattr(torch, "_scaled_mm"):
        return None, "torch._scaled_mm missing"
    a_q, a_s = rowwise_full(a)
    w_q, w_s = rowwise_full(w)
    b = w_q.t()  # (K, N) column-major, as _scaled_mm wants
    b_s = w_s.t().contiguous()  # (1, N)

    def fn():
        return torch._scaled_mm(a_q, b, scale_a=a_s, scale_b=b_s, out_dtype=torch.bfloat16)

    try:
        out = fn()
        err = rel_err(out, (a_q.float() * a_s) @ (w_q.float() * w_s).T)
        if err > 1e-2:
            return None, f"torch._scaled_mm wrong here (rel err {err:.1e})"
    except Exception as e:  # noqa: BLE001 - any failure means "unavailable"
        return None, f"torch._scaled_mm unavailable: {type(e).__name__}: {str(e)[:120]}"
    return fn, ""


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def same_fp8(got: torch.Tensor, want: torch.Tensor) -> bool:
    g, w = got.cpu(), want.cpu()
    nan = w.float().isnan()
    return bool(torch.equal(g.float().isnan(), nan)
                and torch.equal(g.view(torch.uint8)[~nan], w.view(torch.uint8)[~nan]))


def same_scales(got: torch.Tensor, want: torch.Tensor) -> bool:
    g, w = got.cpu(), want.cpu()
    return bool(torch.equal(g.isnan(), w.isnan()) and torch.equal(g[~w.isnan()], w[~w.isnan()]))


def checks(dev: str, quick: bool) -> dict:
    """Correctness on this device before any timing; returns {name: value}, raises on failure."""
    g = torch.Generator().manual_seed(0)
    m, n, k = (40, 96, 200) if quick else (1000, 1536, 2000)
    x = torch.randn(m, k, generator=g)
    x[:, 7] *= 300.0  # an outlier column
    x[3, :128] = 0.0  # an all-zero tile
    w = torch.randn(n, k, generator=g) * 0.02
    out: dict = {}
    for pow2 in (False, True):
        q, s = tf.triton_quantize_rowwise(x.to(dev), pow2=pow2)
        q_ref, s_ref = ref.quantize_rowwise(x, pow2=pow2)
        out[f"quantize_rowwise bit-identical (pow2={pow2})"] = (
            same_fp8(q, q_ref) and same_scales(s, s_ref))
        q, s = tf.triton_quantize_blockwise(w.to(dev), pow2=pow2)
        q_ref, s_ref = ref.quantize_blockwise(w, pow2=pow2)
        out[f"quantize_blockwise bit-identical (pow2={pow2})"] = (
            same_fp8(q, q_ref) and same_scales(s, s_ref))
    a_q, a_s = ref.quantize_rowwise(x)
    bias = torch.randn(n, generator=g)
    for layout in ("block", "row"):
        b_q, b_s = ref.quantize_blockwise(w) if layout == "block" else ref.quantize_rowwise(w)
        want = ref.fp8_gemm_reference(a_q, a_s, b_q, b_s, b_layout=layout, bias=bias)
        got = tf.triton_fp8_gemm(a_q.to(dev), a_s.to(dev), b_q.to(dev), b_s.to(dev),
                                 b_layout=layout, bias=bias.to(dev))
        out[f"gemm {layout} rel err ({m}x{n}x{k})"] = rel_err(got.cpu(), want)
    counts = [3, 0, 17, 1, 0, 40] if quick else [300, 0, 517, 1, 0, 900]
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    t = int(offsets[-1])
    ga_q, ga_s = ref.quantize_rowwise(torch.randn(t, k, generator=g))
    qs = [ref.quantize_blockwise(torch.randn(n, k, generator=g) * 0.02) for _ in counts]
    gb_q, gb_s = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    want = tf.fp8_grouped_gemm_reference(ga_q, ga_s, gb_q, gb_s, offsets)
    got = tf.triton_fp8_grouped_gemm(*(v.to(dev) for v in (ga_q, ga_s, gb_q, gb_s, offsets)))
    out[f"grouped gemm rel err (counts {counts})"] = rel_err(got.cpu(), want)
    return out


def dense_row(m: int, n: int, k: int, dev: str, cuda: bool) -> dict:
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
    a_q, a_s = tf.triton_quantize_rowwise(a)
    w_q, w_s = tf.triton_quantize_blockwise(w)
    ours = lambda: tf.triton_fp8_gemm(a_q, a_s, w_q, w_s, out_dtype=torch.bfloat16)  # noqa: E731
    ours()  # autotune
    row = {"shape": f"{m}x{n}x{k}", "flop": 2 * m * n * k,
           "bf16_ms": bench_ms(lambda: a @ w.T, cuda), "ours_ms": bench_ms(ours, cuda)}
    fn, why = scaled_mm_fn(a, w)
    row["scaled_mm_ms"] = bench_ms(fn, cuda) if fn else None
    row["scaled_mm_note"] = why
    if cuda and hasattr(tf, "_TUNED") and ("gemm", True) in tf._TUNED:
        row["config"] = str(tf._TUNED["gemm", True].best_config)
    return row


def grouped_row(name: str, counts: list, n: int, k: int, dev: str, cuda: bool) -> dict:
    e, t = len(counts), sum(counts)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32,
                           device=dev)
    bounds = offsets.tolist()
    a = torch.randn(t, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(e, n, k, device=dev) * 0.02).to(torch.bfloat16)
    a_q, a_s = tf.triton_quantize_rowwise(a)
    qs = [tf.triton_quantize_blockwise(w[i]) for i in range(e)]
    w_q, w_s = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    del qs
    ours = lambda: tf.triton_fp8_grouped_gemm(  # noqa: E731
        a_q, a_s, w_q, w_s, offsets, out_dtype=torch.bfloat16)
    ours()  # autotune

    def bf16_loop():
        return [a[lo:hi] @ w[i].T for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))
                if hi > lo]

    row = {"shape": f"{name}: T={t} E={e} N={n} K={k}", "flop": 2 * t * n * k,
           "ours_ms": bench_ms(ours, cuda), "bf16_ms": bench_ms(bf16_loop, cuda),
           "bf16_note": "loop over experts"}
    if hasattr(torch, "_grouped_mm"):
        try:
            w_t = w.transpose(1, 2)  # (E, K, N)
            ends = offsets[1:].contiguous()
            gm = lambda: torch._grouped_mm(a, w_t, offs=ends, out_dtype=torch.bfloat16)  # noqa
            if rel_err(gm()[: bounds[1]], a[: bounds[1]] @ w[0].T) < 1e-2:
                ms = bench_ms(gm, cuda)
                if ms < row["bf16_ms"]:
                    row["bf16_ms"], row["bf16_note"] = ms, "torch._grouped_mm"
        except Exception as ex:  # noqa: BLE001
            row["bf16_note"] += f" (_grouped_mm unavailable: {type(ex).__name__})"
    fns = []
    why = ""
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if hi > lo:
            fn, why = scaled_mm_fn(a[lo:hi], w[i])
            if fn is None:
                fns = None
                break
            fns.append(fn)
    row["scaled_mm_ms"] = bench_ms(lambda: [f() for f in fns], cuda) if fns else None
    row["scaled_mm_note"] = why or "loop over experts"
    if cuda and ("grouped", True) in getattr(tf, "_TUNED", {}):
        row["config"] = str(tf._TUNED["grouped", True].best_config)
    return row


def tflops(row: dict, key: str):
    ms = row.get(key)
    return None if ms is None else row["flop"] / (ms * 1e-3) / 1e12


def fmt(v, spec: str = ".4g") -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter smoke run)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not tf.triton_available():
        print("triton cannot run here (no CUDA, no TRITON_INTERPRET)", file=sys.stderr)
        return 2
    dev = "cuda" if cuda and not tf._interpreting() else "cpu"
    if dev == "cpu" and not args.quick:
        print("no GPU: running the --quick shapes on the interpreter", file=sys.stderr)
        args.quick = True
    t0 = time.perf_counter()
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor()
            or "cpu", "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "interpreter": tf._interpreting()}
    print(f"# fp8 GEMM bench on {meta['device']} (torch {meta['torch']}, triton "
          f"{meta['triton']}{', interpreter' if meta['interpreter'] else ''})\n", flush=True)

    check = checks(dev, args.quick)
    ok = True
    for name, v in check.items():
        good = v if isinstance(v, bool) else v <= (GEMM_TOL if dev == "cuda" else 1e-5)
        ok &= bool(good)
        print(f"- check {name}: {v if isinstance(v, bool) else f'{v:.2e}'} "
              f"{'ok' if good else 'FAILED'}", flush=True)
    if not ok:
        print("correctness checks failed; no timings", file=sys.stderr)
        if args.out:
            args.out.write_text(json.dumps({"meta": meta, "checks": check, "ok": False},
                                           indent=2))
        return 1
    print(f"\nchecks passed in {time.perf_counter() - t0:.0f} s\n", flush=True)

    rows = []
    for m, n, k in QUICK_DENSE if args.quick else DENSE:
        rows.append(dense_row(m, n, k, dev, cuda=dev == "cuda"))
        print(f"  {rows[-1]['shape']} done at {time.perf_counter() - t0:.0f} s", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    for name, counts, n, k in QUICK_GROUPED if args.quick else GROUPED:
        rows.append(grouped_row(name, counts, n, k, dev, cuda=dev == "cuda"))
        print(f"  {rows[-1]['shape']} done at {time.perf_counter() - t0:.0f} s", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()

    print("\n| shape (MxNxK) | bf16 TFLOP/s | scaled_mm TFLOP/s | ours TFLOP/s | ours / bf16 "
          "| ours / scaled_mm |")
    print("|---|---:|---:|---:|---:|---:|")
    notes = []
    for r in rows:
        r["bf16_tflops"], r["scaled_mm_tflops"], r["ours_tflops"] = (
            tflops(r, "bf16_ms"), tflops(r, "scaled_mm_ms"), tflops(r, "ours_ms"))
        vs_bf16 = r["ours_tflops"] / r["bf16_tflops"]
        vs_smm = (r["ours_tflops"] / r["scaled_mm_tflops"]) if r["scaled_mm_tflops"] else None
        r["ratio_vs_bf16"], r["ratio_vs_scaled_mm"] = vs_bf16, vs_smm
        print(f"| {r['shape']} | {fmt(r['bf16_tflops'])} | {fmt(r['scaled_mm_tflops'])} | "
              f"{fmt(r['ours_tflops'])} | {fmt(vs_bf16, '.2f')} | {fmt(vs_smm, '.2f')} |")
        said = [f"{col} = {r[key]}" for col, key in (("bf16", "bf16_note"),
                                                      ("scaled_mm", "scaled_mm_note"))
                if r.get(key)]
        if said:
            notes.append(f"- {r['shape']}: " + "; ".join(said))
    if notes:
        print("\n" + "\n".join(notes))
    if args.quick:
        print("\n(--quick: interpreter/tiny-shape timings mean nothing; this run checks that "
              "the bench works)")
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "checks": check, "ok": True,
                                        "rows": rows, "seconds": total}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
