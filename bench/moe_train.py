"""Continued training of the converted SmolLM2-135M (routed + shared MoE at ~44% of the FFN
neurons active, FP8 training) against the dense model trained with the same token budget.

    python bench/moe_train.py --minutes 30 --json out/moe_train.json
    python bench/moe_train.py --probe            # only the untrained perplexities

Both runs see the same batches of ``pydoc_data.topics`` (the head of the text; evaluation on
held-out sequences from its end) through ``rewriter.training.train``. The MoE run:
``rewriter.convert(model, moe=MoEConfig(num_experts=16, top_k=4, shared_width=384, ...),
fp8=FP8Config(mode="training"), calibration=...)`` then distillation from the dense model
(KL to its logits), MoE blocks first (``--moe-first``), then everything. The step count is set
from the measured time of a few steps so that training takes ``--minutes`` (evaluation time
excluded); the dense run then trains for the same number of steps (same tokens).
Reports the curve of held-out perplexity and the share of the log-perplexity gap closed:
``(ln ppl_moe0 - ln ppl_moe) / (ln ppl_moe0 - ln ppl_dense0)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from rewriter.models.hf import load_smollm2  # noqa: E402
from rewriter.models.text import token_ids  # noqa: E402
from rewriter.passes.ffn_to_moe import MoEConfig  # noqa: E402
from rewriter.passes.lower_fp8 import FP8Config  # noqa: E402

import rewriter  # noqa: E402
from rewriter.training import TextData, TrainConfig, evaluate, train  # noqa: E402


def convert(model, data: TextData, args):
    calib = [{"input_ids": data.train_ids[i * 512:(i + 1) * 512].reshape(4, 128)}
             for i in range(args.calib_batches)]
    example = {"input_ids": data.train_ids[:32].reshape(2, 16)}
    moe = MoEConfig(num_experts=16, top_k=4, shared_width=384, gate=args.gate,
                    route_scale=4.0 if args.gate == "sigmoid" else 1.0)
    fp8 = FP8Config(mode="training") if args.fp8 else None
    return rewriter.convert(model, moe=moe, fp8=fp8, example_inputs=example,
                            calibration=calib)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="training time of the MoE run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--distill", type=float, default=0.7)
    ap.add_argument("--moe-first", type=float, default=0.3,
                    help="fraction of the steps that train only the MoE blocks")
    ap.add_argument("--gate", default="hard", choices=("hard", "sigmoid"))
    ap.add_argument("--no-fp8", dest="fp8", action="store_false")
    ap.add_argument("--evals", type=int, default=6, help="evaluations along the run")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--probe", action="store_true", help="untrained perplexities only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    dense, tokenizer = load_smollm2()
    data = TextData.from_corpus(tokenizer, ids=token_ids(tokenizer), eval_tokens=args.eval_tokens,
                                eval_len=256, hf=True)
    out: dict = {"args": vars(args), "eval_tokens": data.eval_ids.numel()}
    t = time.perf_counter()
    ppl_dense0 = evaluate(dense, data)
    print(f"dense perplexity {ppl_dense0:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    student = convert(dense, data, args)
    ppl_moe0 = evaluate(student, data)
    print(f"converted (gate {args.gate}, fp8 {args.fp8}) perplexity {ppl_moe0:.3f}", flush=True)
    out.update(dense0=ppl_dense0, moe0=ppl_moe0)
    if args.probe:
        return out

    # step time from 2 throw-away steps on a copy
    probe = copy.deepcopy(student)
    t = time.perf_counter()
    train(probe, data, TrainConfig(steps=2, batch_size=args.batch_size, seq_len=args.seq_len,
                                   distill=args.distill), teacher=dense, progress=False)
    step_s = (time.perf_counter() - t) / 2
    del probe
    steps = max(10, int(args.minutes * 60 / step_s))
    every = max(1, steps // args.evals)
    print(f"{step_s:.1f} s/step -> {steps} steps of {args.batch_size}x{args.seq_len} tokens",
          flush=True)

    def log(record):
        if "eval_ppl" in record:
            load = record.get("load_max_over_mean", 0)
            print(f"  step {record['step']}: loss {record['loss']:.3f}, held-out ppl "
                  f"{record['eval_ppl']:.3f}, load max/mean {load:.2f}", flush=True)

    config = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr, warmup_steps=max(1, steps // 20), distill=args.distill,
                         moe_first_steps=int(args.moe_first * steps), eval_every=every)
    t = time.perf_counter()
    result = train(student, data, config, teacher=dense, progress=False, log=log)
    wall = time.perf_counter() - t
    moe_curve = [(0, ppl_moe0)] + [(h["step"], h["eval_ppl"]) for h in result.evals]
    ppl_moe = moe_curve[-1][1]
    closed = (math.log(ppl_moe0) - math.log(ppl_moe)) / (math.log(ppl_moe0)
                                                         - math.log(ppl_dense0))
    print(f"MoE+FP8: {ppl_moe0:.3f} -> {ppl_moe:.3f} in {steps} steps ({wall / 60:.1f} min with "
          f"evaluations); log-perplexity gap to dense {ppl_dense0:.3f} closed: {closed:.1%}",
          flush=True)
    out.update(steps=steps, step_s=step_s, wall_s=wall, moe_curve=moe_curve, moe_final=ppl_moe,
               gap_closed=closed, history=result.history)

    if not args.skip_dense:
        dense_student = copy.deepcopy(dense)
        dense_config = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                   lr=args.lr, warmup_steps=max(1, steps // 20), eval_every=every)
        t = time.perf_counter()
        dres = train(dense_student, data, dense_config, progress=False, log=log)
        dense_curve = [(0, ppl_dense0)] + [(h["step"], h["eval_ppl"]) for h in dres.evals]
        print(f"dense, same steps: {ppl_dense0:.3f} -> {dense_curve[-1][1]:.3f} "
              f"({(time.perf_counter() - t) / 60:.1f} min)", flush=True)
        out.update(dense_curve=dense_curve, dense_final=dense_curve[-1][1])

    print("\n| step | MoE+FP8 ppl | dense ppl (same steps) |\n|---:|---:|---:|")
    dense_curve = dict(out.get("dense_curve", []))
    for step, ppl in moe_curve:
        d = dense_curve.get(step)
        print(f"| {step} | {ppl:.3f} | {'' if d is None else f'{d:.3f}'} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
