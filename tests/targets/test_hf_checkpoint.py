"""Standard Hugging Face checkpoints (targets/hf_checkpoint.py), each loaded by vanilla
transformers in a fresh process that never imports the project."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from rewriter.models.hf import build_hf, hf_example_inputs
from rewriter.models.moe import MoEFFN
from rewriter.passes.allocation import apply_top_k
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rewriter
from rewriter import FP8Config, MoEConfig
from rewriter.errors import CheckpointError

pytest.importorskip("transformers")

_WORKER = r"""
import json, sys
import torch
import transformers
from safetensors.torch import load_file, save_file
directory, io, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = load_file(io + "/in.safetensors")["input_ids"]
model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
mlp_in, mlp_out = [], []
def record(module, args, out):
    mlp_in.append(args[0])
    mlp_out.append(out)
hooks = [layer.mlp.register_forward_hook(record) for layer in model.model.layers]
with torch.no_grad():
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    logits = out.logits
    hidden = torch.stack(out.hidden_states)
    for hook in hooks:
        hook.remove()
    gen = model.generate(ids[:1], max_new_tokens=new_tokens, do_sample=False,
                         min_new_tokens=new_tokens)
save_file({"logits": logits.contiguous(), "gen": gen.contiguous(), "hidden": hidden.contiguous(),
           "mlp_in": torch.stack(mlp_in).contiguous(),
           "mlp_out": torch.stack(mlp_out).contiguous()},
          io + "/out.safetensors")
print(json.dumps({"class": type(model).__name__, "imported": sorted(
    k for k in sys.modules if k == "rewriter" or k.startswith("rewriter."))}))
"""


def vanilla_run(directory: Path, input_ids: torch.Tensor, new_tokens: int = 8) -> dict:
    """Load ``directory`` with ``AutoModelForCausalLM.from_pretrained`` in a fresh ``python
    -I`` process (no project import, no trust_remote_code): its logits and hidden states
    (embeddings + every layer's output) on ``input_ids``, every layer's feed-forward input and
    output (``mlp_in`` / ``mlp_out``, [layers, batch, seq, hidden]), its greedy continuation of
    the first row, its class."""
    io = Path(directory).parent / (Path(directory).name + "-io")
    io.mkdir(exist_ok=True)
    save_file({"input_ids": input_ids.contiguous()}, str(io / "in.safetensors"))
    r = subprocess.run([sys.executable, "-I", "-c", _WORKER, str(directory), str(io),
                        str(new_tokens)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["imported"] == [], info  # vanilla transformers only
    return {**load_file(str(io / "out.safetensors")), "class": info["class"]}


def ours(model, input_ids: torch.Tensor, new_tokens: int = 8) -> dict:
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True)
        logits = out.logits
        gen = model.generate(input_ids[:1], max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens)
    return {"logits": logits, "gen": gen, "hidden": torch.stack(out.hidden_states)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _moe(gate: str, **kw) -> MoEConfig:
    return MoEConfig(num_experts=16, top_k=4, shared_width=44, gate=gate,
                     route_scale=4.0 if gate == "sigmoid" else 1.0, **kw)


@pytest.mark.parametrize("family,gate,arch", [
    ("llama", "sigmoid", "Glm4MoeForCausalLM"),
    ("qwen2", "softmax", "Qwen2MoeForCausalLM"),
    ("qwen2", "sigmoid", "Glm4MoeForCausalLM"),  # q/k/v biases: Glm4Moe's attention_bias
])
def test_vanilla_transformers_loads_the_moe_checkpoint(family, gate, arch, tmp_path):
    model = build_hf(family)
    x = hf_example_inputs(model, 2, 11)
    conv = rewriter.convert(model, moe=_moe(gate), example_inputs=x)
    block = conv.model.layers[1].mlp
    with torch.no_grad():  # balancing state, as training leaves it (selection only)
        if gate == "sigmoid":
            block.expert_bias.copy_(torch.linspace(-0.05, 0.05, block.num_experts))
    path = rewriter.save(conv, tmp_path / "hf", format="hf")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [arch] and "quantization_config" not in config
    if arch == "Glm4MoeForCausalLM":
        # 44 shared neurons padded with zeros to 6 experts of 8
        assert (config["n_routed_experts"], config["num_experts_per_tok"],
                config["moe_intermediate_size"], config["n_shared_experts"],
                config["first_k_dense_replace"], config["routed_scaling_factor"]) == (
            16, 4, 8, 6, 0, 4.0)
        assert config["attention_bias"] is (family == "qwen2")
    got, want = vanilla_run(path, x["input_ids"]), ours(conv, x["input_ids"])
    assert got["class"] == arch
    assert rel(got["logits"], want["logits"]) <= 1e-5
    assert torch.equal(got["gen"], want["gen"])


@pytest.mark.parametrize("family,gate", [("llama", "sigmoid"), ("qwen2", "softmax")])
def test_odd_expert_widths_are_padded_for_the_default_kernel(family, gate, tmp_path):
    """Experts 43 neurons wide (172 / 4): transformers' default CPU experts kernel
    (grouped_mm) refused the checkpoint ("strides should be multiple of 16 bytes"); widths
    are now padded with zero neurons to a multiple of 8, which is exact."""
    model = build_hf(family, intermediate_size=172)
    x = hf_example_inputs(model, 2, 9)
    moe = MoEConfig(num_experts=4, top_k=2, shared_width=0, gate=gate)
    conv = rewriter.convert(model, moe=moe, example_inputs=x)
    assert conv.model.layers[0].mlp.expert_dim == 43
    path = rewriter.save(conv, tmp_path / "hf", format="hf")
    assert json.loads((path / "config.json").read_text())["moe_intermediate_size"] == 48
    got, want = vanilla_run(path, x["input_ids"]), ours(conv, x["input_ids"])
    assert rel(got["logits"], want["logits"]) <= 1e-5
    assert torch.equal(got["gen"], want["gen"])


def test_dense_layers_first(tmp_path):
    model = build_hf("llama", num_hidden_layers=3)
    x = hf_example_inputs(model, 2, 11)
    keep = lambda module, fqn: not fqn.startswith("model.layers.0.")
    conv = rewriter.convert(model, moe=_moe("sigmoid"), example_inputs=x, filter_fn=keep)
    path = rewriter.save(conv, tmp_path / "hf", format="hf")
    config = json.loads((path / "config.json").read_text())
    assert config["first_k_dense_replace"] == 1 and config["intermediate_size"] == 172
    got, want = vanilla_run(path, x["input_ids"]), ours(conv, x["input_ids"])
    assert rel(got["logits"], want["logits"]) <= 1e-5
    assert torch.equal(got["gen"], want["gen"])


@pytest.mark.parametrize("pad_to", [None, 128])
def test_block_fp8_checkpoint_matches_our_w8a16(pad_to, tmp_path):
    model = build_hf("llama", hidden_size=128, intermediate_size=344)
    x = hf_example_inputs(model, 2, 11)
    moe = MoEConfig(num_experts=16, top_k=4, shared_width=88, gate="sigmoid", route_scale=4.0)
    conv = rewriter.convert(model, recipe="deepseek-v3-hf", moe=moe, example_inputs=x)
    # the W8A16 reference: the same master weights stored FP8 once, activations unquantized
    ref = rewriter.convert(model, moe=moe, fp8=FP8Config(mode="inference", activations="none"),
                           example_inputs=x)
    path = rewriter.save(conv, tmp_path / "hf", format="hf", pad_to=pad_to)
    config = json.loads((path / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["fmt"], q["activation_scheme"], q["weight_block_size"]) == (
        "fp8", "e4m3", "dynamic", [128, 128])
    assert "lm_head" in q["modules_to_not_convert"]
    assert config["moe_intermediate_size"] == (128 if pad_to else 16)
    assert config["n_shared_experts"] * config["moe_intermediate_size"] == (128 if pad_to
                                                                          else 96)

    # scales exactly ours; weight bytes ~ half of bf16 for the lowered weights
    blk = ref.model.layers[0].mlp
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.layers.0.mlp.experts.3.up_proj.weight")
        s = f.get_tensor("model.layers.0.mlp.experts.3.up_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert torch.equal(w[:16].view(torch.uint8), blk.w_up_q[3].view(torch.uint8))
        assert torch.equal(s[:1], blk.w_up_scale[3]) and not w[16:].float().any()
        fp8_bytes = bf16_bytes = 0
        for name in f.keys():
            t = f.get_tensor(name)
            if t.dtype == torch.float8_e4m3fn:
                scale = f.get_tensor(name + "_scale_inv")
                fp8_bytes += t.numel() + scale.numel() * 4
                bf16_bytes += 2 * t.numel()
    assert 0.5 <= fp8_bytes / bf16_bytes < 0.52

    got, want = vanilla_run(path, x["input_ids"]), ours(ref, x["input_ids"])
    assert got["class"] == "Glm4MoeForCausalLM"
    assert rel(got["logits"], want["logits"]) <= 1e-5
    assert torch.equal(got["gen"], want["gen"])


def test_fp8_only_model_keeps_its_architecture(tmp_path):
    model = build_hf("qwen2", hidden_size=128, intermediate_size=256)
    x = hf_example_inputs(model, 2, 11)
    conv = rewriter.convert(model, fp8=FP8Config(mode="inference"), example_inputs=x)
    ref = rewriter.convert(model, fp8=FP8Config(mode="inference", activations="none"),
                           example_inputs=x)
    path = rewriter.save(conv, tmp_path / "hf", format="hf")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    got, want = vanilla_run(path, x["input_ids"]), ours(ref, x["input_ids"])
    assert rel(got["logits"], want["logits"]) <= 1e-5


def test_linears_kept_in_high_precision_are_left_unconverted_by_the_fp8_loader(tmp_path):
    """GPTQ + the sensitivity-kept linears (FP8Config.high_precision_budget): the kept ones are
    written in high precision and named in modules_to_not_convert; vanilla transformers matches."""
    model = build_hf("qwen2", hidden_size=128, intermediate_size=256)
    x = hf_example_inputs(model, 2, 11)
    calib = [hf_example_inputs(model, 2, 17, seed=s) for s in (3, 4)]
    conv = rewriter.convert(model, fp8=FP8Config(activations="none", high_precision_budget=0.3),
                            example_inputs=x, calibration=calib)
    kept = [d.fqn for d in conv.rewriter_conversion.fp8_decisions
            if "rounding sensitivity" in d.reason]
    assert kept
    path = rewriter.save(conv, tmp_path / "hf", format="hf")
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert set(kept) <= set(q["modules_to_not_convert"])
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for fqn in kept:
            assert f.get_tensor(fqn + ".weight").dtype == torch.float32
            assert fqn + ".weight_scale_inv" not in f.keys()
    got, want = vanilla_run(path, x["input_ids"]), ours(conv, x["input_ids"])
    assert rel(got["logits"], want["logits"]) <= 1e-5


# ----------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def llama():
    model = build_hf("llama")
    return model, hf_example_inputs(model, 2, 7)


def _refused(model, tmp_path, *patterns):
    with pytest.raises(CheckpointError) as err:
        rewriter.save(model, tmp_path / "hf", format="hf")
    for p in patterns:
        assert p in str(err.value), str(err.value)
    assert not (tmp_path / "hf").exists()  # nothing written


def test_refuses_hard_gates(llama, tmp_path):
    model, x = llama
    conv = rewriter.convert(model, moe=MoEConfig(num_experts=4, top_k=2), example_inputs=x)
    _refused(conv, tmp_path, "hard gates", "gate='sigmoid'")


def test_refuses_per_block_top_k_and_non_suffix_moe(llama, tmp_path):
    model, x = llama
    conv = rewriter.convert(model, moe=_moe("sigmoid"), example_inputs=x)
    blocks = [m for m in conv.modules() if isinstance(m, MoEFFN)]
    apply_top_k(blocks[0], 2, blocks[0].top_k)
    _refused(conv, tmp_path, "per-block top_k", "allocation='uniform'", "deepseek-v3-hf")
    first = lambda module, fqn: fqn.startswith("model.layers.0.")
    conv = rewriter.convert(model, moe=_moe("sigmoid"), example_inputs=x, filter_fn=first)
    _refused(conv, tmp_path, "dense layers first", "[0]", "filter_fn")


def test_refuses_softmax_with_bias_or_route_scale(llama, tmp_path):
    model, x = llama
    conv = rewriter.convert(model, moe=_moe("softmax"), example_inputs=x)
    with torch.no_grad():
        conv.model.layers[1].mlp.expert_bias[0] = 0.1
    _refused(conv, tmp_path, "layer 1 has a non-zero expert_bias", "gate='sigmoid'")
    conv = rewriter.convert(model, moe=MoEConfig(num_experts=16, top_k=4, shared_width=44,
                                                 gate="softmax", route_scale=2.0),
                            example_inputs=x)
    _refused(conv, tmp_path, "route_scale=2.0", "route_scale=1.0")


def test_refuses_unsupported_sources(tmp_path):
    from rewriter.models import build_model

    gpt2 = build_hf("gpt2")
    x = hf_example_inputs(gpt2)
    conv = rewriter.convert(gpt2, moe=MoEConfig(num_experts=4, top_k=2, gate="sigmoid"),
                            example_inputs=x)
    _refused(conv, tmp_path, "GPT2LMHeadModel", "format='rewriter'")
    ref = build_model("llama-tiny")
    _refused(ref, tmp_path, "Llama", "format='rewriter'")
    tied = build_hf("llama", tie_word_embeddings=True)
    conv = rewriter.convert(tied, fp8=FP8Config(embeddings="fp8"), example_inputs=x)
    _refused(conv, tmp_path, "FP8 embedding tables", "embeddings='keep'")


def test_a_w8a16_model_is_written_with_a_warning_about_runtimes(tmp_path):
    """The block-FP8 format has no weight-only scheme: the checkpoint says 'dynamic', which
    FP8-GPU runtimes run as W8A8; said when a W8A16 model is written, not for a W8A8 one."""
    model = build_hf("llama", hidden_size=128, intermediate_size=344)
    x = hf_example_inputs(model, 2, 7)
    moe = MoEConfig(num_experts=16, top_k=4, shared_width=88, gate="sigmoid", route_scale=4.0)
    w8a16 = rewriter.convert(model, moe=moe, fp8=FP8Config(activations="none"),
                             example_inputs=x)
    with pytest.warns(UserWarning, match=r"W8A16 .* will run it as W8A8"):
        rewriter.save(w8a16, tmp_path / "a16", format="hf")
    w8a8 = rewriter.convert(model, moe=moe, fp8=FP8Config(), example_inputs=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        rewriter.save(w8a8, tmp_path / "a8", format="hf")


def test_a_file_in_the_way_is_refused_before_anything_is_written(llama, tmp_path):
    """format="hf" onto an existing file (or below one): CheckpointError naming the path,
    the file untouched, nothing created; a model hf refuses still fails on the path first."""
    model, x = llama
    good = rewriter.convert(model, moe=_moe("sigmoid"), example_inputs=x)
    hard = rewriter.convert(model, moe=MoEConfig(num_experts=4, top_k=2), example_inputs=x)
    blocker = tmp_path / "weights.bin"
    blocker.write_bytes(b"\x01\x02\x03")
    for conv in (good, hard):
        for path in (blocker, blocker / "hf", str(blocker)):
            with pytest.raises(CheckpointError, match="cannot write the directory") as info:
                rewriter.save(conv, path, format="hf")
            assert str(path) in str(info.value)
    assert blocker.read_bytes() == b"\x01\x02\x03"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]
