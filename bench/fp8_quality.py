"""FP8 lowering of the real SmolLM2-135M: perplexity, logits agreement, bytes, CPU speed.

    python bench/fp8_quality.py                       # ~16k held-out tokens
    python bench/fp8_quality.py --eval-tokens 40960 --json out/fp8_quality.json
    python bench/fp8_quality.py --time-only --repeats 7   # CPU speed only, ~5-10 min

Measured in one run on the same held-out pydoc tokens (the last ``--eval-tokens`` of
``pydoc_data.topics``):

* perplexity of the fp32 model, of the FP8 model (W8A8: activations 1x128, weights 128x128,
  FP32 accumulation; head, embeddings, norms and attention's softmax kept high precision as
  in DeepSeek-V3), of the weight-only variant (W8A16), and with power-of-two scales;
* logits cosine similarity and top-1 agreement vs fp32;
* weight bytes: the lowered layers (FP8 + fp32 scales) vs the same layers in bf16, and the whole
  model (embeddings/head kept in bf16) vs the whole bf16 model;
* CPU time of one forward at (8, 256): fp32 vs lowered, ratio from the same run (median of
  ``--repeats`` after a warm-up).

Timing is interleaved: each round runs every model once (the order rotates per round), so load
changes on a shared machine hit all of them alike; a model's ratio is the median over rounds of
its time / the fp32 time of the same round. ``--time-only`` skips perplexity and times fp32, W8A8
and W8A16, each with the dequantized-weight cache on and off (``FP8Config.cache_dequantized``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import median_ratios, time_interleaved  # noqa: E402
from rewriter.models.hf import load_smollm2  # noqa: E402
from rewriter.models.text import perplexity, split_ids, token_ids  # noqa: E402

import rewriter  # noqa: E402
from rewriter.capture import first_float_output  # noqa: E402
from rewriter.graph_ops import weight_bytes  # noqa: E402


def _time_interleaved(models: dict, ids, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (median seconds, median per-round ratio vs the first model), interleaved: one
    warm-up forward each, then ``repeats`` rounds of one forward per model, order rotating."""
    def progress(r: int, times: dict[str, list[float]]) -> None:
        print(f"round {r + 1}/{repeats}: " + ", ".join(
            f"{n} {ts[-1]:.2f} s" for n, ts in times.items()), flush=True)

    times = time_interleaved({n: (lambda m=m: m(input_ids=ids)) for n, m in models.items()},
                             repeats=repeats, rotate=True, on_round=progress)
    ratios = median_ratios(times, next(iter(models)))
    return {n: (statistics.median(ts), ratios[n]) for n, ts in times.items()}


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def time_only(args) -> dict:
    """fp32 vs W8A8 / W8A16, dequantized-weight cache on and off, at (batch, seq-len)."""
    load0 = _load()
    dense, tok = load_smollm2()
    _, eval_ids = split_ids(token_ids(tok), args.seq_len, 0, args.eval_tokens)
    ids = eval_ids[:args.batch]  # the full run's timing batch
    example = {"input_ids": ids[:2, :16]}
    models = {"fp32": dense}
    for act, label in (("fp8", "W8A8"), ("none", "W8A16")):
        for cache in (True, False):
            cfg = rewriter.FP8Config(activations=act, cache_dequantized=cache)
            name = f"fp8 {label}, cache {'on' if cache else 'off'}"
            models[name] = rewriter.convert(dense, fp8=cfg, example_inputs=example)
    load1 = _load()
    res = _time_interleaved(models, ids, args.repeats)
    load2 = _load()
    lines = [f"CPU forward at ({args.batch}, {args.seq_len}), torch threads "
             f"{torch.get_num_threads()}, median of {args.repeats} interleaved rounds; load "
             f"average (1/5/15 min) {load0} at start, {load1} before timing, {load2} after",
             "| model | median ms | x fp32 (median of per-round ratios) |", "|---|---:|---:|"]
    lines += [f"| {n} | {t * 1e3:.0f} | {ratio:.2f}x |" for n, (t, ratio) in res.items()]
    table = "\n".join(lines)
    print(table)
    return {"times": {n: {"median_s": t, "ratio": ratio} for n, (t, ratio) in res.items()},
            "load_average": [load0, load1, load2], "threads": torch.get_num_threads(),
            "table": table}


def _agreement(dense, lowered, ids) -> tuple[float, float]:
    with torch.no_grad():
        a = first_float_output(dense(input_ids=ids)).flatten(0, 1).double()
        b = first_float_output(lowered(input_ids=ids)).flatten(0, 1).double()
    cos = F.cosine_similarity(a, b, dim=-1).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    return cos, top1


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--time-only", action="store_true",
                   help="only the interleaved CPU timing (fp32, W8A8/W8A16, cache on/off)")
    args = p.parse_args(argv)
    if args.time_only:
        results = time_only(args)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
        return results

    t0 = time.time()
    dense, tok = load_smollm2()
    _, eval_ids = split_ids(token_ids(tok), args.seq_len, 0, args.eval_tokens)
    example = {"input_ids": eval_ids[:2, :16]}
    variants = {
        "fp8 W8A8 (1x128 / 128x128)": rewriter.FP8Config(),
        "fp8 W8A8, pow2 scales": rewriter.FP8Config(pow2_scales=True),
        "fp8 W8A16 (weight-only)": rewriter.FP8Config(activations="none"),
    }
    rows = [("fp32", perplexity(dense, eval_ids, args.batch), 1.0, 1.0)]
    results: dict = {"eval_tokens": eval_ids.numel(), "variants": {}}
    lowered_main = None
    for name, cfg in variants.items():
        lowered = rewriter.convert(dense, fp8=cfg, example_inputs=example)
        ppl = perplexity(lowered, eval_ids, args.batch)
        cos, top1 = _agreement(dense, lowered, eval_ids[:4])
        rows.append((name, ppl, cos, top1))
        results["variants"][name] = {"perplexity": ppl, "cosine": cos, "top1": top1}
        if lowered_main is None:
            lowered_main = lowered
        print(f"{name}: ppl {ppl:.3f}  ({time.time() - t0:.0f} s)", flush=True)

    info = rewriter.conversion_info(lowered_main)
    lowered_fqns = [d.fqn for d in info.fp8_decisions if d.lowered]
    fp8_bytes = sum(weight_bytes(lowered_main.get_submodule(f)) for f in lowered_fqns)
    bf16_bytes = sum(weight_bytes(dense.get_submodule(f)) // 2 for f in lowered_fqns)
    whole_bf16 = weight_bytes(dense) // 2
    whole_fp8 = whole_bf16 - bf16_bytes + fp8_bytes

    ids = eval_ids[:8, :256]
    timed = _time_interleaved({"fp32": dense, "fp8": lowered_main}, ids, args.repeats)
    (t_dense, _), (t_fp8, time_ratio) = timed["fp32"], timed["fp8"]

    dense_ppl = rows[0][1]
    lines = ["| model | perplexity | vs fp32 | logits cosine | top-1 agreement |",
             "|---|---:|---:|---:|---:|"]
    for name, ppl, cos, top1 in rows:
        lines.append(f"| {name} | {ppl:.3f} | {100 * (ppl / dense_ppl - 1):+.2f}% | "
                     f"{cos:.4f} | {100 * top1:.1f}% |")
    lines += [
        "",
        f"- lowered layers: {len(lowered_fqns)}; their weights {fp8_bytes / 1e6:.1f} MB in FP8 "
        f"vs {bf16_bytes / 1e6:.1f} MB in bf16 = **{fp8_bytes / bf16_bytes:.3f}x**",
        f"- whole model (embeddings/head/norms in bf16): {whole_fp8 / 1e6:.1f} MB vs "
        f"{whole_bf16 / 1e6:.1f} MB = {whole_fp8 / whole_bf16:.3f}x",
        f"- CPU forward at (8, 256): fp32 {t_dense * 1e3:.0f} ms, FP8 (emulated) "
        f"{t_fp8 * 1e3:.0f} ms = **{time_ratio:.2f}x** (median of {args.repeats} interleaved "
        f"rounds; load average {_load()})",
        f"- eval tokens: {eval_ids.numel()}; wall time {time.time() - t0:.0f} s",
    ]
    table = "\n".join(lines)
    print(table)
    results.update(dense_perplexity=dense_ppl, layer_bytes_ratio=fp8_bytes / bf16_bytes,
                   model_bytes_ratio=whole_fp8 / whole_bf16, cpu_time_ratio=time_ratio,
                   table=table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
