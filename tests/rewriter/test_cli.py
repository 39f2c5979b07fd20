import json
import subprocess
import sys

import pytest
from rewriter.models.moe import GATE_MODES
from rewriter.passes.allocation import ALLOCATIONS
from rewriter.passes.lower_fp8 import FP8Config
from rewriter.targets.fp8_linear import ACTIVATION_MODES

from rewriter import errors
from rewriter.cli import _conversion_configs, build_parser, main


def test_inspect_prints_ffns_and_writes_picture(tmp_path, capsys):
    pic, rep = tmp_path / "g.svg", tmp_path / "r.json"
    assert main(["inspect", "gpt-tiny-relu", "--picture", str(pic), "--json", str(rep)]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.mlp" in out and "relu" in out
    assert pic.exists() and rep.exists()


def test_unknown_model_is_one_clear_line(capsys):
    assert main(["inspect", "no-such-model", "--picture", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("rewriter: error: unknown model 'no-such-model'")
    assert "llama-tiny" in err[0]
    assert err[1].startswith("hint:")


def test_bad_values_and_unwritable_output(tmp_path, capsys):
    assert main(["inspect", "gpt-tiny", "--batch", "0", "--picture", ""]) == 2
    assert "--batch" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["inspect", "gpt-tiny", "--picture", str(blocker / "g.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rewriter: ") and "Traceback" not in err


def test_models_lists_and_help_runs(capsys):
    assert main(["models"]) == 0
    assert "llama-tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--help"])
    assert info.value.code == 0
    assert "--picture" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "rewriter", "--help"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and "inspect" in proc.stdout


def test_convert_moe_and_fp8_with_report(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["convert", "llama-tiny", "--experts", "4", "--top-k", "2", "--fp8",
                 "--calib-seqs", "4", "--report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Converted blocks" in text and "coactivation" in text and "calibrated" in text
    assert "FP8 lowering" in text and "output head" in text
    assert (out / "graph.html").exists() and (out / "report.json").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["conversion"]["moe"]["allocation"] == "calibrated"


def test_convert_allocation_flag(tmp_path):
    args = build_parser().parse_args(["convert", "llama-tiny", "--experts", "4", "--top-k",
                                      "2", "--allocation", "uniform"])
    assert _conversion_configs(args)[1].allocation == "uniform"


def test_convert_errors_are_one_line(capsys):
    assert main(["convert", "llama-tiny"]) == 2
    assert "nothing to convert" in capsys.readouterr().err
    assert main(["convert", "llama-tiny", "--experts", "5"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "num_experts=5" in err[0] and "num_experts that work" in err[0]
    assert main(["convert", "llama-tiny", "--experts", "4", "--top-k", "9"]) == 2
    assert "MoEConfig.top_k" in capsys.readouterr().err


def test_export_writes_a_checked_onnx_file(tmp_path, capsys):
    path = tmp_path / "sub" / "m.onnx"
    assert main(["export", "gpt-tiny", str(path), "--experts", "4", "--top-k", "2"]) == 0
    assert path.exists() and "MoE blocks 2" in capsys.readouterr().out


def test_export_fused_moe(tmp_path, capsys):
    """--fused-moe: every block of a SwiGLU model becomes one com.microsoft.MoE node."""
    import onnx

    path = tmp_path / "fused.onnx"
    argv = ["export", "llama-tiny", str(path), "--experts", "4", "--top-k", "2", "--fused-moe"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "MoE blocks 2 (2 fused)" in out and "kept sparse" not in out
    assert [n.domain for n in onnx.load(str(path)).graph.node if n.op_type == "MoE"] == [
        "com.microsoft"] * 2


@pytest.mark.parametrize("argv", [["--debug", "inspect", "no-such-model"],
                                  ["inspect", "no-such-model", "--debug"],
                                  ["--debug", "models"]])
def test_debug_before_or_after_the_command_shows_the_traceback(argv):
    """``rewriter --debug COMMAND``: the subcommand's own --debug must not reset it to False."""
    args = build_parser().parse_args(argv)
    assert args.debug is True
    if argv[-1] != "models":
        with pytest.raises(errors.InputError, match="unknown model"):
            main(argv + ["--picture", ""])


def test_debug_defaults_off():
    assert build_parser().parse_args(["inspect"]).debug is False
    assert build_parser().parse_args(["models"]).debug is False


class _Internal(errors.RewriterError):
    pass


@pytest.mark.parametrize("exc, code", [
    (errors.InputError("x"), 2), (errors.MissingDependencyError("x"), 2),
    (errors.CaptureError("x"), 1), (errors.PassError("p", "run", "x"), 1),
    (_Internal("x"), 1), (ValueError("MoEConfig.top_k ..."), 2), (OSError("disk"), 2),
    (RuntimeError("bug"), 1), (AssertionError("bug"), 1),
])
def test_exit_code_follows_the_error_type(monkeypatch, capsys, exc, code):
    def boom(args):
        raise exc
    monkeypatch.setattr("rewriter.cli._cmd_models", boom)
    assert errors.exit_code(exc) == code
    assert main(["models"]) == code
    assert capsys.readouterr().err.startswith("rewriter: ")


def test_an_error_class_sets_its_own_exit_code(monkeypatch):
    class Usage(errors.RewriterError, RuntimeError):
        exit_code = 2

    def boom(args):
        raise Usage("bad flag combination")
    monkeypatch.setattr("rewriter.cli._cmd_models", boom)
    assert main(["models"]) == 2  # a RuntimeError, but the class says 2


def test_choices_come_from_the_library_constants():
    conv = {a.dest: a for a in build_parser()._subparsers._group_actions[0]
            .choices["convert"]._actions}
    assert tuple(conv["gate"].choices) == GATE_MODES
    assert tuple(conv["allocation"].choices) == ("auto", *ALLOCATIONS)
    assert tuple(conv["fp8_activations"].choices) == ACTIVATION_MODES


def test_fp8_rounding_flag_reaches_the_config_and_training_ignores_it():
    parse = build_parser().parse_args
    args = parse(["convert", "llama-tiny", "--fp8", "--fp8-rounding", "nearest"])
    assert _conversion_configs(args)[2].weight_rounding == "nearest"
    assert _conversion_configs(parse(["convert", "llama-tiny", "--fp8"]))[2].weight_rounding \
        == "auto"
    args = parse(["convert", "llama-tiny", "--fp8", "--fp8-rounding", "gptq"])
    assert _conversion_configs(args, training=True)[2].weight_rounding == "auto"


def test_fp8_high_precision_flag_reaches_the_config_and_refuses_non_fractions(capsys):
    parse = build_parser().parse_args
    args = parse(["convert", "llama-tiny", "--fp8", "--fp8-high-precision", "0"])
    assert _conversion_configs(args)[2].high_precision_budget == 0.0
    default = _conversion_configs(parse(["convert", "llama-tiny", "--fp8"]))[2]
    assert default.high_precision_budget == FP8Config().high_precision_budget == 0.05
    for bad in ("1.5", "-0.1", "abc"):
        with pytest.raises(SystemExit):
            parse(["convert", "llama-tiny", "--fp8", "--fp8-high-precision", bad])
        assert f"--fp8-high-precision: must be a fraction in [0, 1), got '{bad}'" in \
            capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--fp8-rounding", "nearest"], ["--fp8-mode", "training"],
                                   ["--calib-seqs", "0"], None])
def test_fp8_high_precision_flag_is_refused_where_gptq_does_not_round(extra, capsys):
    argv = ["convert", "llama-tiny", "--fp8-high-precision", "0.3"]
    argv += ["--fp8", *extra] if extra else []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--fp8-high-precision" in err and ("GPTQ" in err or "--fp8" in err)


def test_convert_reports_every_rounded_linears_sensitivity_rank(capsys):
    assert main(["convert", "llama-tiny", "--fp8", "--calib-seqs", "2",
                 "--fp8-high-precision", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "kept in high precision: FP8 rounding sensitivity rank 1 of" in out
    assert "sensitivity rank" in out and ("below the mean" in out or "over the budget" in out)


def test_convert_fp8_only_rounds_with_gptq_on_the_calibration_text(capsys):
    assert main(["convert", "llama-tiny", "--fp8", "--calib-seqs", "2"]) == 0
    assert "GPTQ rounding" in capsys.readouterr().out


def test_active_flag_reaches_the_recipe_and_needs_one():
    parse = build_parser().parse_args
    recipe = _conversion_configs(parse(["convert", "llama-tiny", "--recipe", "deepseek-v3",
                                        "--active", "0.5"]))[0]
    assert recipe.name == "deepseek-v3" and recipe.shared_fraction == pytest.approx(1 / 3)
    with pytest.raises(errors.InputError, match="give --recipe"):
        _conversion_configs(parse(["convert", "llama-tiny", "--active", "0.5"]))


def test_convert_recover_flag_trains_the_blocks_and_reports_it(capsys):
    assert main(["convert", "llama-tiny", "--experts", "4", "--top-k", "1", "--recover",
                 "--recover-seqs", "24", "--recover-logit-steps", "4", "--calib-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "recovery: 3 steps on 22 sequences" in out
    line = next(x for x in out.splitlines() if x.startswith("recovery:"))
    before, after = (float(v) for v in line.rsplit(" ", 3)[1::2])
    assert after < before
    with pytest.raises(SystemExit):
        main(["convert", "llama-tiny", "--experts", "4", "--recover", "--recover-seqs", "0"])


def test_seq_beyond_the_models_length_is_an_input_error_before_any_work(monkeypatch, capsys):
    """--seq past the preset's (or HF config's) maximum: 'rewriter: error:' naming --seq and
    the limit, exit 2, and the conversion never starts."""
    import rewriter.cli as cli

    def never(*args, **kwargs):
        raise AssertionError("convert ran")

    monkeypatch.setattr(cli, "convert", never)
    for model, seq, limit in (("llama-tiny", 100000, 64), ("llama-tiny", 65, 64)):
        assert main(["convert", model, "--seq", str(seq), "--experts", "4", "--top-k", "2",
                     "--calib-seqs", "0"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0] == (f"rewriter: error: --seq {seq} exceeds the maximum sequence length "
                          f"of {model} ({limit} tokens): give --seq {limit} or less"), err
    with pytest.raises(errors.InputError, match=r"--seq 65 exceeds .*\(64 tokens\)"):
        cli.resolve_model("llama-tiny", batch=3, seq=65)
    resolved = cli.resolve_model("llama-tiny", batch=3, seq=64)  # the limit itself is fine
    assert resolved.example_inputs[0].shape == (3, 64)
    hf_limit = cli.resolve_model("hf:llama").model.config.max_position_embeddings
    with pytest.raises(errors.InputError, match=f"--seq {hf_limit + 1} exceeds"):
        cli.resolve_model("hf:llama", seq=hf_limit + 1)


def test_calibration_longer_than_the_text_names_the_flags(monkeypatch, capsys):
    import rewriter.cli as cli

    monkeypatch.setattr(cli, "convert", lambda *a, **k: pytest.fail("convert ran"))
    assert main(["convert", "llama-tiny", "--experts", "4", "--top-k", "2",
                 "--calib-seqs", "99999", "--calib-len", "37"]) == 2
    err = capsys.readouterr().err.splitlines()[0]
    assert err.startswith("rewriter: error: --calib-seqs 99999 x --calib-len 37 needs "
                          f"{99999 * 37} tokens"), err
