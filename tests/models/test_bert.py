import pytest
import torch
import torch.nn.functional as F
from rewriter.models import build_model, example_inputs
from rewriter.models.bert import BertConfig
from torch.export import Dim

PRESETS = BertConfig.presets()


def _ids(model, batch=2, seq=7, seed=0):
    return example_inputs(model, batch, seq, seed=seed)[0]


@pytest.mark.parametrize("name", PRESETS)
def test_forward_shape_and_finite(name):
    model = build_model(name)
    hidden = model(_ids(model, 3, 5))
    assert hidden.shape == (3, 5, model.config.d_model)
    assert torch.isfinite(hidden).all()
    assert hidden.std() > 0.5  # post-LN output


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(n_head=5), "d_model"),
        (dict(type_vocab_size=0), "type_vocab_size"),
        (dict(d_ff=-1), "d_ff"),
        (dict(norm_eps=0), "norm_eps"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BertConfig(**kwargs)


def test_bidirectional():
    model = build_model("bert-tiny")
    ids = _ids(model, 2, 9)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] % (model.config.vocab_size - 1)) + 1
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert ((a[:, 0] - b[:, 0]).abs().amax(-1) > 1e-4).all()  # the first token sees the last


def test_attention_mask_hides_padding():
    model = build_model("bert-tiny")
    ids = _ids(model, 2, 9)
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0  # last 3 positions are padding
    with torch.no_grad():
        masked = model(ids, attention_mask=mask)
        truncated = model(ids[:, :6])
        unmasked = model(ids)
        other_pad = ids.clone()
        other_pad[:, 6:] = 1
        masked_other = model(other_pad, attention_mask=mask)
    torch.testing.assert_close(masked[:, :6], truncated, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked[:, :6], masked_other[:, :6], rtol=1e-5, atol=1e-5)
    assert (masked[:, :6] - unmasked[:, :6]).abs().amax() > 1e-3
    # an all-ones mask (int or bool) is the same as no mask
    torch.testing.assert_close(model(ids, torch.ones_like(ids).bool()), unmasked)


def test_token_type_ids():
    model = build_model("bert-tiny")
    ids = _ids(model)
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    with torch.no_grad():
        assert torch.equal(model(ids, token_type_ids=torch.zeros_like(ids)), model(ids))
        assert (model(ids, token_type_ids=types) - model(ids)).abs().amax() > 1e-3


def test_ffn_formula_and_random_biases():
    model = build_model("bert-tiny").double()
    ffn = model.layers[1].ffn
    assert (ffn.fc_in.out_features, ffn.fc_out.in_features) == (136, 136)
    assert ffn.fc_in.bias.abs().amax() > 0 and ffn.fc_out.bias.abs().amax() > 0
    x = torch.randn(2, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = F.gelu(x @ ffn.fc_in.weight.T + ffn.fc_in.bias) @ ffn.fc_out.weight.T + ffn.fc_out.bias
    torch.testing.assert_close(ffn(x), ref, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    model = build_model("bert-tiny")
    ids = _ids(model)
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor.*float32"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"T=129 but max_seq_len is 128"):
        model(torch.ones(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids"):
        model(ids, attention_mask=torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(TypeError, match=r"attention_mask must be an integer or bool"):
        model(ids, attention_mask=torch.ones(2, 7))


def test_matches_hf_bert():
    transformers = pytest.importorskip("transformers")
    model = build_model("bert-tiny")
    cfg = model.config
    hf = transformers.BertModel(transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff, hidden_act="gelu",
        max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    ), add_pooling_layer=False).eval()
    sd = {}
    emb = {"word": "word_embeddings", "position": "position_embeddings",
           "token_type": "token_type_embeddings", "norm": "LayerNorm"}
    for ours, theirs in emb.items():
        for k, v in model.embeddings.get_submodule(ours).state_dict().items():
            sd[f"embeddings.{theirs}.{k}"] = v
    names = {"attention.query": "attention.self.query", "attention.key": "attention.self.key",
             "attention.value": "attention.self.value", "attention.out": "attention.output.dense",
             "attention_norm": "attention.output.LayerNorm", "ffn.fc_in": "intermediate.dense",
             "ffn.fc_out": "output.dense", "ffn_norm": "output.LayerNorm"}
    for i, layer in enumerate(model.layers):
        for ours, theirs in names.items():
            for k, v in layer.get_submodule(ours).state_dict().items():
                sd[f"encoder.layer.{i}.{theirs}.{k}"] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected
    assert all("position_ids" in k or "token_type_ids" in k for k in missing)
    ids = _ids(model, 2, 10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids), hf(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5
        )
        ours = model(ids, attention_mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


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


def test_export_with_attention_mask():
    model = build_model("bert-tiny")
    (x,) = example_inputs(model, 2, 7)
    mask = torch.ones_like(x)
    mask[0, 5:] = 0
    dims = {0: Dim.AUTO, 1: Dim.AUTO}
    ep = torch.export.export(model, (x, mask), dynamic_shapes=(dims, dims), strict=False)
    (y,) = example_inputs(model, 3, 5, seed=1)
    ymask = torch.ones_like(y)
    ymask[2, 3:] = 0
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(y, ymask), model(y, ymask), rtol=1e-6, atol=1e-6)
