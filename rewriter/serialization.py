"""``rewriter.save`` / ``rewriter.load``: checkpoints of converted models.

    rewriter.save(model, "out/own")                  # lossless own format (default)
    back = rewriter.load("out/own")                  # bit-exact, no calibration, no pickle
    rewriter.save(model, "out/hf", format="hf")      # a standard Hugging Face MoE checkpoint
    # then, with no code of ours: AutoModelForCausalLM.from_pretrained("out/hf")

The own format (:mod:`rewriter.targets.checkpoint`) keeps everything: every config, per-block
top_k, gates, the bias-balancing state, FP8 training or inference mode, and what ``convert``
recorded (``rewriter.conversion_info(back)``). The "hf" format
(:mod:`rewriter.targets.hf_checkpoint`) writes the most faithful known architecture and
refuses, with the reason and the config change, what it cannot represent exactly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from rewriter.passes.ffn_to_moe import MoEConfig
from rewriter.passes.lower_fp8 import FP8Config, LoweringDecision
from rewriter.targets.checkpoint import read_checkpoint, write_checkpoint
from rewriter.targets.hf_checkpoint import write_hf_checkpoint

from .conversion import ConversionInfo, conversion_info
from .errors import CheckpointError
from .inspection import CONVERSION_ATTR
from .model_stats import ModelStats

__all__ = ["save", "load", "load_call", "FORMATS"]

FORMATS = ("rewriter", "hf")

# the dataclasses a manifest may name (decoding builds nothing else)
_CLASSES = {c.__name__: c for c in (ConversionInfo, MoEConfig, FP8Config, LoweringDecision,
                                    ModelStats)}


def _encode(value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and type(value).__name__ in _CLASSES:
        return {"__dataclass__": type(value).__name__,
                **{f.name: _encode(getattr(value, f.name), f"{where}.{f.name}")
                   for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v, f"{where}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # a tensor or array in a report: its values
        return value.tolist()
    raise CheckpointError(f"{where}: a {type(value).__name__} cannot be stored in JSON")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__dataclass__" in value:
        cls = _CLASSES.get(value["__dataclass__"])
        if cls is None:
            raise CheckpointError(f"metadata names an unknown class {value['__dataclass__']!r}")
        fields = {k: _decode(v) for k, v in value.items() if k != "__dataclass__"}
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"metadata: bad {cls.__name__} ({exc})") from exc
    return {k: _decode(v) for k, v in value.items()}


def save(model: nn.Module, directory: str | Path, *, format: str = "rewriter",
         tokenizer: Any = None, pad_to: int | None = None, max_shard_size: str = "5GB") -> Path:
    """Write ``model`` to ``directory`` and return the path. ``format``: "rewriter" (lossless,
    any converted model) or "hf" (a standard Hugging Face checkpoint: Glm4Moe / Qwen2-MoE /
    the source architecture; block-FP8 ``quantization_config`` for FP8 models; ``pad_to``
    pads expert widths with zero neurons, e.g. 128 for vLLM's block-FP8 MoE kernels; without
    it to a multiple of 8, the row alignment transformers' default CPU experts kernel needs).
    ``tokenizer``: saved beside the weights when given."""
    if format not in FORMATS:
        raise CheckpointError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    info = conversion_info(model)
    if format == "hf":
        path = write_hf_checkpoint(model, directory, pad_to=pad_to,
                                   max_shard_size=max_shard_size)
    else:
        if pad_to is not None:
            raise CheckpointError("pad_to applies to format='hf' (the own format stores the "
                                  "model as it is)")
        metadata = {"conversion": _encode(info, "conversion_info") if info is not None
                    else None}
        path = write_checkpoint(model, directory, metadata=metadata)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def load_call(path: str | Path, format: str) -> str:
    """The one line that loads a directory written by :func:`save` in ``format``:
    ``AutoModelForCausalLM.from_pretrained('DIR')`` (vanilla transformers) for "hf",
    ``rewriter.load('DIR')`` for the own format."""
    if format == "hf":
        return f"AutoModelForCausalLM.from_pretrained({str(path)!r})"
    return f"rewriter.load({str(path)!r})"


def load(directory: str | Path) -> nn.Module:
    """A model saved with ``save(model, directory)`` (own format), bit-exact. A Hugging Face
    checkpoint (``format="hf"``) loads with ``AutoModelForCausalLM.from_pretrained``."""
    model, metadata = read_checkpoint(directory)
    conversion = metadata.get("conversion") if isinstance(metadata, dict) else None
    if conversion is not None:
        setattr(model, CONVERSION_ATTR, _decode(conversion))
    return model
