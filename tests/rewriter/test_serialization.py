"""rewriter.save / rewriter.load: the front end over both checkpoint formats."""

from __future__ import annotations

import json

import pytest
import torch
from rewriter.models.hf import build_hf, hf_example_inputs
from rewriter.targets.checkpoint import MANIFEST

import rewriter
from rewriter import FP8Config, MoEConfig
from rewriter.errors import CheckpointError
from rewriter.recipes import get_recipe
from rewriter.training import TextData, TrainConfig, train
from tests.targets.test_checkpoint import assert_same_model
from tests.targets.test_hf_checkpoint import ours, rel, vanilla_run

MOE = MoEConfig(num_experts=16, top_k=4, shared_width=44, gate="sigmoid", route_scale=4.0)


@pytest.fixture(scope="module")
def converted():
    model = build_hf("llama")
    x = hf_example_inputs(model, 2, 9)
    return rewriter.convert(model, moe=MOE, fp8=FP8Config(mode="training"), example_inputs=x), x


def test_save_load_keeps_conversion_info(converted, tmp_path):
    conv, x = converted
    path = rewriter.save(conv, tmp_path / "own")
    assert path == tmp_path / "own" and (path / MANIFEST).is_file()
    back = rewriter.load(path)
    assert type(back) is type(conv)
    assert_same_model(conv, back)
    with torch.no_grad():
        assert torch.equal(back(**x).logits, conv(**x).logits)
    a, b = rewriter.conversion_info(conv), rewriter.conversion_info(back)
    assert b.moe == a.moe and b.fp8 == a.fp8 and b.modules == a.modules
    assert b.fp8_decisions == a.fp8_decisions and b.source_stats == a.source_stats
    assert b.blocks == a.blocks and b.split_error == a.split_error
    # the loaded model saves again to the same manifest and bytes as the original does now
    # (both ran the same forward above, which updates the routers' load statistics)
    again = rewriter.save(back, tmp_path / "again")
    now = rewriter.save(conv, tmp_path / "now")
    assert json.loads((again / MANIFEST).read_text()) == json.loads((now / MANIFEST).read_text())


def test_round_trip_after_training(tmp_path):
    model = build_hf("llama")
    x = hf_example_inputs(model, 2, 9)
    conv = rewriter.convert(model, recipe="deepseek-v3-hf", moe=MOE, example_inputs=x)
    data = TextData.from_corpus(None, eval_tokens=512, eval_len=64, hf=True)
    train(conv, data, TrainConfig(steps=2, batch_size=2, seq_len=17, lr=3e-3,
                                  bias_update_rate=1e-2), progress=False)
    assert conv.model.layers[0].mlp.expert_bias.abs().sum() > 0  # balancing state moved
    back = rewriter.load(rewriter.save(conv, tmp_path / "own"))
    assert_same_model(conv, back)
    with torch.no_grad():
        assert torch.equal(back(**x).logits, conv(**x).logits)
    # the trained model is still representable: a standard checkpoint loads without our code
    path = rewriter.save(conv, tmp_path / "hf", format="hf")
    assert json.loads((path / "config.json").read_text())["architectures"] == [
        "Glm4MoeForCausalLM"]


def test_bad_arguments(converted, tmp_path):
    conv, _ = converted
    with pytest.raises(CheckpointError, match="format must be one of rewriter, hf"):
        rewriter.save(conv, tmp_path / "x", format="onnx")
    with pytest.raises(CheckpointError, match="pad_to applies to format='hf'"):
        rewriter.save(conv, tmp_path / "x", pad_to=128)
    with pytest.raises(CheckpointError, match="pad_to must be a positive int"):
        rewriter.save(conv, tmp_path / "x", format="hf", pad_to=0)
    with pytest.raises(CheckpointError, match="must be a torch.nn.Module"):
        rewriter.save("model", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    blocker = tmp_path / "model.bin"  # an existing regular file: both formats refuse it
    blocker.write_text("x")
    for fmt in ("rewriter", "hf"):
        for path in (blocker, blocker / "sub"):
            with pytest.raises(CheckpointError, match="cannot write the directory") as info:
                rewriter.save(conv, path, format=fmt)
            assert str(path) in str(info.value)
    assert blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
    hf = rewriter.save(conv, tmp_path / "hf", format="hf")
    with pytest.raises(CheckpointError, match="from_pretrained"):
        rewriter.load(hf)  # a Hugging Face checkpoint: not ours to load


# ----------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_saves_as_glm4_moe(tmp_path):
    from rewriter.models.hf import load_smollm2

    model, tokenizer = load_smollm2()
    ids = tokenizer("The with statement is used to wrap the execution of a block",
                    return_tensors="pt")["input_ids"]
    x = {"input_ids": torch.cat([ids, ids.flip(1)])}
    moe, _ = get_recipe("deepseek-v3-hf").configs([1536])
    conv = rewriter.convert(model, moe=moe, example_inputs=x)
    path = rewriter.save(conv, tmp_path / "hf", format="hf", tokenizer=tokenizer)
    assert (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    got, want = vanilla_run(path, x["input_ids"], 12), ours(conv, x["input_ids"], 12)
    assert got["class"] == "Glm4MoeForCausalLM"
    # The contract, independent of depth and of transformers' kernels: every block, given
    # vanilla's input to it, computes vanilla's output to fp32 tolerance. Measured 9.9e-7 with
    # transformers 5.24, whose Glm4MoeExperts default to grouped_mm (another summation order
    # than our dispatch and than its own eager loop).
    with torch.no_grad():
        per_block = [rel(layer.mlp(h), o) for layer, h, o in
                     zip(conv.model.layers, got["mlp_in"], got["mlp_out"], strict=True)]
    assert len(per_block) == 30 and max(per_block) <= 5e-6, per_block
    # End to end, 30 layers, the final norm and the head amplify those ulps by ~50x, by how
    # much depends on the experts kernel: max-abs relative on the logits 4.8e-5 with 5.24's
    # default grouped_mm (1.2e-5 Frobenius), 2.3e-5 with experts_implementation="eager"; 1.07e-5
    # with the transformers of session 11, whose 1.5e-5 bound CI then failed. Issue 13 asks
    # <= 1e-5: not met end to end (BENCHMARKS.md).
    logits_rel = rel(got["logits"], want["logits"])
    frobenius = (got["logits"].double() - want["logits"].double()).norm() / want[
        "logits"].double().norm()
    assert logits_rel <= 2e-4 and frobenius <= 1e-4, (logits_rel, frobenius)
    assert torch.equal(got["gen"], want["gen"])
    back = rewriter.load(rewriter.save(conv, tmp_path / "own"))
    with torch.no_grad():
        assert torch.equal(back(**x).logits, want["logits"])


def test_cli_convert_save(tmp_path, capsys):
    from rewriter.cli import main

    out = tmp_path / "hf"
    assert main(["convert", "hf:llama", "--recipe", "deepseek-v3-hf", "--calib-seqs", "0",
                 "--save", str(out), "--format", "hf"]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"]
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert main(["convert", "hf:llama", "--recipe", "moe-only", "--calib-seqs", "0",
                 "--save", str(tmp_path / "hard"), "--format", "hf"]) == 2
    assert "hard gates" in capsys.readouterr().err
    assert not (tmp_path / "hard" / "config.json").exists()  # nothing written


def test_round_trip_of_a_recovered_model(tmp_path):
    """The recovery report travels with the model; the recovered weights load bit-exact."""
    model = build_hf("llama")
    x = hf_example_inputs(model, 2, 9)
    g = torch.Generator().manual_seed(3)
    calib = [{"input_ids": torch.randint(0, model.config.vocab_size, (4, 11), generator=g)}
             for _ in range(5)]
    conv = rewriter.convert(model, moe=MoEConfig(num_experts=4, top_k=1), example_inputs=x,
                            calibration=calib,
                            recovery=rewriter.RecoveryConfig(lr=3e-3, logit_steps=4))
    back = rewriter.load(rewriter.save(conv, tmp_path / "own"))
    assert_same_model(conv, back)
    with torch.no_grad():
        assert torch.equal(back(**x).logits, conv(**x).logits)
    a, b = rewriter.conversion_info(conv).recovery, rewriter.conversion_info(back).recovery
    assert a is not None and b == a and b["sequences"] == 18
