"""BERT-style encoder: learned positions + token types, post-LayerNorm, bidirectional attention.

Module names (what a pass sees in ``nn_module_stack``)::

    embeddings.word, embeddings.position, embeddings.token_type, embeddings.norm
    layers[i].attention.query / key / value / out, layers[i].attention_norm
    layers[i].ffn.fc_in -> layers[i].ffn.act -> layers[i].ffn.fc_out, layers[i].ffn_norm

The FFN is ``fc_out(gelu(fc_in(x)))`` (erf GELU) with ``fc_in: d_model -> d_ff`` and
``fc_out: d_ff -> d_model``, both with biases. ``forward`` returns the last hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Bert", "BertConfig", "BertEmbeddings", "BertLayer", "SelfAttention", "FFN"]


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_ff: int = 136
    max_seq_len: int = 128
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_seq_len", "type_vocab_size"
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"BertConfig.d_model ({self.d_model}) must be divisible by "
                f"n_head ({self.n_head})"
            )
        for name in ("norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BertConfig.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def presets(cls) -> tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides) -> BertConfig:
        if name not in _PRESETS:
            raise ValueError(f"unknown BERT preset {name!r}; valid: {', '.join(_PRESETS)}")
        return replace(_PRESETS[name], **overrides)


_PRESETS = MappingProxyType(
    {
        "bert-tiny": BertConfig(),
        "bert-small-test": BertConfig(
            vocab_size=512, n_layer=4, n_head=8, d_model=128, d_ff=512, max_seq_len=128
        ),
    }
)


def _check_ids(idx: object, max_seq_len: int, arg: str = "idx") -> None:
    """Raise TypeError/ValueError unless ``idx`` is an int tensor of shape (B, T), T <= max."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{arg} must be an integer tensor (torch.int64 or torch.int32), got {idx.dtype}"
        )
    if idx.dim() != 2:
        raise ValueError(f"{arg} must have shape (B, T), got shape {tuple(idx.shape)}")
    if idx.shape[1] > max_seq_len:
        raise ValueError(
            f"{arg} has sequence length T={idx.shape[1]} but max_seq_len is {max_seq_len}"
        )


def _check_like(t: object, input_ids: torch.Tensor, arg: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{arg} must be an integer or bool tensor of 0/1, got {t.dtype}")
    if t.shape != input_ids.shape:
        raise ValueError(
            f"{arg} must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(t.shape)}"
        )


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.max_seq_len, config.d_model)
        self.token_type = nn.Embedding(config.type_vocab_size, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(pos)
        return self.norm(x)  # (B, T, C)


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.d_model, config.d_model)
        self.key = nn.Linear(config.d_model, config.d_model)
        self.value = nn.Linear(config.d_model, config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, C)
        q = self.query(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.key(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        v = self.value(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.out(y)


class FFN(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.d_ff)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))  # (B, T, C) -> (B, T, F) -> (B, T, C)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.ffn = FFN(config)
        self.ffn_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, mask))  # (B, T, C), post-LN
        return self.ffn_norm(x + self.ffn(x))  # (B, T, C)


class Bert(nn.Module):
    """``Bert(config)(input_ids (B, T) int, attention_mask (B, T) 0/1 | None) -> (B, T, C)``.

    ``attention_mask[b, t] == 0`` hides key t from every query of row b (padding).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.n_layer))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Small random weights and biases (std init_std). Uses the global RNG."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.normal_(module.bias, 0.0, std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, 1.0, std)
                nn.init.normal_(module.bias, 0.0, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_ids(input_ids, self.config.max_seq_len, "input_ids")
        mask = None
        if attention_mask is not None:
            _check_like(attention_mask, input_ids, "attention_mask")
            dtype = self.embeddings.word.weight.dtype
            keep = attention_mask[:, None, None, :].to(dtype)  # (B, 1, 1, T)
            mask = (1.0 - keep) * torch.finfo(dtype).min  # additive, (B, 1, 1, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            _check_like(token_type_ids, input_ids, "token_type_ids")
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, mask)  # (B, T, C)
        return x
