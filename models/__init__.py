"""Small reference dense transformers and a name -> model registry.

    build_model("llama-tiny", seed=0)            # nn.Module with .config
    example_inputs(model, batch=2, seq=7)        # (input_ids,) valid for that model

Families: GPT (GELU/ReLU MLP, ``blocks[i].mlp.fc_in/fc_out``), LLaMA (SwiGLU,
``layers[i].feed_forward.w1/w3/w2``), BERT (GELU MLP, ``layers[i].ffn.fc_in/fc_out``).
Hugging Face models built without downloads live in ``rewriter.models.hf`` (optional dependencies).
"""

from __future__ import annotations

import torch
from torch import nn

from rewriter.errors import UnknownModelError

from .bert import Bert, BertConfig
from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig

__all__ = [
    "GPT",
    "Bert",
    "BertConfig",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "UnknownModelError",
    "build_model",
    "example_inputs",
    "list_models",
    "max_seq_len",
    "num_layers",
]

_FAMILIES: tuple[tuple[type, type[nn.Module]], ...] = (
    (GPTConfig, GPT),
    (LlamaConfig, Llama),
    (BertConfig, Bert),
)


def list_models() -> list[str]:
    """Every preset name of every family, family by family."""
    return [name for config_cls, _ in _FAMILIES for name in config_cls.presets()]


def _lookup(name: str) -> tuple[type, type[nn.Module]]:
    for config_cls, model_cls in _FAMILIES:
        if name in config_cls.presets():
            return config_cls, model_cls
    raise UnknownModelError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")


def build_model(
    name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> nn.Module:
    """Build preset ``name`` (see ``list_models()``) in eval mode, seeded without touching the
    caller's global RNG state. ``overrides`` replace config fields (validated)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    config_cls, model_cls = _lookup(name)
    config = config_cls.preset(name, **overrides)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype).eval()


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks of a model built here or a Hugging Face model."""
    config = getattr(model, "config", None)
    for attr in ("n_layer", "num_hidden_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise TypeError(f"{type(model).__name__} has no config.n_layer / config.num_hidden_layers")


def max_seq_len(model: nn.Module) -> int | None:
    """Longest sequence the model accepts, or None when its config does not say."""
    config = getattr(model, "config", None)
    for attr in ("max_seq_len", "max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def example_inputs(
    model: nn.Module, batch: int = 2, seq: int = 7, *, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """``(input_ids,)`` of shape (batch, seq): seeded random ids in [1, vocab_size), on the
    model's device. Works for models built here and for HF models (``config.vocab_size``)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        raise TypeError(f"{type(model).__name__} has no usable config.vocab_size ({vocab!r})")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not isinstance(seq, int) or seq < 1:
        raise ValueError(f"seq must be a positive int, got {seq!r}")
    limit = max_seq_len(model)
    if limit is not None and seq > limit:
        raise ValueError(f"seq={seq} exceeds the model's max sequence length {limit}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)  # (B, T), never token 0
    param = next(model.parameters(), None)
    if param is not None:
        ids = ids.to(param.device)
    return (ids,)
