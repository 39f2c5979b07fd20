import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import onnx
import pytest
import torch
from torch import nn

import rewriter
from rewriter import MoEConfig, models, pipeline
from rewriter.cli import main
from rewriter.errors import InputError
from rewriter.pipeline import PipelineError, run_pipeline
from rewriter.training import TextData, evaluate


def test_pipeline_converts_measures_trains_reports_and_exports(tmp_path):
    """The README main job's flow on a byte-level model: every stage, every file."""
    model = models.build_model("llama-tiny", seed=0)
    lines = []
    result = run_pipeline(model, recipe="deepseek-v3", calibration_seqs=4, eval_tokens=512,
                          train_steps=3, onnx_path=tmp_path / "m.onnx",
                          report_dir=tmp_path / "rep", echo=lines.append)
    names = [r.name for r in result.rows]
    assert names == ["dense", "MoE", "MoE + FP8", "MoE + FP8, trained 3 steps",
                     "MoE + FP8, trained 3 steps, frozen for inference"]
    ppl = [r.perplexity for r in result.rows[:4]]
    assert all(p is not None and math.isfinite(p) and p > 1 for p in ppl)
    dense, moe = result.rows[0], result.rows[1]
    assert moe.active_params < dense.active_params < moe.params
    assert result.rows[-1].weight_bytes < 0.6 * result.rows[-2].weight_bytes  # FP8 stored
    assert len(lines) == 6 and "onnxruntime parity" in lines[-1]
    for f in ("graph_dense.html", "graph_converted.html", "report.html", "report.json"):
        assert (tmp_path / "rep" / f).stat().st_size > 1000
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "MoE + FP8" in html and "graph_converted.html" in html
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["rows"][0]["name"] \
        == "dense"
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    o = result.onnx
    # W8A8 is a step function: judged with activation quantization bypassed (fp32 tolerance)
    # plus teacher-forced FP8 codes; the quantized graph's agreement is information only
    assert o["passed"] and o["mode"] == "bypassed" and o["rel"] <= 1e-5
    assert 0.0 <= o["agreement"] <= 1.0
    assert "activation quantization bypassed" in lines[-1]
    assert "onnxruntime vs PyTorch" in result.table()


def test_pipeline_checks_outputs_before_working(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = models.build_model("llama-tiny", seed=0)
    with pytest.raises(InputError, match="cannot write"):
        run_pipeline(model, onnx_path=blocker / "m.onnx")
    with pytest.raises(InputError, match="no tokenizer"):
        run_pipeline(nn.Linear(4, 4))  # no vocabulary, no tokenizer: no text to read
    with pytest.raises(InputError, match="cannot write"):
        run_pipeline(model, save_dir=blocker / "saved")
    with pytest.raises(InputError, match="save_format must be one of rewriter, hf"):
        run_pipeline(model, save_dir=tmp_path / "saved", save_format="onnx")
    assert not (tmp_path / "saved").exists()  # refused before any work


def test_train_cli_runs_resumes_and_fails_cleanly(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "llama-tiny", "--experts", "4", "--top-k", "2", "--calib-seqs", "4",
            "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "256",
            "--checkpoint-every", "2", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "step 4/4" in text and "held-out ppl" in text and "expert load" in text
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert main(args + ["--resume", str(out / "checkpoints" / "step_000002")]) == 0
    again = json.loads((out / "history.json").read_text())
    assert [h["loss"] for h in again] == [h["loss"] for h in history[2:]]

    assert main(["train", "no-such-model"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("rewriter: error: unknown model") and err[1].startswith("hint")
    with pytest.raises(SystemExit) as info:
        main(["train", "llama-tiny", "--steps", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "--steps" in err[0] and "must be >= 1" in err[0]
    blocker = tmp_path / "f"
    blocker.write_text("x")
    assert main(["train", "llama-tiny", "--out", str(blocker / "x")]) == 2
    assert "cannot write" in capsys.readouterr().err


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_failing_stage_leaves_the_finished_stages_on_disk(tmp_path, monkeypatch):
    """Training fails after its first step: the error names the stage; the rows, pictures,
    report and the converted model (loadable, giving the row's perplexity) are on disk, and
    so is the history of the step that finished."""
    def broken_train(model, data, config, *, log, **kw):
        log({"step": 1, "loss": 5.0})
        raise RuntimeError("simulated failure in step 2")

    monkeypatch.setattr(pipeline, "train", broken_train)
    model = models.build_model("llama-tiny", seed=0)
    out = tmp_path / "rep"
    with pytest.raises(PipelineError, match=r"stage 'train' failed: RuntimeError: simulated "
                       r"failure in step 2; the finished stages' results are in .*rep") as info:
        run_pipeline(model, recipe="deepseek-v3", calibration_seqs=4, eval_tokens=512,
                     train_steps=3, report_dir=out)
    assert info.value.stage == "train" and isinstance(info.value.__cause__, RuntimeError)
    rows = _rows(out)
    assert [r["name"] for r in rows] == ["dense", "MoE", "MoE + FP8"]
    assert "MoE + FP8" in (out / "results.txt").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["stages"] == ["dense", "MoE", "FP8", "save converted"]
    assert report["failed_stage"] == "train"
    assert "stage train failed" in (out / "report.html").read_text()
    assert (out / "graph_dense.html").stat().st_size > 1000
    assert json.loads((out / "train_history.jsonl").read_text()) == {"step": 1, "loss": 5.0}
    # the converted model directory holds the measured model: rewriter.load gives it back,
    # no conversion or calibration needed, and it measures the same perplexity
    data = TextData.from_corpus(None, eval_tokens=512, eval_len=64)
    back = rewriter.load(out / "converted")
    assert evaluate(back, data) == pytest.approx(rows[-1]["perplexity"], rel=1e-6)


@pytest.mark.slow
def test_the_job_is_deterministic_for_a_seed_and_keeps_the_callers_rng(tmp_path):
    model = models.build_model("llama-tiny", seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = run_pipeline(model, recipe="deepseek-v3", calibration_seqs=4, eval_tokens=512)
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched
    b = run_pipeline(model, recipe="deepseek-v3", calibration_seqs=4, eval_tokens=512)
    assert [r.perplexity for r in a.rows] == [r.perplexity for r in b.rows]


_KILLED_JOB = textwrap.dedent("""
    import sys
    from rewriter import models
    from rewriter.pipeline import run_pipeline
    run_pipeline(models.build_model("llama-tiny", seed=0), recipe="deepseek-v3",
                 calibration_seqs=4, eval_tokens=512, train_steps=100000,
                 report_dir=sys.argv[1], progress=False)
""")


@pytest.mark.slow
def test_a_job_killed_during_training_leaves_the_finished_stages(tmp_path):
    """SIGKILL while training (no cleanup code runs): every finished stage's file is whole."""
    out = tmp_path / "rep"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_JOB, str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 600
        history = out / "train_history.jsonl"
        while not (history.exists() and history.read_text().count("\n") >= 2):
            assert proc.poll() is None, "the job ended before training"
            assert time.monotonic() < deadline, "no training step within 600 s"
            time.sleep(0.5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [r["name"] for r in _rows(out)] == ["dense", "MoE", "MoE + FP8"]
    assert json.loads((out / "report.json").read_text())["stages"][-1] == "save converted"
    back = rewriter.load(out / "converted")  # whole: every tensor, the conversion record
    assert rewriter.conversion_info(back) is not None
    assert not list(out.glob("*.partial"))


def test_the_job_saves_the_final_model_where_people_load_it(tmp_path, capsys):
    """convert --train-steps --save DIR --format hf: the trained model, frozen for inference,
    as a checkpoint vanilla transformers loads, written once (the report points at it rather
    than writing report/hf too); report/trained the own format. The deepseek-v3 recipe
    (per-block top_k, router biases) writes no HF checkpoint and says what would."""
    transformers = pytest.importorskip("transformers")
    rep, saved = tmp_path / "rep", tmp_path / "saved"
    assert main(["convert", "hf:llama", "--recipe", "deepseek-v3-hf", "--calib-seqs", "4",
                 "--eval-tokens", "512", "--train-steps", "2", "--report", str(rep),
                 "--save", str(saved), "--format", "hf"]) == 0
    out = capsys.readouterr().out
    assert f"AutoModelForCausalLM.from_pretrained({str(saved)!r})" in out
    assert not (rep / "hf").exists()  # not a second copy of the --save checkpoint
    trained = rewriter.load(rep / "trained")
    ids = torch.randint(0, trained.config.vocab_size, (2, 9), generator=torch.Generator()
                        .manual_seed(5))
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    assert type(hf).__name__ == "Glm4MoeForCausalLM"
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
    assert logits.shape == (2, 9, trained.config.vocab_size) and logits.isfinite().all()
    report = json.loads((rep / "report.json").read_text())
    assert report["files"]["saved"] == report["files"]["hf checkpoint"] == str(saved)
    assert "save" in report["stages"] and "save hf" not in report["stages"]

    per_block = tmp_path / "per_block"
    assert main(["convert", "hf:llama", "--recipe", "deepseek-v3", "--calib-seqs", "4",
                 "--eval", "--eval-tokens", "512", "--report", str(per_block)]) == 0
    assert "Hugging Face checkpoint: not written" in capsys.readouterr().out
    assert not (per_block / "hf").exists()
    reason = json.loads((per_block / "report.json").read_text())["files"]["hf checkpoint"]
    assert "deepseek-v3-hf" in reason  # what to change to get one


def test_pipeline_recovery_stage_reports_before_and_after(tmp_path):
    model = models.build_model("llama-tiny", seed=0)
    lines = []
    result = run_pipeline(model, recipe="moe-only", calibration_seqs=4, eval_tokens=512,
                          recovery=rewriter.RecoveryConfig(sequences=40, lr=1e-3, logit_steps=8),
                          report_dir=tmp_path / "rep", echo=lines.append)
    assert [r.name for r in result.rows] == ["dense", "MoE", "MoE, recovered"]
    rec = result.recovery
    assert rec["sequences"] == 36 and rec["after"] < rec["before"]
    assert any(line.startswith("MoE, recovered (36 sequences") for line in lines)
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["rows"][2]["name"] \
        == "MoE, recovered"
    with pytest.raises(InputError, match="recovery must be a RecoveryConfig"):
        run_pipeline(model, recipe="moe-only", recovery=True)
    with pytest.raises(InputError, match="recovery trains MoE blocks"):
        run_pipeline(model, recipe="fp8-only", recovery=rewriter.RecoveryConfig())


def test_pipeline_refuses_bad_counts_and_a_file_as_directory_before_any_stage(tmp_path):
    blocker = tmp_path / "report.txt"
    blocker.write_text("keep")
    model = models.build_model("llama-tiny", seed=3)
    with pytest.raises(InputError, match="report.txt.*exists and is not a directory"):
        run_pipeline(model, report_dir=blocker)
    with pytest.raises(InputError, match="exists and is not a directory"):
        run_pipeline(model, save_dir=blocker)
    for bad in (-1, 2.5, "16", True):
        with pytest.raises(InputError, match="calibration_seqs must be an int >= 0"):
            run_pipeline(model, calibration_seqs=bad, report_dir=tmp_path / "r0")
    with pytest.raises(InputError, match=r"calibration_seqs=99999 .* tokens, the training "
                                         r"text has \d+: give fewer"):
        run_pipeline(model, moe=MoEConfig(num_experts=4, top_k=2), recipe=None,
                     calibration_seqs=99999, eval_tokens=512, report_dir=tmp_path / "r1")
    assert blocker.read_text() == "keep"
    assert list((tmp_path / "r1").iterdir()) == []  # refused before the first stage
