"""The own checkpoint format (targets/checkpoint.py): bit-exact round trips, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from rewriter.models import build_model, example_inputs
from rewriter.models.moe import MoEFFN
from rewriter.passes.allocation import apply_top_k
from rewriter.targets.checkpoint import (
    MANIFEST,
    WEIGHTS,
    check_writable,
    read_checkpoint,
    write_checkpoint,
)
from rewriter.targets.fp8_linear import FP8Linear, FP8MoEFFN
from torch import nn

import rewriter
from rewriter import FP8Config, MoEConfig
from rewriter.errors import CheckpointError, InputError

MOE = MoEConfig(num_experts=8, top_k=3, shared_width=44, gate="sigmoid", route_scale=3.0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8) if t.element_size() == 1 else t.detach()


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    """Same types, tensors (bits, dtype, persistence, ties, requires_grad), modes."""
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    ta = dict(a.named_parameters(remove_duplicate=False)) | dict(
        a.named_buffers(remove_duplicate=False))
    tb = dict(b.named_parameters(remove_duplicate=False)) | dict(
        b.named_buffers(remove_duplicate=False))
    assert ta.keys() == tb.keys()
    for name, t in ta.items():
        u = tb[name]
        assert t.dtype == u.dtype and t.shape == u.shape, name
        assert torch.equal(_bits(t), _bits(u)), name
        assert isinstance(t, nn.Parameter) == isinstance(u, nn.Parameter), name
        assert t.requires_grad == u.requires_grad, name
    assert a.state_dict().keys() == b.state_dict().keys()  # persistence
    ids_a, ids_b = {}, {}
    for name, t in ta.items():  # the same tying structure
        ids_a.setdefault(id(t), []).append(name)
    for name, t in tb.items():
        ids_b.setdefault(id(t), []).append(name)
    assert sorted(ids_a.values()) == sorted(ids_b.values())
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]
    for ma, mb in zip(a.modules(), b.modules()):
        if isinstance(ma, MoEFFN):
            assert ma.config == mb.config and ma._has_load == mb._has_load
        if isinstance(ma, (FP8Linear, FP8MoEFFN)):
            assert (ma.mode, ma.activations, ma.pow2, ma.compute_dtype) == (
                mb.mode, mb.activations, mb.pow2, mb.compute_dtype)


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.fixture(scope="module")
def base():
    model = build_model("llama-tiny")
    return model, example_inputs(model, 2, 9)


def _variant(base, kind):
    model, (ids,) = base
    if kind == "moe-hard":
        return rewriter.convert(model, moe=MoEConfig(num_experts=3, top_k=2, shared_experts=1),
                                example_inputs=(ids,))
    fp8 = {"moe": None, "moe-fp8-training": FP8Config(mode="training"),
           "moe-fp8-inference": FP8Config(mode="inference"),
           "moe-fp8-w8a16": FP8Config(mode="inference", activations="none")}[kind]
    return rewriter.convert(model, moe=MOE, fp8=fp8, example_inputs=(ids,))


@pytest.mark.parametrize("kind", ["moe-hard", "moe", "moe-fp8-training", "moe-fp8-inference",
                                  "moe-fp8-w8a16"])
def test_round_trip_is_bit_exact(base, kind, tmp_path):
    _, (ids,) = base
    model = _variant(base, kind)
    blocks = [m for m in model.modules() if isinstance(m, MoEFFN)]
    assert blocks
    # per-block top_k and bias-balancing state, as allocation and training leave them
    apply_top_k(blocks[0], 1, blocks[0].top_k)
    with torch.no_grad():
        blocks[-1].expert_bias.copy_(torch.randn(blocks[-1].num_experts) * 0.01)
    _logits(model, ids)  # records last_load
    next(model.parameters()).requires_grad_(False)  # a frozen parameter
    reference = _logits(model, ids)

    write_checkpoint(model, tmp_path / "ck", metadata={"note": kind})
    rng = torch.get_rng_state()
    back, meta = read_checkpoint(tmp_path / "ck")
    assert torch.equal(rng, torch.get_rng_state())  # loading draws nothing from the user's RNG
    assert meta == {"note": kind}
    assert_same_model(model, back)
    assert torch.equal(_logits(back, ids), reference)
    if kind == "moe-fp8-inference":
        assert back.layers[0].feed_forward.w_up_q.dtype == torch.float8_e4m3fn
        memos = {id(m._activation_memo) for m in back.modules()
                 if isinstance(m, (FP8Linear, FP8MoEFFN)) and m._activation_memo is not None}
        assert len(memos) == 1  # one shared activation memo, as the lowering pass gives


def test_round_trip_keeps_training_state_and_ties(tmp_path):
    model = build_model("llama-tiny-tied")
    ids = example_inputs(model, 2, 9)
    conv = rewriter.convert(model, moe=MOE, fp8=FP8Config(mode="training"), example_inputs=ids)
    conv.train()
    conv.layers[0].eval()  # a mixed train/eval tree
    write_checkpoint(conv, tmp_path / "ck")
    back, _ = read_checkpoint(tmp_path / "ck")
    assert back.output.weight is back.tok_embeddings.weight
    assert_same_model(conv, back)
    # one training step on each gives the same bits: nothing the step reads was lost
    for m in (conv, back):
        torch.manual_seed(0)
        logits = m(*ids)
        logits.float().square().mean().backward()
    for (name, p), q in zip(conv.named_parameters(), back.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_fp8_embeddings_and_tied_head_round_trip(tmp_path):
    model = build_model("llama-tiny-tied")
    ids = example_inputs(model, 2, 9)
    conv = rewriter.convert(model, fp8=FP8Config(mode="inference", embeddings="fp8",
                                                 keep_output_head=False), example_inputs=ids)
    write_checkpoint(conv, tmp_path / "ck")
    back, _ = read_checkpoint(tmp_path / "ck")
    assert_same_model(conv, back)
    assert any(type(m).__name__ == "FP8TiedHead" for m in back.modules())
    assert back.output.weight_q is back.tok_embeddings.weight_q  # one FP8 table
    assert torch.equal(_logits(back, *ids), _logits(conv, *ids))


def test_bfloat16_model_keeps_its_dtypes(base, tmp_path):
    model, ids = base
    conv = rewriter.convert(model, moe=MOE, example_inputs=ids).to(torch.bfloat16)
    write_checkpoint(conv, tmp_path / "ck")
    back, _ = read_checkpoint(tmp_path / "ck")
    assert_same_model(conv, back)
    assert back.layers[0].feed_forward.router.weight.dtype == torch.float32  # pinned


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def saved(tmp_path_factory, base):
    model = _variant(base, "moe")
    path = tmp_path_factory.mktemp("ck") / "ck"
    write_checkpoint(model, path)
    return path


def _copy(saved, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def test_missing_directory_and_foreign_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        read_checkpoint(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"no {MANIFEST}.*from_pretrained"):
        read_checkpoint(tmp_path)


def test_tampered_weights_are_detected(saved, tmp_path):
    path = _copy(saved, tmp_path)
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-3] ^= 0x40
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{WEIGHTS}: sha256 differs"):
        read_checkpoint(path)
    (path / WEIGHTS).write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_checkpoint(path, verify=False)
    (path / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=f"has no {WEIGHTS}"):
        read_checkpoint(path)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(version=99), "field 'version' is 99"),
    (lambda m: m.update(format="other"), "field 'format'"),
    (lambda m: m.pop("modules"), "field 'modules' is missing"),
    (lambda m: m["modules"][0].update(fqn="layers.9.nope"), "module 'layers.9.nope' does not"),
    (lambda m: m["modules"][0].update(type="Bogus"), "unknown module type 'Bogus'"),
    (lambda m: m["modules"][0]["config"].update(top_k=99), "bad MoEFFN spec"),
    (lambda m: m["source"].update(**{"class": "Nope"}), "source.class 'Nope'"),
    (lambda m: m["source"]["config"].update(n_layer=3), "missing \\['layers.2"),
])
def test_tampered_manifest_names_the_field(saved, tmp_path, edit, match):
    path = _copy(saved, tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)


def test_bad_json_and_unsavable_models(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="rebuilds transformers models and rewriter"):
        write_checkpoint(nn.Sequential(nn.Linear(2, 2)), tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before writing anything


def test_a_captured_activation_is_refused_with_the_reason(tmp_path):
    import transformers
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=61, hidden_act="tanh")  # named by no rule
    model = transformers.LlamaForCausalLM(config).eval()
    x = {"input_ids": torch.randint(0, 61, (2, 5))}
    moe = rewriter.convert(model, moe=MoEConfig(num_experts=4, top_k=2), example_inputs=x)
    with pytest.raises(rewriter.CheckpointError, match="captured activation"):
        rewriter.save(moe, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / MANIFEST).exists()


def test_an_inline_ffn_rewrite_is_refused_before_anything_is_written(tmp_path):
    """OPT's decoder layer holds its FFN inline (fc1 -> relu -> fc2 in the layer's forward):
    convert rewrites the layer from a traced graph. The checkpoint used to be written and then
    fail at load ("module ... moe_0 does not exist in the rebuilt model")."""
    import transformers
    config = transformers.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=1,
                                    num_attention_heads=4, vocab_size=61, word_embed_proj_dim=32,
                                    max_position_embeddings=64, dropout=0.0)
    model = transformers.OPTForCausalLM(config).eval()
    x = {"input_ids": torch.randint(0, 61, (2, 5))}
    moe = rewriter.convert(model, moe=MoEConfig(num_experts=4, top_k=2), example_inputs=x)
    with pytest.raises(CheckpointError, match=r"'model.decoder.layers.0' \(OPTDecoderLayer\) "
                                              r"holds its FFN inline.*ONNX"):
        rewriter.save(moe, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# ----------------------------------------------------------------------------- destinations


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_check_writable_refuses_what_cannot_be_written_and_creates_nothing(tmp_path):
    blocker = tmp_path / "model.bin"
    blocker.write_bytes(b"\x07 not a checkpoint")
    (tmp_path / "folder").mkdir()
    refused = [(blocker, "directory", "exists and is not a directory"),
               (blocker / "sub", "directory", "is not a directory"),
               (blocker / "a" / "b", "directory", "is not a directory"),
               (tmp_path / "folder", "file", "is a directory, not a file"),
               (blocker / "m.onnx", "file", "is not a directory")]
    for path, what, why in refused:
        with pytest.raises(CheckpointError, match=why) as info:
            check_writable(path, what)
        assert f"cannot write the {what} {str(path)!r}" in str(info.value)
    with pytest.raises(InputError, match="exists and is not a directory"):
        check_writable(str(blocker), "directory", error=InputError)
    with pytest.raises(CheckpointError, match="str or os.PathLike, got int"):
        check_writable(3, "directory")
    assert _tree(tmp_path) == ["folder", "model.bin"]  # nothing created, no probe left
    assert blocker.read_bytes() == b"\x07 not a checkpoint"
    # what can be written passes, new folders only with create=True
    assert check_writable(tmp_path / "new" / "deep", "directory") == tmp_path / "new" / "deep"
    assert check_writable(str(tmp_path / "folder" / "m.onnx"), "file") == \
        tmp_path / "folder" / "m.onnx"
    assert _tree(tmp_path) == ["folder", "model.bin"]
    check_writable(tmp_path / "new" / "deep", "directory", create=True)
    check_writable(tmp_path / "x" / "m.onnx", "file", create=True)
    assert (tmp_path / "new" / "deep").is_dir() and (tmp_path / "x").is_dir()
    assert not (tmp_path / "x" / "m.onnx").exists()


def test_write_checkpoint_onto_a_file_is_refused_before_anything_is_written(base, tmp_path):
    model = _variant(base, "moe")
    blocker = tmp_path / "model.bin"
    blocker.write_bytes(b"keep me")
    for path in (blocker, blocker / "ck"):
        with pytest.raises(CheckpointError, match="cannot write the directory") as info:
            write_checkpoint(model, path)
        assert str(path) in str(info.value)
    assert blocker.read_bytes() == b"keep me" and _tree(tmp_path) == ["model.bin"]
    with pytest.raises(CheckpointError, match="is not a directory"):
        read_checkpoint(blocker)
