"""The model zoo the tests run over: every built-in preset and every HF family from config,
each with what the FFN matcher must find (written down independently of the matcher)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rewriter.models import hf

from rewriter import models

__all__ = ["Case", "CASES", "case_ids"]


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
