"""The end-to-end job: convert, measure, train briefly, report, export, check.

    result = run_pipeline(model, tokenizer=tok, recipe="deepseek-v3", train_steps=20,
                          onnx_path="out/model.onnx", report_dir="out/report")
    print(result.table())

Stages (each optional but the conversion): perplexity on held-out real text of the dense
model, the MoE model and the MoE + FP8 model; a short continued training of the MoE + FP8 model
(distilled from the dense one); params active per token and weight bytes of each; the
before/after graph pictures and an HTML report; ONNX export of the trained model with FP8
weights frozen (``freeze_fp8``) and onnxruntime parity on held-out text.

Nothing is lost when a late stage fails or the job is killed: each stage writes its result into
the report directory as soon as it has it (see :func:`run_pipeline`), and a failure raises
:class:`PipelineError` naming the stage.
"""

from __future__ import annotations

import contextlib
import copy
import html
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewriter import models
from rewriter.models.text import model_batches, token_ids
from rewriter.passes.freeze_fp8 import freeze_fp8
from rewriter.passes.recovery import RecoveryConfig, recover
from rewriter.targets.checkpoint import check_writable as _check_destination
from rewriter.targets.onnx import export_onnx
from rewriter.targets.onnx_runtime import check_parity

from .conversion import convert
from .errors import CheckpointError, InputError, RewriterError
from .inspection import format_table, inspect
from .jsonable import jsonable
from .model_stats import model_stats
from .recipes import get_recipe
from .serialization import FORMATS, load_call, save
from .training import TextData, TrainConfig, evaluate, train

__all__ = ["PipelineRow", "PipelineReport", "PipelineError", "run_pipeline", "check_writable"]

ROWS_FILE = "results.jsonl"
HISTORY_FILE = "train_history.jsonl"


class PipelineError(RewriterError, RuntimeError):
    """A stage of :func:`run_pipeline` failed. ``stage`` names it; the results of the stages
    before it are on disk in ``report_dir`` (when one was given). The cause is chained."""

    def __init__(self, stage: str, cause: BaseException, report_dir: Path | None = None):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else repr(cause)
        kept = (f"; the finished stages' results are in {report_dir}/" if report_dir is not None
                else "")
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {first}{kept}")
        self.stage = stage
        self.exit_code = getattr(cause, "exit_code", 1)



def _parity_text(onnx: dict[str, Any]) -> str:
    """One line on an ONNX parity check (:func:`check_parity`'s figures)."""
    if onnx["mode"] == "bypassed":  # W8A8: judged with activation quantization bypassed
        return (f"activation quantization bypassed: max rel. error {onnx['rel']:.1e}, FP8 "
                f"codes teacher-forced per layer; as quantized (information): next-token "
                f"agreement {onnx['agreement']:.2%}, max rel. error {onnx['quantized_rel']:.1e}")
    return (f"max rel. error {onnx['rel']:.1e}, next-token agreement "
            f"{onnx['agreement']:.2%}")

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
    recovery: dict[str, Any] | None = None  # RecoveryReport.to_dict() of the recover stage
    stages: list[str] = field(default_factory=list)  # finished, in order
    failed_stage: str | None = None

    def table(self) -> str:

        rows = [[r.name, "-" if r.perplexity is None else f"{r.perplexity:.2f}", r.params,
                 r.active_params, f"{r.weight_bytes / 1e6:.1f} MB"] for r in self.rows]
        text = format_table(["model", "perplexity", "params", "active/token", "weights"], rows)
        if self.onnx:
            o = self.onnx
            text += (f"\nONNX: {o['path']} ({o['bytes'] / 1e6:.1f} MB, opset {o['opset']}); "
                     f"onnxruntime vs PyTorch on {o['shape']} held-out tokens: "
                     f"{'passed' if o['passed'] else 'FAILED'} ({_parity_text(o)})")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.__dict__ for r in self.rows], "onnx": self.onnx,
                "files": self.files, "seconds": self.seconds,
                "train_history": self.train_history, "recovery": self.recovery,
                "stages": self.stages,
                "failed_stage": self.failed_stage}


def check_writable(path: Path, what: str) -> None:
    """Fail before any work when ``path`` (a file, or a directory to create) is not writable
    (:func:`rewriter.targets.checkpoint.check_writable`, the one check of a destination, with
    :class:`InputError`); then create the directory (the file's folder) the job writes in."""
    _check_destination(path, what, error=InputError, create=True)


def _row(name: str, model: nn.Module, ppl: float | None) -> PipelineRow:

    s = model_stats(model)
    return PipelineRow(name, ppl, s.params, s.active_params, s.weight_bytes)


def _report_html(report: PipelineReport, converted_text: str, title: str) -> str:
    pictures = "".join(
        f'<h2>{html.escape(label)}</h2><p><a href="{html.escape(Path(p).name)}">'
        f'{html.escape(Path(p).name)}</a></p><iframe src="{html.escape(Path(p).name)}" '
        'style="width:100%;height:600px;border:1px solid #ccc"></iframe>'
        for label, p in report.files.items() if label.startswith("graph"))
    failed = (f"<p style='color:#b00'><b>stage {html.escape(report.failed_stage)} failed</b>: "
              f"the results above are those of the stages before it</p>"
              if report.failed_stage else "")
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<body style='font-family:sans-serif;max-width:1200px;margin:auto'>"
            f"<h1>{html.escape(title)}</h1><h2>Results</h2><pre>{html.escape(report.table())}"
            f"</pre>{failed}<h2>Conversion report</h2><pre>{html.escape(converted_text)}</pre>"
            f"{pictures}</body>")


class _Writer:
    """Writes each stage's result into ``report_dir`` the moment it exists (nothing when
    there is no ``report_dir``): rows appended to results.jsonl and the table to results.txt,
    report.json rewritten after every stage, models with :func:`rewriter.save`, the training
    history a line per step. Files are written whole (a temporary file renamed into place), so a job
    killed at any point leaves complete files of every finished stage."""

    def __init__(self, report: PipelineReport, out: Path | None, title: str):
        self.report, self.out, self.title = report, out, title
        self.conversion: dict[str, Any] | None = None
        self.converted_text = "(the conversion report is written at the report stage)"
        if out is not None:
            for name in (ROWS_FILE, HISTORY_FILE):  # this run's lines only
                (out / name).unlink(missing_ok=True)

    def _write(self, name: str, text: str) -> None:
        if self.out is None:
            return
        tmp = self.out / (name + ".partial")
        tmp.write_text(text)
        os.replace(tmp, self.out / name)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if self.out is None:
            return
        with open(self.out / name, "a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def row(self, row: PipelineRow) -> None:
        self.report.rows.append(row)
        self._append(ROWS_FILE, row.__dict__)
        self.table()

    def table(self) -> None:
        if self.out is not None:
            self._write("results.txt", self.report.table() + "\n")
            self.report.files["table"] = str(self.out / "results.txt")
            self.report.files["rows"] = str(self.out / ROWS_FILE)

    def history(self, record: dict[str, Any]) -> None:
        self._append(HISTORY_FILE, record)

    def _save_whole(self, name: str, model: nn.Module, **kwargs: Any) -> Path:
        """:func:`rewriter.save` into ``name.partial``, then renamed into place: a killed job
        leaves either the whole directory or none under ``name``."""
        tmp, final = self.out / (name + ".partial"), self.out / name
        shutil.rmtree(tmp, ignore_errors=True)
        save(model, tmp, **kwargs)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def model(self, label: str, name: str, model: nn.Module) -> None:
        """The model in the own lossless format (``rewriter.load(directory)`` gives it back)."""
        if self.out is not None:
            self.report.files[label] = str(self._save_whole(name, model))

    def hf_checkpoint(self, name: str, model: nn.Module, tokenizer: Any) -> str:
        """A standard Hugging Face checkpoint where the model is representable as one; else
        the reason (nothing written). Returns the line to print."""
        if self.out is None:
            return ""
        try:
            path = self._save_whole(name, model, format="hf", tokenizer=tokenizer)
        except CheckpointError as exc:
            shutil.rmtree(self.out / (name + ".partial"), ignore_errors=True)
            self.report.files["hf checkpoint"] = f"not written: {exc}"
            return f"Hugging Face checkpoint: not written: {exc}"
        self.report.files["hf checkpoint"] = str(path)
        return f"Hugging Face checkpoint: {path} (transformers.{load_call(path, 'hf')})"

    def picture(self, label: str, name: str, inspected: Any) -> None:
        if self.out is not None:
            self.report.files[label] = str(inspected.write_picture(self.out / name))

    def summary(self) -> None:
        """report.json and report.html as they stand."""
        if self.out is None:
            return
        self.report.files["json"] = str(self.out / "report.json")
        self.report.files["report"] = str(self.out / "report.html")
        self._write("report.json", json.dumps(
            jsonable({**self.report.to_dict(), "conversion": self.conversion}), indent=1))
        self._write("report.html", _report_html(self.report, self.converted_text, self.title))


class _Stages:
    """Runs the job's stages: times each, records it in the report, writes the summary after
    it, and turns a failure into a :class:`PipelineError` naming the stage."""

    def __init__(self, report: PipelineReport, writer: _Writer):
        self.report, self.writer = report, writer

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            self.report.seconds[name] = time.perf_counter() - t
            self.report.failed_stage = name
            with contextlib.suppress(Exception):  # keep the first error, whatever happens
                self.writer.summary()
            if not isinstance(exc, Exception):  # KeyboardInterrupt: files are on disk
                raise
            raise PipelineError(name, exc, self.writer.out) from exc
        self.report.seconds[name] = time.perf_counter() - t
        self.report.stages.append(name)
        self.writer.summary()


@contextlib.contextmanager
def _quiet_dependencies():
    """Silence what our dependencies print that is no news to the user of this job: the ONNX
    exporter's note that torchvision is absent (its ops are not ours) and torch pytree's
    LeafSpec FutureWarning (raised inside torch when a captured program is copied)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


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
    save_dir: str | Path | None = None,
    save_format: str = "rewriter",
    pad_to: int | None = None,
    recovery: RecoveryConfig | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    seed: int = 0,
) -> PipelineReport:
    """Run the job on ``model`` (a causal LM: ``model(input_ids=...)`` or ``model(ids)``
    returning logits). ``tokenizer``: the model's (else UTF-8 bytes, vocab >= 256). The MoE
    and FP8 parts come from ``recipe`` unless ``moe``/``fp8`` are given. ``echo``: called with
    a line per finished stage (progress for the CLI). Output paths are checked first.

    With ``report_dir`` every stage's result is written there as soon as it exists
    (results.jsonl / results.txt: a row per measured model; report.json / report.html after
    every stage; graph_dense.html, graph_converted.html; converted/ and trained/: the models
    in the own lossless format, ``rewriter.load(directory)``; hf/: the final model (frozen
    for inference) as a standard Hugging Face checkpoint when it is representable as one, else
    report.json says why not; train_history.jsonl: a line per step). A stage that fails
    raises :class:`PipelineError` naming it, with the finished stages' files on disk.
    ``save_dir``: the final model (frozen for inference) written there with
    :func:`rewriter.save` in ``save_format`` ("rewriter" or "hf", ``pad_to`` for "hf"); a
    model "hf" cannot represent fails the "save" stage with the reason (nothing written).
    ``recovery``: after the MoE stage, the recovery step (:func:`rewriter.recover`: every MoE
    block distilled from its dense FFN) on up to ``recovery.sequences`` sequences of the
    training text, reported as its own row (perplexity before and after).
    ``seed``: the job is deterministic for a seed (the caller's RNG state is restored)."""

    if onnx_path is not None:
        check_writable(Path(onnx_path), "file")
    if report_dir is not None:
        check_writable(Path(report_dir), "directory")
    if save_format not in FORMATS:
        raise InputError(f"save_format must be one of {', '.join(FORMATS)}, got "
                         f"{save_format!r}")
    if save_dir is not None:
        check_writable(Path(save_dir), "directory")
    for name, value in (("calibration_seqs", calibration_seqs), ("eval_tokens", eval_tokens),
                        ("train_steps", train_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(f"{name} must be an int >= 0, got {value!r}")
    if recovery is not None and not isinstance(recovery, RecoveryConfig):
        raise InputError(f"recovery must be a RecoveryConfig, got {type(recovery).__name__}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if tokenizer is None and (vocab is None or vocab < 256):
        raise InputError(f"{type(model).__name__} has no tokenizer and vocab_size={vocab}: the "
                         "pipeline needs real text in the model's tokens (give tokenizer=)")
    with torch.random.fork_rng(devices=[]), _quiet_dependencies():
        torch.manual_seed(seed)
        return _run(model, tokenizer, recipe, moe, fp8, example_inputs, calibration_seqs,
                    eval_tokens, train_steps, train_config, onnx_path, report_dir,
                    (save_dir, save_format, pad_to), recovery, progress,
                    echo or (lambda line: None))


def _run(model, tokenizer, recipe, moe, fp8, example_inputs, calibration_seqs, eval_tokens,
         train_steps, train_config, onnx_path, report_dir, saving, recovery, progress,
         say) -> PipelineReport:
    hf = hasattr(getattr(model, "config", None), "model_type")
    longest = models.max_seq_len(model) or 256
    seq = min(128, longest)
    ids = token_ids(tokenizer)
    data = TextData.from_corpus(tokenizer, ids=ids, eval_tokens=eval_tokens,
                                eval_len=min(256, longest, eval_tokens), hf=hf)
    n_calib = 4 * max(1, calibration_seqs // 4)
    if calibration_seqs and n_calib * seq > data.train_ids.numel():
        raise InputError(f"calibration_seqs={calibration_seqs} ({n_calib} sequences of {seq} "
                         f"tokens) needs {n_calib * seq} tokens, the training text has "
                         f"{data.train_ids.numel()}: give fewer")
    calib = (model_batches(data.train_ids[:n_calib * seq].reshape(n_calib, seq), hf=hf)
             if calibration_seqs else None)
    if example_inputs is None:
        ex = data.train_ids[:32].reshape(2, 16)
        example_inputs = {"input_ids": ex} if hf else (ex,)
    if recipe is not None:
        recipe = get_recipe(recipe)
        fp8 = fp8 if fp8 is not None else recipe.fp8_config()
        recipe = replace(recipe, fp8_mode=None) if recipe.num_experts else None
    if moe is None and recipe is None and fp8 is None:
        raise InputError("nothing to convert: give a recipe, moe= or fp8=")
    if recovery is not None and moe is None and recipe is None:
        raise InputError("recovery trains MoE blocks: give moe=MoEConfig(...) or a recipe "
                         "that converts FFNs to MoE")

    report = PipelineReport()
    out = Path(report_dir) if report_dir is not None else None
    writer = _Writer(report, out, f"{type(model).__name__} conversion")
    stage = _Stages(report, writer)

    with stage("dense"):
        writer.row(_row("dense", model, evaluate(model, data)))
        writer.picture("graph (dense)", "graph_dense.html", inspect(model, example_inputs))
    say(f"dense: perplexity {report.rows[-1].perplexity:.2f}")

    final = model
    if moe is not None or recipe is not None:
        with stage("MoE"):
            final = convert(model, recipe=recipe, moe=moe, example_inputs=example_inputs,
                            calibration=calib, progress=progress)
            writer.row(_row("MoE", final, evaluate(final, data)))
        say(f"MoE: perplexity {report.rows[-1].perplexity:.2f}")
    if recovery is not None:
        with stage("recover"):
            n = min(recovery.sequences, data.train_ids.numel() // seq)
            texts = model_batches(data.train_ids[:n * seq].reshape(n, seq), hf=hf)
            done = recover(final, texts, recovery, teacher=model, progress=progress)
            report.recovery = done.to_dict()
            writer.row(_row("MoE, recovered", final, evaluate(final, data)))
        say(f"MoE, recovered ({done.sequences} sequences, {done.seconds:.0f} s): perplexity "
            f"{report.rows[-1].perplexity:.2f}")
    if fp8 is not None:
        label = "MoE + FP8" if final is not model else "FP8"
        with stage("FP8"):
            final = convert(final, fp8=fp8, example_inputs=example_inputs,
                            calibration=calib, progress=progress)  # GPTQ rounding (inference)
            writer.row(_row(label, final, evaluate(final, data)))
        say(f"{label}: perplexity {report.rows[-1].perplexity:.2f}")
    if out is not None:
        with stage("save converted"):
            writer.model("model (converted)", "converted", final)

    if train_steps:
        config = train_config or TrainConfig(steps=train_steps, batch_size=4, seq_len=seq,
                                             lr=2e-4, warmup_steps=max(1, train_steps // 10),
                                             distill=0.7)
        config = replace(config, steps=train_steps)
        name = report.rows[-1].name + f", trained {train_steps} steps"
        with stage("train"):
            result = train(final, data, config, teacher=model if config.distill else None,
                           progress=progress, log=writer.history)
            report.train_history = result.history
            final.eval()
            writer.row(_row(name, final, result.history[-1].get("eval_ppl")))
            writer.model("model (trained)", "trained", final)
        say(f"{name}: perplexity {report.rows[-1].perplexity:.2f} "
            f"({report.seconds['train']:.0f} s)")

    deploy = final
    if any(getattr(m, "mode", None) == "training" for m in final.modules()):
        with stage("freeze"):
            deploy = copy.deepcopy(final)
            freeze_fp8(deploy)  # FP8 weights stored once: the file holds FP8 initializers
            writer.row(_row(report.rows[-1].name + ", frozen for inference", deploy, None))

    save_dir, save_format, pad_to = saving
    if save_dir is not None:
        with stage("save"):
            path = save(deploy, save_dir, format=save_format, tokenizer=tokenizer,
                        pad_to=pad_to)
            report.files["saved"] = str(path)
        say(f"saved ({save_format}): {path}  (load: {load_call(path, save_format)})")
    if out is not None and hf and save_dir is not None and save_format == "hf":
        report.files["hf checkpoint"] = str(path)  # written once, by the save stage
    elif out is not None and hf:
        with stage("save hf"):
            line = writer.hf_checkpoint("hf", deploy, tokenizer)
        say(line)

    if out is not None:
        with stage("report"):
            after = inspect(deploy, example_inputs)
            writer.conversion = after.to_dict()
            writer.converted_text = str(after)
            writer.picture("graph (converted)", "graph_converted.html", after)
        say(f"report: {out / 'report.html'}")

    if onnx_path is not None:
        with stage("ONNX"):
            exported = export_onnx(deploy, onnx_path, example_inputs=example_inputs)
            held = data.eval_ids[:2, :128]
            parity = check_parity(deploy, exported.path, {"input_ids": held} if hf else (held,))
            quantized = parity["quantized"] or parity
            report.onnx = {"path": str(exported.path), "bytes": exported.file_bytes,
                           "opset": exported.opset, "shape": tuple(held.shape),
                           "passed": parity["passed"], "mode": parity["mode"],
                           "rel": parity["rel"], "max_abs": parity["max_abs"],
                           "agreement": quantized["argmax_agreement"],
                           "quantized_rel": quantized["rel"]}
            writer.table()
            if not parity["passed"]:
                raise RuntimeError("onnxruntime differs from PyTorch: "
                                   + "; ".join(parity["failures"]))
        say(f"ONNX: {exported.path} ({exported.file_bytes / 1e6:.1f} MB), onnxruntime parity "
            f"passed ({_parity_text(report.onnx)})")
    return report
