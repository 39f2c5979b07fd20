import pytest
import torch
import torch.nn.functional as F
from rewriter.models import build_model, example_inputs
from rewriter.models.llama import Llama, LlamaConfig
from torch.export import Dim

PRESETS = LlamaConfig.presets()


def _ids(model, batch=2, seq=7, seed=0):
    return example_inputs(model, batch, seq, seed=seed)[0]


@pytest.mark.parametrize("name", PRESETS)
def test_forward_shape_and_finite(name):
    model = build_model(name)
    logits = model(_ids(model, 3, 5))
    assert logits.shape == (3, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_tiny_preset_shape():
    cfg = LlamaConfig.preset("llama-tiny")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff) == (2, 64, 4, 2, 172)
    with pytest.raises(ValueError, match="llama-tiny"):
        LlamaConfig.preset("llama-70b")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(n_head=3), "d_model"),
        (dict(n_kv_head=3), "n_kv_head"),
        (dict(n_kv_head=0), "n_kv_head"),
        (dict(d_ff=0), "d_ff"),
        (dict(d_model=12, n_head=4, n_kv_head=2), "n_head"),  # head_dim 3 is odd
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(max_seq_len=None), "max_seq_len"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LlamaConfig(**kwargs)


def test_causal():
    model = build_model("llama-tiny")
    ids = _ids(model, 2, 9)
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] % (model.config.vocab_size - 1)) + 1
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)
    assert (a[:, 4:] - b[:, 4:]).abs().amax() > 1e-4


def test_ffn_is_swiglu_without_bias():
    model = build_model("llama-tiny").double()
    ff = model.layers[0].feed_forward
    assert (ff.w1.out_features, ff.w3.out_features, ff.w2.in_features) == (172, 172, 172)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    x = torch.randn(2, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = (F.silu(x @ ff.w1.weight.T) * (x @ ff.w3.weight.T)) @ ff.w2.weight.T
    torch.testing.assert_close(ff(x), ref, rtol=1e-12, atol=1e-12)


def test_gqa_is_used_and_equals_mha_with_repeated_kv_heads():
    model = build_model("llama-tiny").double()
    cfg = model.config
    attn = model.layers[0].attention
    assert cfg.n_kv_head < cfg.n_head
    assert attn.wk.out_features == attn.wv.out_features == cfg.n_kv_head * cfg.head_dim
    assert attn.wq.out_features == cfg.d_model

    # An MHA with each KV head's rows repeated n_head / n_kv_head times is the same function.
    mha = Llama(LlamaConfig(n_kv_head=cfg.n_head)).double().layers[0].attention
    rep = cfg.n_head // cfg.n_kv_head
    with torch.no_grad():
        mha.wq.weight.copy_(attn.wq.weight)
        mha.wo.weight.copy_(attn.wo.weight)
        for w in ("wk", "wv"):
            heads = getattr(attn, w).weight.view(cfg.n_kv_head, cfg.head_dim, cfg.d_model)
            getattr(mha, w).weight.copy_(heads.repeat_interleave(rep, 0).reshape(-1, cfg.d_model))
    T = 6
    x = torch.randn(2, T, cfg.d_model, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    torch.testing.assert_close(attn(x, cos, sin), mha(x, cos, sin), rtol=1e-12, atol=1e-12)


def test_rope_buffers_not_persistent_and_rotation_preserves_norm():
    model = build_model("llama-tiny")
    assert not any("rope" in k for k in model.state_dict())
    assert model.rope_cos.shape == (model.config.max_seq_len, model.config.head_dim)
    from rewriter.models.llama import apply_rope

    q = torch.randn(1, 1, 8, 16)
    r = apply_rope(q, model.rope_cos[:8], model.rope_sin[:8])
    torch.testing.assert_close(r.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(r[..., 0, :], q[..., 0, :])  # position 0 is not rotated


def test_norm_gains_random_near_one():
    model = build_model("llama-tiny")
    w = model.layers[0].attention_norm.weight
    assert not torch.equal(w, torch.ones_like(w))
    assert (w - 1).abs().amax() < 0.2


def test_tied_head():
    model = build_model("llama-tiny-tied")
    assert model.output.weight is model.tok_embeddings.weight
    assert model.config.n_layer == 3


def test_bad_inputs_raise_clear_errors():
    model = build_model("llama-tiny")
    ids = _ids(model)
    with pytest.raises(TypeError, match=r"idx must be an integer tensor.*torch.float16"):
        model(ids.half())
    with pytest.raises(ValueError, match=r"idx must have shape \(B, T\), got shape \(2, 7, 1\)"):
        model(ids[..., None])
    with pytest.raises(ValueError, match=r"T=70 but max_seq_len is 64"):
        model(torch.ones(2, 70, dtype=torch.long))


def test_bfloat16_build():
    model = build_model("llama-tiny", dtype=torch.bfloat16)
    logits = model(_ids(model))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_matches_hf_llama():
    transformers = pytest.importorskip("transformers")
    model = build_model("llama-tiny")
    cfg = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, use_cache=False,
        tie_word_embeddings=False, attn_implementation="eager",
    )).eval()
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight,
          "model.norm.weight": model.norm.weight, "lm_head.weight": model.output.weight}
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i, layer in enumerate(model.layers):
        for ours, theirs in names.items():
            sd[f"model.layers.{i}.{theirs}.weight"] = layer.get_submodule(ours).weight
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    ids = _ids(model, 2, 13)
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
