"""GPT-style decoder (nanoGPT shape): learned positions, pre-LayerNorm, GELU/ReLU MLP.

Module names (what a pass sees in ``nn_module_stack``)::

    tok_emb, pos_emb
    blocks[i].ln_1, blocks[i].attn.qkv, blocks[i].attn.proj
    blocks[i].ln_2, blocks[i].mlp.fc_in -> blocks[i].mlp.act -> blocks[i].mlp.fc_out
    ln_f, lm_head

The FFN is ``fc_out(act(fc_in(x)))`` with ``fc_in: d_model -> d_ff`` and
``fc_out: d_ff -> d_model``; biases on both when ``config.bias``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATIONS", "GPT", "GPTConfig", "MLP", "CausalSelfAttention", "Block"]

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 48
    d_ff: int = 136
    max_seq_len: int = 64
    activation: str = "gelu"  # one of ACTIVATIONS
    bias: bool = True  # biases on every Linear and LayerNorm
    tie_embeddings: bool = False  # lm_head.weight is tok_emb.weight
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by "
                f"n_head ({self.n_head})"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"GPTConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.init_std > 0:
            raise ValueError(f"GPTConfig.init_std must be > 0, got {self.init_std!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def presets(cls) -> tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in _PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; valid: {', '.join(_PRESETS)}")
        return replace(_PRESETS[name], **overrides)


_PRESETS = MappingProxyType(
    {
        # d_ff = 136 = 8 * 17: splits evenly into 8 or 17 slices, not into 16.
        "gpt-tiny": GPTConfig(),
        "gpt-tiny-tanh": GPTConfig(activation="gelu_tanh", tie_embeddings=True),
        "gpt-tiny-relu": GPTConfig(activation="relu", bias=False),
        "gpt-small-test": GPTConfig(
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


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return nn.ReLU()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, C)
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.act = _activation(config.activation)
        self.fc_out = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))  # (B, T, C) -> (B, T, F) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    """``GPT(config)(idx: (B, T) int) -> logits (B, T, vocab_size)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Small random weights *and* biases (std init_std); residual projections scaled
        down by sqrt(2 * n_layer) as in GPT-2. Uses the global RNG (seed with torch.manual_seed).
        """
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1.0
                if name.endswith(("attn.proj", "mlp.fc_out")):
                    scale = 1.0 / math.sqrt(2 * self.config.n_layer)
                nn.init.normal_(module.weight, 0.0, std * scale)
                if module.bias is not None:
                    nn.init.normal_(module.bias, 0.0, std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, 1.0, std)
                if module.bias is not None:
                    nn.init.normal_(module.bias, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _check_ids(idx, self.config.max_seq_len, "idx")
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.lm_head(self.ln_f(x))  # (B, T, V)
