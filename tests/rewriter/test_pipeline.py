import json
import math

import onnx
import pytest
from torch import nn

from rewriter import models
from rewriter.cli import main
from rewriter.errors import InputError
from rewriter.pipeline import run_pipeline


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
    assert o["rel"] <= 0.05 and o["agreement"] >= 0.9  # W8A8: a step function (see ONNX docs)
    assert "onnxruntime vs PyTorch" in result.table()


def test_pipeline_checks_outputs_before_working(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = models.build_model("llama-tiny", seed=0)
    with pytest.raises(InputError, match="cannot write"):
        run_pipeline(model, onnx_path=blocker / "m.onnx")
    with pytest.raises(InputError, match="no tokenizer"):
        run_pipeline(nn.Linear(4, 4))  # no vocabulary, no tokenizer: no text to read


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
