"""The exported module's interface: input names and tensors, flat named outputs, the wrapper
handed to ``torch.export``, and the string metadata props written into the file."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rewriter.capture import normalize_inputs
from rewriter.errors import ExportInputError, InputError
from rewriter.jsonable import jsonable

from ..fp8_embedding import FP8Embedding
from ..fp8_linear import FP8Linear, FP8MoEFFN
from .moe import moe_blocks

__all__ = [
    "DIM_NAMES",
    "Exported",
    "default_output_names",
    "example_tensors",
    "flatten_outputs",
    "fp8_modules",
    "fp8_tables",
    "metadata",
    "widen",
]

DIM_NAMES = ("batch", "sequence")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _positional_names(model: nn.Module, count: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:count]]
    return names + [f"input_{i}" for i in range(len(names), count)]


def example_tensors(model: nn.Module, example_inputs: Any) -> tuple[list[str], list[Tensor],
                                                                    bool]:
    """example_inputs (tensor, tuple, dict) -> (names, tensors, as_kwargs); positional inputs
    take forward's parameter names. Raises :class:`ExportInputError` naming the bad input."""
    try:
        args, kwargs = normalize_inputs(example_inputs)
    except InputError as e:
        raise ExportInputError(str(e)) from e
    if kwargs:
        names, tensors = list(kwargs), list(kwargs.values())
    else:
        names, tensors = _positional_names(model, len(args)), list(args)
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise ExportInputError(f"example input {name!r} must be a tensor, got "
                                   f"{type(t).__name__}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ExportInputError(f"input name {name!r} is not a valid ONNX name")
    return names, tensors, bool(kwargs)


def flatten_outputs(out: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Model output -> [(name, tensor)]: tensors, tuples, dicts, HF ModelOutputs (None and
    non-tensor leaves are dropped)."""
    if isinstance(out, Tensor):
        return [(prefix or "output", out)]
    if isinstance(out, Mapping) or hasattr(out, "to_tuple") and hasattr(out, "keys"):
        flat = []
        for k in out.keys():
            if out[k] is not None:
                flat += flatten_outputs(out[k], f"{prefix}.{k}" if prefix else str(k))
        return flat
    if isinstance(out, (tuple, list)):
        flat = []
        for i, v in enumerate(out):
            if v is not None:
                flat += flatten_outputs(v, f"{prefix}_{i}" if prefix else f"output_{i}")
        return flat
    return []


def default_output_names(model: nn.Module, flat: list[tuple[str, Tensor]]) -> list[str]:
    """The flat names, or ["logits"] for one (..., vocab_size) output."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if len(flat) == 1 and flat[0][0] == "output" and isinstance(vocab, int) \
            and flat[0][1].shape[-1:] == (vocab,):
        return ["logits"]
    return [name for name, _ in flat]


class Exported(nn.Module):
    """The module handed to torch.export: positional inputs, flat tuple of tensor outputs."""

    def __init__(self, model: nn.Module, names: Sequence[str], as_kwargs: bool):
        super().__init__()
        self.model = model
        self._names, self._as_kwargs = tuple(names), as_kwargs

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        if self._as_kwargs:
            out = self.model(**dict(zip(self._names, args)))
        else:
            out = self.model(*args)
        return tuple(t for _, t in flatten_outputs(out))

    def __repr__(self) -> str:  # the exporter prints the model; keep it cheap and safe
        return f"Exported({type(self.model).__name__})"


def widen(t: Tensor, dims: Sequence[int]) -> Tensor:
    """Repeat size-1 dynamic dims to 2 so torch.export keeps them symbolic."""
    for d in dims:
        if t.shape[d] == 1:
            t = torch.cat([t, t], dim=d)
    return t


def fp8_modules(model: nn.Module) -> list[nn.Module]:
    """FP8 linears and FP8 MoE blocks of ``model``."""
    return [m for m in model.modules() if isinstance(m, (FP8Linear, FP8MoEFFN))]


def fp8_tables(model: nn.Module) -> int:
    """Number of FP8 embedding tables."""
    return sum(1 for m in model.modules() if isinstance(m, FP8Embedding))


def _conversion_meta(config: Mapping[str, Any]) -> dict[str, str]:
    if not isinstance(config, Mapping):
        raise ExportInputError(f"config must be a dict, got {type(config).__name__}")
    conf = jsonable(dict(config))
    meta = {"rewriter.conversion": json.dumps(conf, sort_keys=True)}
    moe, fp8 = conf.get("moe"), conf.get("fp8")
    if isinstance(moe, Mapping):
        for key in ("num_experts", "top_k", "shared_experts", "shared_width", "gate"):
            if moe.get(key) is not None:
                meta[f"rewriter.moe.{key}"] = str(moe[key])
    if isinstance(fp8, Mapping):
        meta["rewriter.fp8.recipe"] = (
            "deepseek-v3: E4M3, activations 1x128 tiles, weights 128x128 blocks, "
            "fp32 accumulation")
        for key, value in fp8.items():
            meta[f"rewriter.fp8.{key}"] = str(value)
    return meta


def metadata(model: nn.Module, config: Mapping[str, Any] | None, *, activations: str | None,
             dense_moe: bool, opset: int, fused_moe: bool = False) -> dict[str, str]:
    """String metadata props: the conversion config (``config`` or the model's duck-typed
    ``rewriter_conversion``), what the graph does, versions. Raises
    :class:`ExportInputError` when ``config`` is not a dict."""
    info = getattr(model, "rewriter_conversion", None)
    if config is None and info is not None:
        config = {"moe": getattr(info, "moe", None), "fp8": getattr(info, "fp8", None),
                  "modules": list(getattr(info, "modules", ()) or ())}
    meta = _conversion_meta(config) if config is not None else {}
    blocks = moe_blocks(model)
    if blocks:
        cfg = blocks[0].config
        meta.setdefault("rewriter.moe.num_experts", str(cfg.num_experts))
        meta.setdefault("rewriter.moe.top_k", str(cfg.top_k))
        meta["rewriter.moe.blocks"] = str(len(blocks))
        ks = [b.config.top_k for b in blocks]
        if len(set(ks)) > 1:  # MoEConfig(allocation="calibrated")
            meta["rewriter.moe.top_k_per_block"] = ",".join(map(str, ks))
        meta["rewriter.moe.expert_dim"] = str(cfg.expert_dim)
        meta["rewriter.moe.shared_dim"] = str(cfg.shared_dim)
        meta["rewriter.onnx.moe_dispatch"] = ("dense" if dense_moe else "fused com.microsoft.MoE"
                                              " where supported" if fused_moe else "sparse")
    if activations is not None:
        meta["rewriter.onnx.fp8_activations"] = activations
        meta["rewriter.onnx.fp8_pow2_scales"] = str(any(
            getattr(m, "pow2", False) for m in fp8_modules(model)))
        meta["rewriter.onnx.fp8_form"] = (
            "W8A8: weights FLOAT8E4M3FN + blocked DequantizeLinear, activations QDQ per 1x128"
            if activations == "fp8" else
            "W8A16: weights FLOAT8E4M3FN + blocked DequantizeLinear, activations unquantized")
    if fp8_tables(model):
        meta["rewriter.onnx.fp8_embeddings"] = (
            "tables FLOAT8E4M3FN with one fp32 scale per row; Cast -> Gather -> Mul; tied "
            "heads Gemm on the same table")
    meta["rewriter.onnx.opset"] = str(opset)
    meta["rewriter.torch_version"] = torch.__version__
    return meta
