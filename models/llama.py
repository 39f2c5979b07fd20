"""LLaMA-style decoder (gpt-fast shape): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Module names (what a pass sees in ``nn_module_stack``)::

    tok_embeddings
    layers[i].attention_norm, layers[i].attention.wq / wk / wv / wo
    layers[i].ffn_norm, layers[i].feed_forward.w1 (gate) / w3 (up) / w2 (down)
    norm, output

The FFN is ``w2(silu(w1(x)) * w3(x))`` with ``w1, w3: d_model -> d_ff`` and
``w2: d_ff -> d_model``, no biases. RoPE uses the rotate-half convention of HF
``LlamaForCausalLM`` so weights can be compared one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Llama", "LlamaConfig", "RMSNorm", "Attention", "FeedForward", "TransformerBlock"]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    d_model: int = 64
    d_ff: int = 172
    max_seq_len: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False  # output.weight is tok_embeddings.weight
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len"
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"LlamaConfig.d_model ({self.d_model}) must be divisible by "
                f"n_head ({self.n_head})"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"LlamaConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"LlamaConfig.d_model / n_head = {self.head_dim} must be even for RoPE"
            )
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LlamaConfig.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def presets(cls) -> tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides) -> LlamaConfig:
        if name not in _PRESETS:
            raise ValueError(f"unknown LLaMA preset {name!r}; valid: {', '.join(_PRESETS)}")
        return replace(_PRESETS[name], **overrides)


_PRESETS = MappingProxyType(
    {
        # d_ff = 172 = 4 * 43: splits evenly into 4 slices, unevenly into most others.
        "llama-tiny": LlamaConfig(),
        "llama-tiny-tied": LlamaConfig(n_layer=3, tie_embeddings=True),
        "llama-small-test": LlamaConfig(
            vocab_size=512, n_layer=4, n_head=8, n_kv_head=2, d_model=128, d_ff=344,
            max_seq_len=128,
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


def _rope_cache(config: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    hd = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
    )  # (hd/2,)
    t = torch.arange(config.max_seq_len, dtype=torch.int64).float()  # (S,)
    freqs = torch.outer(t, inv_freq)  # (S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (..., hd/2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos, sin: (T, hd)."""
    return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # (B, T, C)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        kv_dim = config.n_kv_head * config.head_dim
        self.wq = nn.Linear(config.d_model, config.d_model, bias=False)
        self.wk = nn.Linear(config.d_model, kv_dim, bias=False)
        self.wv = nn.Linear(config.d_model, kv_dim, bias=False)
        self.wo = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, C)
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_head // self.n_kv_head
        k = k.repeat_interleave(rep, dim=1)  # (B, H, T, hd)
        v = v.repeat_interleave(rep, dim=1)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.d_ff, bias=False)  # gate
        self.w3 = nn.Linear(config.d_model, config.d_ff, bias=False)  # up
        self.w2 = nn.Linear(config.d_ff, config.d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, C) -> (B, T, F) -> (B, T, C)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)  # (B, T, C)
        return x + self.feed_forward(self.ffn_norm(x))  # (B, T, C)


class Llama(nn.Module):
    """``Llama(config)(idx: (B, T) int) -> logits (B, T, vocab_size)``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = _rope_cache(config)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, hd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Small random weights (std init_std), RMSNorm gains near 1. Uses the global RNG."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.normal_(module.weight, 1.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _check_ids(idx, self.config.max_seq_len, "idx")
        T = idx.shape[1]
        cos = self.rope_cos[:T]  # (T, hd)
        sin = self.rope_sin[:T]  # (T, hd)
        x = self.tok_embeddings(idx)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, cos, sin)  # (B, T, C)
        return self.output(self.norm(x))  # (B, T, V)
