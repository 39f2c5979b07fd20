"""The model zoo the tests run over: every built-in preset and every HF family from config,
each with what the FFN matcher must find (written down independently of the matcher)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from rewriter.models import hf
from torch import nn

from rewriter import models

__all__ = ["Case", "CASES", "case_ids", "Form", "FORMS", "form_inputs"]


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Any]
    inputs: Callable[..., Any]  # (model, batch, seq, seed) -> example inputs
    kind: str
    activation: str
    bias: bool
    layout: str
    ffn_weights: str  # regex every FFN weight FQN matches (and nothing else does)

    def expected_sizes(self, model) -> tuple[int, int, int]:
        c = model.config
        layers = getattr(c, "n_layer", None) or c.num_hidden_layers
        d = getattr(c, "d_model", None) or getattr(c, "hidden_size", None) or c.n_embd
        d_ff = getattr(c, "d_ff", None) or getattr(c, "intermediate_size", None) or c.n_inner
        return layers, d, d_ff


def _builtin(name: str) -> Case:
    config_cls = {"gpt": models.GPTConfig, "llama": models.LlamaConfig,
                  "bert": models.BertConfig}[name.split("-")[0]]
    config = config_cls.preset(name)
    family = name.split("-")[0]
    if family == "gpt":
        kind, act, bias, weights = "mlp", config.activation, config.bias, r"\.mlp\.fc_(in|out)\."
    elif family == "llama":
        kind, act, bias, weights = "glu", "silu", False, r"\.feed_forward\.w[123]\."
    else:
        kind, act, bias, weights = "mlp", "gelu", True, r"\.ffn\.fc_(in|out)\."
    return Case(name, lambda: models.build_model(name, seed=1),
                lambda m, b, t, seed=0: models.example_inputs(m, b, t, seed=seed),
                kind, act, bias, "linear", weights)


_HF = {
    "llama": ("glu", "silu", False, "linear", r"\.mlp\.(gate|up|down)_proj\."),
    "mistral": ("glu", "silu", False, "linear", r"\.mlp\.(gate|up|down)_proj\."),
    "qwen2": ("glu", "silu", False, "linear", r"\.mlp\.(gate|up|down)_proj\."),
    "phi3": ("glu_fused", "silu", False, "linear", r"\.mlp\.(gate_up|down)_proj\."),
    "gpt2": ("mlp", "gelu_tanh", True, "conv1d", r"\.mlp\.c_(fc|proj)\."),
    "bert": ("mlp", "gelu", True, "linear", r"(intermediate\.dense|\d\.output\.dense)\."),
}


def _hf(family: str) -> Case:
    kind, act, bias, layout, weights = _HF[family]
    return Case(f"hf:{family}", lambda: hf.build_hf(family, seed=1),
                lambda m, b, t, seed=0: hf.hf_example_inputs(m, b, t, seed=seed),
                kind, act, bias, layout, weights)


CASES: tuple[Case, ...] = tuple(
    [_builtin(n) for n in models.list_models()] + [_hf(f) for f in hf.HF_FAMILIES]
)


def case_ids() -> list[str]:
    return [c.name for c in CASES]


def ffn_weight_names(case: Case, model) -> set[str]:
    return {n for n, p in model.named_parameters()
            if re.search(case.ffn_weights, n) and n.endswith("weight")}


# ----------------------------------------------------------------------------- FFN forms
# Hand-written FFNs in the forms module mode and the matcher must handle however the Python is
# organised: inline in a larger forward, on raw parameters, two in one module, the model's whole
# forward, projections spelled as matmuls. Each: (name, build(dtype), input shape, FFN count,
# kind, activation).



class TLinear(nn.Linear):
    """A linear layer written as ``x @ W.T + b``."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class InlineLayer(nn.Module):
    """Attention + an FFN whose fc1 / gelu / fc2 run in the layer's own forward."""

    def __init__(self, d=24, f=60):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class RawParamGLU(nn.Module):
    """SwiGLU on raw parameters with F.linear, inside a residual layer."""

    def __init__(self, d=24, f=36):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.w_gate = nn.Parameter(torch.randn(f, d) / 5)
        self.w_up = nn.Parameter(torch.randn(f, d) / 5)
        self.w_down = nn.Parameter(torch.randn(d, f) / 6)

    def forward(self, x):
        h = self.norm(x)
        return x + F.linear(F.silu(F.linear(h, self.w_gate)) * F.linear(h, self.w_up), self.w_down)


class TwoBranches(nn.Module):
    """Two FFN branches of one module reading the same input (relu MLP + gelu_tanh MLP)."""

    def __init__(self, d=24, f=44):
        super().__init__()
        self.a1, self.a2 = nn.Linear(d, f), nn.Linear(f, d)
        self.b1, self.b2 = nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        a = self.a2(torch.relu(self.a1(x)))
        b = self.b2(F.gelu(self.b1(x), approximate="tanh"))
        return x + a - 0.5 * b


class WholeForward(nn.Module):
    """The FFN is the model's whole forward."""

    def __init__(self, d=24, f=52):
        super().__init__()
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


class MatmulSpellings(nn.Module):
    """Three FFNs whose projections are matmuls against (transposed) parameters: ``@ W.T``,
    einsum with W (in, out), bmm against a broadcast W^T; attention is ``q @ k^T``."""

    def __init__(self, d=24, f=40):
        super().__init__()
        self.qkv, self.up, self.down = TLinear(d, 3 * d, bias=False), TLinear(d, f), TLinear(f, d)
        self.w_in = nn.Parameter(torch.randn(d, f) / 5)  # (in, out)
        self.w_out = nn.Parameter(torch.randn(f, d) / 6)
        self.g, self.u = nn.Parameter(torch.randn(f, d) / 5), nn.Parameter(torch.randn(f, d) / 5)
        self.o = nn.Parameter(torch.randn(d, f) / 6)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        x = x + torch.softmax(q @ k.transpose(-1, -2) / 5.0, -1) @ v
        x = x + self.down(F.gelu(self.up(x)))
        x = x + torch.einsum("btf,fd->btd", torch.relu(torch.einsum("btd,df->btf", x, self.w_in)),
                             self.w_out)
        b = x.shape[0]
        g = torch.bmm(x, self.g.t().unsqueeze(0).expand(b, -1, -1))
        u = torch.matmul(x, self.u.transpose(0, 1))
        return x + torch.bmm(F.silu(g) * u, self.o.permute(1, 0).unsqueeze(0).expand(b, -1, -1))


class FirstCalled(nn.Module):
    """The FFN module is the first module the model calls (torch.export's _guards_fn node
    carries its stack)."""

    def __init__(self, d=24, f=52, vocab=31):
        super().__init__()
        self.mlp = WholeForward(d, f)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(x + self.mlp(x))


class DtypeBranchLayer(nn.Module):
    """An FFN in a layer's own forward that branches on a tensor's dtype (BART's fp16 clamp),
    makes a tensor while it runs (``torch.tensor``) and has a dropout module inside the block
    (XLNet, Funnel)."""

    def __init__(self, d=24, f=40):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = x + self.fc2(self.drop(F.gelu(self.fc1(self.norm(x)))))
        if h.dtype == torch.float16 and not torch.isfinite(h).all():
            h = torch.clamp(h, -1000.0, 1000.0)
        return h * torch.tensor(0.75, dtype=h.dtype)


class LoopedLayer(nn.Module):
    """One FFN module applied twice per layer (a looped / recurrent block, HRM-style)."""

    def __init__(self, d=24, f=36):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = WholeForward(d, f)

    def forward(self, x):
        for _ in range(2):
            x = x + self.mlp(self.norm(x))
        return x


class ViewSplitGLU(nn.Module):
    """Fused gate/up split by a reshape and an index (Moshi): h.view(b, t, 2, -1)[..., 0, :]."""

    def __init__(self, d=24, f=40):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = self.fc1(x)
        b, t, _ = h.shape
        h = h.view(b, t, 2, -1)
        return x + self.fc2(F.silu(h[..., 0, :]) * h[..., 1, :])


class Stack(nn.Module):
    def __init__(self, layer, n=2, d=24, vocab=37):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(layer() for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@dataclass(frozen=True)
class Form:
    name: str
    build: Callable[[], Any]
    ids: bool  # input is token ids (B, T) rather than features (B, T, 24)
    count: int
    kinds: tuple[tuple[str, str], ...]  # (kind, activation) of each FFN, graph order


FORMS: tuple[Form, ...] = (
    Form("inline", lambda: Stack(InlineLayer), True, 2, (("mlp", "gelu"),) * 2),
    Form("raw-params", lambda: Stack(RawParamGLU), True, 2, (("glu", "silu"),) * 2),
    Form("two-branches", lambda: nn.Sequential(TwoBranches(), TwoBranches()), False, 4,
         (("mlp", "relu"), ("mlp", "gelu_tanh")) * 2),
    Form("whole-forward", WholeForward, False, 1, (("mlp", "silu"),)),
    Form("first-called", FirstCalled, False, 1, (("mlp", "silu"),)),
    Form("matmul-spellings", MatmulSpellings, False, 3,
         (("mlp", "gelu"), ("mlp", "relu"), ("glu", "silu"))),
    Form("dtype-branch", lambda: Stack(DtypeBranchLayer), True, 2, (("mlp", "gelu"),) * 2),
    Form("looped", lambda: Stack(LoopedLayer), True, 2, (("mlp", "silu"),) * 4),
    Form("view-split", lambda: nn.Sequential(ViewSplitGLU(), ViewSplitGLU()), False, 2,
         (("glu_fused", "silu"),) * 2),
)


def form_inputs(form: Form, b: int, t: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if form.ids:
        return torch.randint(0, 31, (b, t), generator=g)
    return torch.randn(b, t, 24, generator=g).to(dtype)
