"""The end-to-end job: convert, measure, train briefly, report, export, check.

    result = run_pipeline(model, tokenizer=tok, recipe="deepseek-v3", train_steps=20,
                          onnx_path="out/model.onnx", report_dir="out/report")
    print(result.table())

Stages (each optional but the conversion): perplexity on held-out real text of the dense
model, the MoE model and the MoE + FP8 model; a short continued training of the MoE + FP8 model
(distilled from the dense one); params active per token and weight bytes of each; the
before/after graph pictures and an HTML report; ONNX export of the trained model with FP8
weights frozen (``freeze_fp8``) and onnxruntime parity on held-out text.
"""

from __future__ import annotations

import copy
import html
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from rewriter import models
from rewriter.models.text import model_batches, token_ids
from rewriter.passes.freeze_fp8 import freeze_fp8
from rewriter.targets.onnx_export import export_onnx
from rewriter.targets.onnx_runtime import compare_with_torch

from .conversion import convert
from .errors import InputError
from .inspection import format_table, inspect
from .model_stats import model_stats
from .recipes import get_recipe
from .training import TextData, TrainConfig, evaluate, train

__all__ = ["PipelineRow", "PipelineReport", "run_pipeline", "check_writable"]


@dataclass(frozen=True)
class PipelineRow:
    name: str
    perplexity: float | None
    params: int
    active_params: int
    weight_bytes: int


@dataclass
class PipelineReport:
    rows: list[PipelineRow] = field(default_factory=list)
    onnx: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    train_history: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:

        rows = [[r.name, "-" if r.perplexity is None else f"{r.perplexity:.2f}", r.params,
                 r.active_params, f"{r.weight_bytes / 1e6:.1f} MB"] for r in self.rows]
        text = format_table(["model", "perplexity", "params", "active/token", "weights"], rows)
        if self.onnx:
            o = self.onnx
            text += (f"\nONNX: {o['path']} ({o['bytes'] / 1e6:.1f} MB, opset {o['opset']}); "
                     f"onnxruntime vs PyTorch on {o['shape']} held-out tokens: next-token "
                     f"agreement {o['agreement']:.2%}, max rel. error {o['rel']:.1e}")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.__dict__ for r in self.rows], "onnx": self.onnx,
                "files": self.files, "seconds": self.seconds,
                "train_history": self.train_history}


def check_writable(path: Path, what: str) -> None:
    """Fail before any work when ``path`` (a file or a directory to create) is not writable."""
    probe = path if what == "directory" else path.parent
    try:
        probe.mkdir(parents=True, exist_ok=True)
        test = probe / ".rewriter-write-test"
        test.write_text("")
        test.unlink()
    except OSError as exc:
        raise InputError(f"cannot write the {what} {path}: {exc.strerror or exc}") from None


def _row(name: str, model: nn.Module, ppl: float | None) -> PipelineRow:

    s = model_stats(model)
    return PipelineRow(name, ppl, s.params, s.active_params, s.weight_bytes)


def _report_html(report: PipelineReport, converted_text: str, title: str) -> str:
    pictures = "".join(
        f'<h2>{html.escape(label)}</h2><p><a href="{html.escape(Path(p).name)}">'
        f'{html.escape(Path(p).name)}</a></p><iframe src="{html.escape(Path(p).name)}" '
        'style="width:100%;height:600px;border:1px solid #ccc"></iframe>'
        for label, p in report.files.items() if label.startswith("graph"))
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<body style='font-family:sans-serif;max-width:1200px;margin:auto'>"
            f"<h1>{html.escape(title)}</h1><h2>Results</h2><pre>{html.escape(report.table())}"
            f"</pre><h2>Conversion report</h2><pre>{html.escape(converted_text)}</pre>"
            f"{pictures}</body>")


def run_pipeline(
    model: nn.Module,
    *,
    tokenizer: Any = None,
    recipe: Any = "deepseek-v3",
    moe: Any = None,
    fp8: Any = None,
    example_inputs: Any = None,
    calibration_seqs: int = 16,
    eval_tokens: int = 8192,
    train_steps: int = 0,
    train_config: Any = None,
    onnx_path: str | Path | None = None,
    report_dir: str | Path | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
) -> PipelineReport:
    """Run the job on ``model`` (a causal LM: ``model(input_ids=...)`` or ``model(ids)``
    returning logits). ``tokenizer``: the model's (else UTF-8 bytes, vocab >= 256). The MoE
    and FP8 parts come from ``recipe`` unless ``moe``/``fp8`` are given. ``echo``: called with
    a line per finished stage (progress for the CLI). Output paths are checked first."""


    say = echo or (lambda line: None)
    if onnx_path is not None:
        check_writable(Path(onnx_path), "file")
    if report_dir is not None:
        check_writable(Path(report_dir), "directory")
    hf = hasattr(getattr(model, "config", None), "model_type")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if tokenizer is None and (vocab is None or vocab < 256):
        raise InputError(f"{type(model).__name__} has no tokenizer and vocab_size={vocab}: the "
                         "pipeline needs real text in the model's tokens (give tokenizer=)")

    longest = models.max_seq_len(model) or 256
    seq = min(128, longest)
    ids = token_ids(tokenizer)
    data = TextData.from_corpus(tokenizer, ids=ids, eval_tokens=eval_tokens,
                                eval_len=min(256, longest, eval_tokens), hf=hf)
    n_calib = 4 * max(1, calibration_seqs // 4)
    calib = (model_batches(data.train_ids[:n_calib * seq].reshape(n_calib, seq), hf=hf)
             if calibration_seqs else None)
    if example_inputs is None:
        ex = data.train_ids[:32].reshape(2, 16)
        example_inputs = {"input_ids": ex} if hf else (ex,)
    report = PipelineReport()
    clock = time.perf_counter

    t = clock()
    report.rows.append(_row("dense", model, evaluate(model, data)))
    report.seconds["eval_dense"] = clock() - t
    say(f"dense: perplexity {report.rows[-1].perplexity:.2f}")

    if recipe is not None:
        recipe = get_recipe(recipe)
        fp8 = fp8 if fp8 is not None else recipe.fp8_config()
        recipe = replace(recipe, fp8_mode=None) if recipe.num_experts else None
    t = clock()
    moe_model = None
    if moe is not None or recipe is not None:
        moe_model = convert(model, recipe=recipe, moe=moe, example_inputs=example_inputs,
                            calibration=calib, progress=progress)
    report.seconds["convert_moe"] = clock() - t
    if moe_model is not None:
        t = clock()
        report.rows.append(_row("MoE", moe_model, evaluate(moe_model, data)))
        report.seconds["eval_moe"] = clock() - t
        say(f"MoE: perplexity {report.rows[-1].perplexity:.2f}")
    final = moe_model if moe_model is not None else model
    if fp8 is not None:
        t = clock()
        final = convert(final, fp8=fp8, example_inputs=example_inputs)
        report.seconds["convert_fp8"] = clock() - t
        t = clock()
        label = "MoE + FP8" if moe_model is not None else "FP8"
        report.rows.append(_row(label, final, evaluate(final, data)))
        report.seconds["eval_fp8"] = clock() - t
        say(f"{label}: perplexity {report.rows[-1].perplexity:.2f}")
    if final is model:
        raise InputError("nothing to convert: give a recipe, moe= or fp8=")

    if train_steps:
        config = train_config or TrainConfig(steps=train_steps, batch_size=4, seq_len=seq,
                                             lr=2e-4, warmup_steps=max(1, train_steps // 10),
                                             distill=0.7)
        config = replace(config, steps=train_steps)
        t = clock()
        result = train(final, data, config, teacher=model if config.distill else None,
                       progress=progress)
        report.seconds["train"] = clock() - t
        report.train_history = result.history
        final.eval()
        name = report.rows[-1].name + f", trained {train_steps} steps"
        report.rows.append(_row(name, final, result.history[-1].get("eval_ppl")))
        say(f"{name}: perplexity {report.rows[-1].perplexity:.2f} "
            f"({report.seconds['train']:.0f} s)")

    deploy = final
    if any(getattr(m, "mode", None) == "training" for m in final.modules()):

        deploy = copy.deepcopy(final)
        freeze_fp8(deploy)  # FP8 weights stored once: the file holds FP8 initializers
        if report.rows[-1].name.startswith("MoE") or report.rows[-1].name.startswith("FP8"):
            report.rows.append(_row(report.rows[-1].name + ", frozen for inference", deploy,
                                    None))

    if report_dir is not None:
        t = clock()
        out = Path(report_dir)
        before = inspect(model, example_inputs)
        after = inspect(deploy, example_inputs)
        report.files["graph (dense)"] = str(before.write_picture(out / "graph_dense.html"))
        report.files["graph (converted)"] = str(after.write_picture(out / "graph_converted.html"))
        (out / "report.json").write_text(json.dumps(
            {**report.to_dict(), "conversion": after.to_dict()}, indent=1, default=str))
        report.files["json"] = str(out / "report.json")
        report.files["report"] = str(out / "report.html")
        converted_text = str(after)
        (out / "report.html").write_text(_report_html(report, converted_text,
                                                      f"{type(model).__name__} conversion"))
        report.seconds["report"] = clock() - t
        say(f"report: {out / 'report.html'}")

    if onnx_path is not None:

        t = clock()
        exported = export_onnx(deploy, onnx_path, example_inputs=example_inputs)
        held = data.eval_ids[:2, :128]
        diff = compare_with_torch(deploy, exported.path, {"input_ids": held} if hf else (held,))
        report.onnx = {"path": str(exported.path), "bytes": exported.file_bytes,
                       "opset": exported.opset, "shape": tuple(held.shape),
                       "agreement": diff["argmax_agreement"], "rel": diff["rel"],
                       "max_abs": diff["max_abs"]}
        report.seconds["onnx"] = clock() - t
        say(f"ONNX: {exported.path} ({exported.file_bytes / 1e6:.1f} MB), onnxruntime parity "
            f"{diff['argmax_agreement']:.2%} next-token agreement")
        if report_dir is not None:  # again, with the ONNX line in the table
            (Path(report_dir) / "report.html").write_text(
                _report_html(report, converted_text, f"{type(model).__name__} conversion"))
    return report
