import pytest
import torch
from rewriter.models import (
    GPT,
    Bert,
    Llama,
    UnknownModelError,
    build_model,
    example_inputs,
    list_models,
    max_seq_len,
    num_layers,
)

from rewriter import models


def test_list_models_covers_all_families():
    names = list_models()
    assert len(names) == len(set(names))
    for required in ("gpt-tiny", "gpt-small-test", "llama-tiny", "bert-tiny"):
        assert required in names
    assert {n.split("-")[0] for n in names} == {"gpt", "llama", "bert"}


@pytest.mark.parametrize("name", list_models())
def test_build_every_preset(name):
    model = build_model(name)
    family = {"gpt": GPT, "llama": Llama, "bert": Bert}[name.split("-")[0]]
    assert isinstance(model, family)
    assert not model.training
    cfg = model.config
    for attr in ("vocab_size", "n_layer", "d_model", "d_ff"):
        assert isinstance(getattr(cfg, attr), int)
    assert num_layers(model) == cfg.n_layer == len(getattr(model, "blocks", None) or model.layers)
    assert max_seq_len(model) == cfg.max_seq_len
    (x,) = example_inputs(model)
    with torch.no_grad():
        out = model(x)
    assert out.shape[:2] == (2, 7) and torch.isfinite(out).all()


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownModelError) as info:
        build_model("gpt-nonexistent")
    message = str(info.value)
    assert "gpt-nonexistent" in message
    assert all(name in message for name in list_models())
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert not message.startswith('"')  # not KeyError's repr quoting


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model("llama-tiny", seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model("llama-tiny", seed=5)
    c = build_model("llama-tiny", seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_build_dtype_and_overrides():
    model = build_model("gpt-tiny", dtype=torch.float64, n_layer=3, activation="relu")
    assert next(model.parameters()).dtype == torch.float64
    assert model.config.n_layer == 3 and model.config.activation == "relu"
    with pytest.raises(ValueError, match="activation"):
        build_model("gpt-tiny", activation="tanh")
    with pytest.raises(ValueError, match="dtype"):
        build_model("gpt-tiny", dtype=torch.int64)


def test_example_inputs_valid_seeded_nonzero():
    model = build_model("bert-tiny")
    (x,) = example_inputs(model, batch=3, seq=11, seed=4)
    (y,) = example_inputs(model, batch=3, seq=11, seed=4)
    (z,) = example_inputs(model, batch=3, seq=11, seed=5)
    assert x.shape == (3, 11) and x.dtype == torch.int64
    assert torch.equal(x, y) and not torch.equal(x, z)
    assert x.min() >= 1 and x.max() < model.config.vocab_size
    assert len(x.unique()) > 5


def test_example_inputs_rejects_bad_sizes():
    model = build_model("gpt-tiny")
    with pytest.raises(ValueError, match="seq=65"):
        example_inputs(model, seq=65)
    with pytest.raises(ValueError, match="batch"):
        example_inputs(model, batch=0)
    with pytest.raises(TypeError, match="vocab_size"):
        example_inputs(torch.nn.Linear(2, 2))


def test_public_names():
    for name in models.__all__:
        assert hasattr(models, name)
