"""Quality of the converted SmolLM2-135M in and off the calibration domain (issue 16).

    python bench/quality_domains.py --json out/quality_domains.json --md out/quality_domains.md
    python bench/quality_domains.py --models dense fp8-w8a16 --eval-tokens 2048   # quicker
    python bench/quality_domains.py --held-back ...   # also the held-back domain: only at the end

Every model is calibrated (where it calibrates) on Python's documentation, as a user would:
the first ``--calib-seqs`` x ``--seq-len`` tokens of ``pydoc_data.topics``. Each is then
evaluated on the same token windows of

* ``pydoc``: the held-out end of the same text (the last ``--eval-tokens`` tokens, as
  bench/fp8_quality.py and bench/moe_quality.py take theirs): the in-domain figure;
* the out-of-domain texts of bench/_texts.py (``DEV_DOMAINS``: licence texts, upstream release
  notes), ``--eval-tokens`` per domain, windows evenly spaced over each domain's documents;
* with ``--held-back`` also ``HELD_BACK`` (GNU manuals), which is kept back until the end of
  the work: nothing is chosen on it.

Models (``--models``), library defaults throughout (no tuning here)::

    dense        SmolLM2-135M fp32
    fp8-w8a8     FP8Config(): W8A8, activations 1x128, weights 128x128 (E4M3, FP32 accumulation),
                 given the calibration batches: GPTQ weight rounding (weight_rounding="auto"),
                 the most sensitive linears kept in high precision (high_precision_budget=0.05)
    fp8-w8a16    FP8Config(activations="none"): weights only, GPTQ rounding likewise
    fp8-*-all    the same with high_precision_budget=0 (every linear but the head FP8)
    fp8-*-nearest  the same with weight_rounding="nearest" (the rounding before GPTQ)
    moe-75       MoEConfig(num_experts=128, top_k=32, shared_width=1024): 1024 shared + 128 x 4,
                 75% of each FFN's neurons active (the best 75% layout on pydoc, BENCHMARKS.md)
    moe-50       MoEConfig(num_experts=16, top_k=4, shared_width=512): 512 shared + 16 x 64, 50%
    moe-75-16    (not by default) 768 shared + 16 x 48, top-8 (75%)
    moe-44       (not by default) 384 shared + 16 x 72, top-4: the deepseek-v3 recipe's layout
    moe-50-64/128  (not by default) 50% with finer routed experts: 512 shared + 64 x 16, top-16
                 / 128 x 8, top-32 (the same neurons active as active-50's 16 x 64, top-4)
    active-75/50 (not by default) ``convert(recipe="moe-only", active=0.75 | 0.5)``
    *-rec        (not by default) the same model (active-75, active-50, moe-44, moe-50-64), then the
                 recovery step: ``rewriter.recover(model, texts, RecoveryConfig())`` on
                 ``--recover-seqs`` sequences of 128 tokens of pydoc_data.topics (shuffled,
                 the held-out end excluded; 10% of them held out to report the block error),
                 block phase then ``--recover-logit-steps`` steps of the logit phase

MoE models use ``rewriter.convert(model, moe=cfg, calibration=batches)`` with the MoEConfig
defaults for everything else (with calibration: coactivation grouping, shared neurons by
activation, the fitted router, per-block top_k allocation, hard gates). Perplexity =
exp(mean next-token NLL) over every position but the first of each window. The JSON is
rewritten after every model, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from _texts import DEV_DOMAINS, DOMAINS, HELD_BACK, eval_windows, pydoc_windows  # noqa: E402
from rewriter.models.hf import load_smollm2  # noqa: E402
from rewriter.models.text import perplexity, token_ids  # noqa: E402

import rewriter  # noqa: E402
from rewriter import FP8Config, MoEConfig, RecoveryConfig  # noqa: E402

MODELS = {
    "dense": ("SmolLM2-135M fp32", None),
    "fp8-w8a8": ("FP8 W8A8 1x128 / 128x128, FP8Config(), calibrated (GPTQ rounding, the "
                 "most sensitive linears up to 5% kept)", FP8Config()),
    "fp8-w8a16": ("FP8 W8A16 (weights only), FP8Config(activations=\"none\"), calibrated "
                  "(GPTQ rounding, the most sensitive linears up to 5% kept)",
                  FP8Config(activations="none")),
    "fp8-w8a8-all": ("FP8 W8A8, FP8Config(high_precision_budget=0): GPTQ, every linear FP8",
                     FP8Config(high_precision_budget=0.0)),
    "fp8-w8a16-all": ("FP8 W8A16, FP8Config(activations=\"none\", high_precision_budget=0)",
                      FP8Config(activations="none", high_precision_budget=0.0)),
    "fp8-w8a8-nearest": ("FP8 W8A8, FP8Config(weight_rounding=\"nearest\")",
                         FP8Config(weight_rounding="nearest")),
    "fp8-w8a16-nearest": ("FP8 W8A16, FP8Config(activations=\"none\", "
                          "weight_rounding=\"nearest\")",
                          FP8Config(activations="none", weight_rounding="nearest")),
    "moe-75": ("MoE 75% active: 1024 shared + 128 x 4, top-32",
               MoEConfig(num_experts=128, top_k=32, shared_width=1024)),
    "moe-50": ("MoE 50% active: 512 shared + 16 x 64, top-4",
               MoEConfig(num_experts=16, top_k=4, shared_width=512)),
    "moe-75-16": ("MoE 75% active: 768 shared + 16 x 48, top-8",
                  MoEConfig(num_experts=16, top_k=8, shared_width=768)),
    "moe-44": ("MoE 44% active: 384 shared + 16 x 72, top-4",
               MoEConfig(num_experts=16, top_k=4, shared_width=384)),
    "moe-50-64": ("MoE 50% active: 512 shared + 64 x 16, top-16",
                  MoEConfig(num_experts=64, top_k=16, shared_width=512)),
    "moe-50-128": ("MoE 50% active: 512 shared + 128 x 8, top-32",
                   MoEConfig(num_experts=128, top_k=32, shared_width=512)),
    "active-75": ("recipe moe-only, active=0.75: 1024 shared + 16 x 32, top-4",
                  ("moe-only", 0.75)),
    "active-50": ("recipe moe-only, active=0.5: 512 shared + 16 x 64, top-4",
                  ("moe-only", 0.5)),
}
for _name in ("active-75", "active-50", "moe-44", "moe-50-64"):
    MODELS[_name + "-rec"] = (MODELS[_name][0] + ", + recovery", MODELS[_name][1])
DEFAULT_MODELS = ("dense", "fp8-w8a8", "fp8-w8a16", "moe-75", "moe-50")


def recovery_texts(tokenizer, eval_tokens: int, n: int, seq_len: int = 128) -> torch.Tensor:
    """(n, seq_len) windows of pydoc_data.topics before its held-out end, shuffled (seed 0)
    so that every part of the text is in them."""
    ids = token_ids(tokenizer)
    head = ids[: ids.numel() - eval_tokens]
    windows = head[: head.numel() // seq_len * seq_len].view(-1, seq_len)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))
    return windows[order][:n]


def convert(dense, name: str, calib: torch.Tensor, calib_batch: int,
            texts: torch.Tensor | None = None, record: dict | None = None,
            recovery: RecoveryConfig | None = None):
    """The model ``name`` of MODELS, converted from ``dense`` (calibrated on ``calib``); a
    ``-rec`` model is then recovered on ``texts`` (its report into ``record``)."""
    if name.endswith("-rec"):
        model = convert(dense, name[:-4], calib, calib_batch)
        report = rewriter.recover(model, [{"input_ids": texts}], recovery or RecoveryConfig(),
                                  teacher=dense, progress=False)
        if record is not None:
            record.update(report.to_dict())
        return model.eval()
    cfg = MODELS[name][1]
    if cfg is None:
        return dense
    example = {"input_ids": calib[:1, :32]}
    batches = [{"input_ids": calib[i:i + calib_batch]}
               for i in range(0, calib.shape[0], calib_batch)]
    if isinstance(cfg, tuple):  # (recipe, active): the layout the recipe picks
        return rewriter.convert(dense, recipe=cfg[0], active=cfg[1], example_inputs=example,
                                calibration=batches, progress=False).eval()
    if isinstance(cfg, FP8Config):
        return rewriter.convert(dense, fp8=cfg, example_inputs=example, calibration=batches,
                                progress=False).eval()
    return rewriter.convert(dense, moe=cfg, example_inputs=example, calibration=batches,
                            progress=False).eval()


def table(results: dict, domains: list[str]) -> str:
    """Markdown: one row per model, perplexity and x dense per domain, and the geometric mean
    of x dense over the out-of-domain columns."""
    off = [d for d in domains if d != "pydoc"]
    head = ["model", "pydoc (in-domain)", "x dense"]
    for d in off:
        head += [d, "x dense"]
    head.append("x dense, off-domain (geo. mean)")
    lines = ["| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    dense = results.get("dense", {}).get("ppl", {})
    for r in results.values():
        cells = [r["label"]]
        ratios = []
        for d in domains:
            ppl = r["ppl"].get(d)
            x = ppl / dense[d] if ppl is not None and d in dense else None
            if d != "pydoc" and x is not None:
                ratios.append(x)
            cells += [f"{ppl:.3f}" if ppl is not None else "-", _fmt_x(x)]
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
        cells.append(_fmt_x(geo) if len(ratios) == len(off) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_x(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{100 * (x - 1):+.2f}%" if x < 1.5 else f"{x:.2f}x"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    ap.add_argument("--eval-tokens", type=int, default=4096, help="per domain")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="sequences per evaluation batch")
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--calib-batch", type=int, default=4)
    ap.add_argument("--recover-seqs", type=int, default=800,
                    help="sequences of 128 tokens the -rec models recover on")
    ap.add_argument("--recover-logit-steps", type=int, default=80,
                    help="steps of the recovery's logit phase (RecoveryConfig.logit_steps)")
    ap.add_argument("--held-back", action="store_true",
                    help=f"also evaluate the held-back domain ({HELD_BACK}): only at the end")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "dense" not in args.models:
        args.models.insert(0, "dense")

    t0 = time.perf_counter()
    dense, tok = load_smollm2()
    n = args.eval_tokens // args.seq_len
    calib, pydoc_eval = pydoc_windows(tok, args.calib_seqs, n, args.seq_len)
    windows = {"pydoc": pydoc_eval}
    for d in (*DEV_DOMAINS, *((HELD_BACK,) if args.held_back else ())):
        windows[d] = eval_windows(tok, d, n, args.seq_len)
    domains = list(windows)
    print(f"torch {torch.__version__}, {platform.machine()}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}; calibration {calib.numel()} pydoc tokens; eval "
          f"{n} x {args.seq_len} tokens per domain: {', '.join(domains)} "
          f"(setup {time.perf_counter() - t0:.0f} s)", flush=True)

    results: dict = {}
    record = {"argv": sys.argv[1:] if argv is None else argv, "domains": domains,
              "sources": {d: DOMAINS[d].description for d in domains if d in DOMAINS},
              "held_back": HELD_BACK, "held_back_evaluated": args.held_back,
              "eval_tokens_per_domain": n * args.seq_len, "calibration_tokens": calib.numel(),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "results": results}
    for name in args.models:
        t = time.perf_counter()
        recovery: dict = {}
        texts = (recovery_texts(tok, n * args.seq_len, args.recover_seqs)
                 if name.endswith("-rec") else None)
        model = convert(dense, name, calib, args.calib_batch, texts, recovery,
                        RecoveryConfig(logit_steps=args.recover_logit_steps))
        ct = time.perf_counter() - t
        r = results[name] = {"label": MODELS[name][0], "ppl": {}, "convert_s": ct, "eval_s": {}}
        if recovery:
            r["recovery"] = recovery
            print(f"  {name}: recovery on {recovery['sequences']} sequences, "
                  f"{recovery['seconds']:.0f} s, block error {recovery['before']:.4f} -> "
                  f"{recovery['after']:.4f}", flush=True)
        for d in domains:
            t = time.perf_counter()
            r["ppl"][d] = perplexity(model, windows[d], args.batch)
            r["eval_s"][d] = time.perf_counter() - t
            x = r["ppl"][d] / results["dense"]["ppl"][d]
            print(f"  {name:<10} {d:<14} ppl {r['ppl'][d]:9.3f}  x dense {x:.4f}  "
                  f"(eval {r['eval_s'][d]:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
        print(f"{name}: converted in {ct:.0f} s", flush=True)
        del model
        record["table"] = table(results, domains)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=1))
    print("\n" + record["table"])
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(record["table"] + "\n")
    return record


if __name__ == "__main__":
    main()
