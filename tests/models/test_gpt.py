import math

import pytest
import torch
import torch.nn.functional as F
from rewriter.models import build_model, example_inputs
from rewriter.models.gpt import GPT, GPTConfig
from torch.export import Dim

PRESETS = GPTConfig.presets()


def _ids(model, batch=2, seq=7, seed=0):
    return example_inputs(model, batch, seq, seed=seed)[0]


@pytest.mark.parametrize("name", PRESETS)
def test_forward_shape_and_finite(name):
    model = build_model(name)
    logits = model(_ids(model, 3, 5))
    assert logits.shape == (3, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_presets_are_small_and_distinct():
    assert "gpt-tiny" in PRESETS and "gpt-small-test" in PRESETS
    tiny = GPTConfig.preset("gpt-tiny")
    assert (tiny.n_layer, tiny.d_model, tiny.n_head, tiny.d_ff) == (2, 48, 4, 136)
    activations = {GPTConfig.preset(n).activation for n in PRESETS}
    assert activations == {"gelu", "gelu_tanh", "relu"}
    assert GPTConfig.preset("gpt-tiny", n_layer=3).n_layer == 3
    with pytest.raises(ValueError, match="gpt-tiny"):
        GPTConfig.preset("gpt-huge")


def test_config_is_frozen():
    config = GPTConfig()
    with pytest.raises(AttributeError):
        config.n_layer = 5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(d_model=50), "d_model"),
        (dict(d_ff=2.5), "d_ff"),
        (dict(activation="swish"), "activation"),
        (dict(max_seq_len=True), "max_seq_len"),
        (dict(norm_eps=0.0), "norm_eps"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


def test_causal():
    model = build_model("gpt-tiny")
    ids = _ids(model, 2, 9)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] % (model.config.vocab_size - 1)) + 1
    assert not torch.equal(changed, ids)
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().amax() > 1e-4


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_mlp_formula(activation):
    torch.manual_seed(0)
    model = GPT(GPTConfig(activation=activation))
    mlp = model.blocks[1].mlp
    assert mlp.fc_in.out_features == 136 and mlp.fc_out.in_features == 136
    act = {
        "gelu": F.gelu,
        "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
        "relu": F.relu,
    }[activation]
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    mlp = mlp.double()
    ref = act(x @ mlp.fc_in.weight.T + mlp.fc_in.bias) @ mlp.fc_out.weight.T + mlp.fc_out.bias
    torch.testing.assert_close(mlp(x), ref, rtol=1e-12, atol=1e-12)


def test_biases_are_random_not_zero():
    model = build_model("gpt-tiny")
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert biases and all(b.abs().amax() > 0 for b in biases)
    nobias = build_model("gpt-tiny-relu")
    assert all(m.bias is None for m in nobias.modules() if isinstance(m, torch.nn.Linear))


def test_tied_and_untied_head():
    tied = build_model("gpt-tiny-tanh")
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = build_model("gpt-tiny")
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_deterministic_given_manual_seed():
    torch.manual_seed(3)
    a = GPT(GPTConfig())
    torch.manual_seed(3)
    b = GPT(GPTConfig())
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_bad_inputs_raise_clear_errors():
    model = build_model("gpt-tiny")
    ids = _ids(model)
    with pytest.raises(TypeError, match=r"idx must be an integer tensor.*float32"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"idx must have shape \(B, T\), got shape \(7,\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"T=65 but max_seq_len is 64"):
        model(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(TypeError, match="idx must be a torch.Tensor"):
        model([[1, 2, 3]])


def test_int32_ids_accepted():
    model = build_model("gpt-tiny")
    ids = _ids(model)
    torch.testing.assert_close(model(ids.int()), model(ids), rtol=0, atol=0)


def test_attention_matches_naive_reference():
    model = build_model("gpt-tiny").double()
    attn = model.blocks[0].attn
    B, T, C, H = 2, 6, 48, 4
    x = torch.randn(B, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(C, dim=-1)
    q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // H)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    ref = y @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-12)


def test_matches_hf_gpt2():
    transformers = pytest.importorskip("transformers")
    model = build_model("gpt-tiny-tanh")  # gelu_tanh == gelu_new, tied head like GPT-2
    cfg = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff,
        activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    sd = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight":
          model.pos_emb.weight, "transformer.ln_f.weight": model.ln_f.weight,
          "transformer.ln_f.bias": model.ln_f.bias}
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.qkv": "attn.c_attn",
             "attn.proj": "attn.c_proj", "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}
    for i, block in enumerate(model.blocks):
        for ours, theirs in names.items():
            mod = block.get_submodule(ours)
            conv = isinstance(mod, torch.nn.Linear)  # GPT-2's Conv1D stores W transposed
            sd[f"transformer.h.{i}.{theirs}.weight"] = mod.weight.T if conv else mod.weight
            sd[f"transformer.h.{i}.{theirs}.bias"] = mod.bias
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied to wte
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    ids = _ids(model, 2, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_export_dynamic_matches_eager(name):
    model = build_model(name)
    (x,) = example_inputs(model, 2, 7)
    ep = torch.export.export(
        model, (x,), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},), strict=False
    )
    (y,) = example_inputs(model, 3, 5, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(y), model(y), rtol=1e-6, atol=1e-6)
