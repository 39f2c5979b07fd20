"""The lossless checkpoint format of our own: any converted model, bit-exact, no pickle.

    write_checkpoint(model, "out/own", metadata={...})   # -> Path
    model, metadata = read_checkpoint("out/own")

A directory holds two files:

    rewriter.json       format/version, how to build the source model's skeleton (a
                        ``transformers`` class + its config, or one of our reference models +
                        its config dataclass), every swapped-in module in pre-order (MoEFFN,
                        FP8MoEFFN, FP8Linear, FP8Embedding, FP8TiedHead, Identity) with its
                        constructor arguments, tied tensors, requires_grad flags, train/eval
                        flags, the caller's metadata, the sha256 of the weights file
    model.safetensors   every parameter and buffer (persistent or not: rotary tables, the MoE
                        load of the last forward) once, in its own dtype (FP8 included)

Loading builds the skeleton with the user's RNG untouched, swaps the recorded modules in, then
*assigns* the stored tensors (no copy into the skeleton's dtype), re-ties aliases and checks
that the set of names matches exactly. Any mismatch raises :class:`CheckpointError` naming the
file and the tensor or field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from rewriter.models import GPT, Bert, BertConfig, GPTConfig, Llama, LlamaConfig
from rewriter.models.moe import MoEFFN, MoEFFNConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rewriter.errors import CheckpointError, MissingDependencyError, RewriterError

from .fp8_embedding import FP8Embedding, FP8TiedHead
from .fp8_linear import ActivationMemo, FP8Linear, FP8MoEFFN

__all__ = ["FORMAT", "VERSION", "MANIFEST", "WEIGHTS", "write_checkpoint", "read_checkpoint",
           "is_checkpoint", "dtype_name", "dtype_from_name", "transformers_module",
           "check_writable"]

FORMAT = "rewriter"
VERSION = 1
MANIFEST = "rewriter.json"
WEIGHTS = "model.safetensors"

_REFERENCE = {"GPT": (GPT, GPTConfig), "Llama": (Llama, LlamaConfig), "Bert": (Bert, BertConfig)}


# ----------------------------------------------------------------------------- helpers


def check_writable(path: str | os.PathLike, what: str, *,
                   error: type[RewriterError] = CheckpointError, create: bool = False) -> Path:
    """The one check of an output destination, run before anything is written: ``path`` is a
    ``"file"`` to write or a ``"directory"`` to create or write into. Refuses, with ``error``
    naming ``path``, a directory that exists as a non-directory, a file that exists as a
    directory or read-only, a path below an existing file, and a folder we may not write in.
    Creates nothing unless ``create`` (then the directory, or the file's folder, with its
    parents, once the check passed). Returns ``path`` as a :class:`Path`."""
    if what not in ("file", "directory"):
        raise ValueError(f"what must be 'file' or 'directory', got {what!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise error(f"the {what} to write must be a str or os.PathLike, got "
                    f"{type(path).__name__}")
    path = Path(path)

    def refuse(why: str) -> RewriterError:
        return error(f"cannot write the {what} {str(path)!r}: {why}")

    if what == "directory":
        if path.exists() and not path.is_dir():
            raise refuse("it exists and is not a directory")
        folder = path
    else:
        if path.is_dir():
            raise refuse("it is a directory, not a file")
        if path.exists() and not os.access(path, os.W_OK):
            raise refuse("the file exists and is read-only")
        folder = path.parent
    probe = folder
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent  # the nearest existing folder: the one the new ones go in
    if not probe.is_dir():
        raise refuse(f"{str(probe)!r} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".rewriter-write-test-"):
            pass
    except OSError as exc:
        raise refuse(exc.strerror or str(exc)) from None
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise refuse(exc.strerror or str(exc)) from None
    return path



def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, where: str = MANIFEST) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return dtype


def transformers_module(purpose: str):
    """``transformers`` (an optional dependency), or MissingDependencyError naming it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise MissingDependencyError(f"{purpose} needs the optional package 'transformers'; "
                                     "install it with: pip install 'rewriter[hf]'") from exc


def _is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(value: Any, where: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} is not JSON-serializable: {exc}") from exc
    return value


# ----------------------------------------------------------------------------- source


def _source_spec(model: nn.Module) -> dict[str, Any]:
    if _is_transformers_model(model):
        config = model.config
        spec = {"kind": "transformers", "class": type(model).__name__,
                "config_class": type(config).__name__,
                "config": _jsonable(config.to_dict(), "the model's config"),
                "attn_implementation": getattr(config, "_attn_implementation", None)}
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            spec["generation_config"] = _jsonable(gen.to_dict(), "generation_config")
        return spec
    for name, (model_cls, config_cls) in _REFERENCE.items():
        if type(model) is model_cls and isinstance(model.config, config_cls):
            return {"kind": "reference", "class": name,
                    "config": _jsonable(dataclasses.asdict(model.config), "the model's config")}
    if isinstance(model, torch.fx.GraphModule):
        raise CheckpointError("a GraphModule (convert(..., mode='graph')) has no model class to "
                              "rebuild without pickle: save the module-mode result "
                              "(convert(..., mode='module'), the default)")
    raise CheckpointError(f"cannot save a {type(model).__module__}.{type(model).__name__}: the "
                          "format rebuilds transformers models and rewriter.models reference "
                          "models only")


def _build_source(spec: dict[str, Any]) -> nn.Module:
    kind = spec.get("kind")
    if kind == "reference":
        if spec.get("class") not in _REFERENCE:
            raise CheckpointError(f"{MANIFEST}: source.class {spec.get('class')!r} is not a "
                                  f"reference model ({', '.join(_REFERENCE)})")
        model_cls, config_cls = _REFERENCE[spec["class"]]
        try:
            config = config_cls(**spec["config"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{MANIFEST}: source.config does not build a "
                                  f"{config_cls.__name__}: {exc}") from exc
        return model_cls(config)
    if kind == "transformers":
        transformers = transformers_module("loading a checkpoint of a transformers model")
        config_cls = getattr(transformers, str(spec.get("config_class")), None)
        model_cls = getattr(transformers, str(spec.get("class")), None)
        if config_cls is None or model_cls is None:
            raise CheckpointError(
                f"{MANIFEST}: transformers {transformers.__version__} has no "
                f"{spec.get('class')!r} / {spec.get('config_class')!r}")
        config = config_cls.from_dict(dict(spec["config"]))
        if spec.get("attn_implementation"):
            config._attn_implementation = spec["attn_implementation"]
        model = model_cls(config)
        if spec.get("generation_config") is not None and hasattr(model, "generation_config"):
            model.generation_config = transformers.GenerationConfig.from_dict(
                dict(spec["generation_config"]))
        return model
    raise CheckpointError(f"{MANIFEST}: unknown source.kind {kind!r}")


# ----------------------------------------------------------------------------- modules


def _module_spec(module: nn.Module, memos: dict[int, int]) -> dict[str, Any] | None:
    def memo_id(m):
        memo = getattr(m, "_activation_memo", None)
        return None if memo is None else memos.setdefault(id(memo), len(memos))

    if isinstance(module, MoEFFN):
        spec = {"type": "MoEFFN", "config": dataclasses.asdict(module.config),
                "dtype": dtype_name(module.compute_dtype), "has_load": bool(module._has_load)}
        if isinstance(module, FP8MoEFFN):
            spec.update(type="FP8MoEFFN", mode=module.mode, activations=module.activations,
                        pow2=bool(module.pow2), cache_dequantized=bool(module.cache_dequantized),
                        memo=memo_id(module))
        return spec
    if isinstance(module, FP8Linear):
        return {"type": "FP8Linear", "in_features": module.in_features,
                "out_features": module.out_features, "bias": module.bias is not None,
                "dtype": dtype_name(module.compute_dtype), "mode": module.mode,
                "activations": module.activations, "pow2": bool(module.pow2),
                "cache_dequantized": bool(module.cache_dequantized), "memo": memo_id(module)}
    if isinstance(module, FP8Embedding):
        return {"type": "FP8Embedding", "num_embeddings": module.num_embeddings,
                "embedding_dim": module.embedding_dim, "padding_idx": module.padding_idx,
                "pow2": bool(module.pow2), "dtype": dtype_name(module.compute_dtype)}
    if isinstance(module, FP8TiedHead):
        return {"type": "FP8TiedHead", "bias": module.bias is not None}
    if type(module) is nn.Identity:
        return {"type": "Identity"}
    return None


def _build_module(spec: dict[str, Any], fqn: str, model: nn.Module,
                  memos: dict[int, ActivationMemo]) -> nn.Module:
    kind = spec.get("type")
    where = f"{MANIFEST}: module {fqn!r}"
    try:
        memo = None if spec.get("memo") is None else memos.setdefault(int(spec["memo"]),
                                                                      ActivationMemo())
        if kind in ("MoEFFN", "FP8MoEFFN"):
            block = MoEFFN(**MoEFFNConfig(**spec["config"]).__dict__,
                           dtype=dtype_from_name(spec["dtype"], where))
            block._has_load = bool(spec.get("has_load", False))
            if kind == "MoEFFN":
                return block
            return FP8MoEFFN(block, mode=spec["mode"], activations=spec["activations"],
                             pow2=spec["pow2"], cache_dequantized=spec["cache_dequantized"],
                             activation_memo=memo)
        if kind == "FP8Linear":
            dtype = dtype_from_name(spec["dtype"], where)
            weight = torch.zeros(spec["out_features"], spec["in_features"], dtype=dtype)
            bias = torch.zeros(spec["out_features"], dtype=dtype) if spec["bias"] else None
            return FP8Linear(weight, bias, mode=spec["mode"], activations=spec["activations"],
                             pow2=spec["pow2"], cache_dequantized=spec["cache_dequantized"],
                             activation_memo=memo)
        if kind == "FP8Embedding":
            dtype = dtype_from_name(spec["dtype"], where)
            return FP8Embedding(torch.zeros(spec["num_embeddings"], spec["embedding_dim"],
                                            dtype=dtype),
                                padding_idx=spec["padding_idx"], pow2=spec["pow2"])
        if kind == "FP8TiedHead":
            table = next((m for m in model.modules() if isinstance(m, FP8Embedding)), None)
            if table is None:
                raise CheckpointError(f"{where}: an FP8TiedHead needs an FP8Embedding, and the "
                                      "checkpoint records none before it")
            bias = torch.zeros(table.num_embeddings) if spec["bias"] else None
            return FP8TiedHead(table, bias)  # its tensors are re-tied from the manifest
        if kind == "Identity":
            return nn.Identity()
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{where}: bad {kind} spec: {exc!r}") from exc
    raise CheckpointError(f"{where}: unknown module type {kind!r}")


# ----------------------------------------------------------------------------- tensors


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_parameter) of every parameter and buffer, duplicates included."""
    out = [(n, p, True) for n, p in model.named_parameters(remove_duplicate=False)]
    out += [(n, b, False) for n, b in model.named_buffers(remove_duplicate=False)]
    return out


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


# ----------------------------------------------------------------------------- API


def is_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def write_checkpoint(model: nn.Module, directory: str | Path, *,
                     metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` (created; files of ours in it are replaced)."""
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = check_writable(directory, "directory")  # before any work, nothing written
    source = _source_spec(model)
    memos: dict[int, int] = {}
    modules = []
    for fqn, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, MoEFFN) and module.activation_fn is not None:
            raise CheckpointError(
                f"module {fqn!r}: its experts run a captured activation (the dense FFN's own "
                "elementwise graph: no named activation matches it), which this format cannot "
                "rebuild without pickle; export the model to ONNX, or torch.save it")
        base = getattr(type(module), "_rewriter_base", None)  # passes/module_swap's rewrite
        if base is not None:
            raise CheckpointError(
                f"module {fqn or '<root>'!r} ({base.__name__}) holds its FFN inline in its own "
                "forward, which convert rewrote from a traced graph; this format rebuilds the "
                "source model's classes and cannot rebuild that forward without pickle. Export "
                "the model to ONNX, or keep the source model and convert it again (convert is "
                "deterministic for the same inputs)")
        spec = _module_spec(module, memos)
        if spec is not None:
            if fqn == "":
                raise CheckpointError(f"the model itself is a {type(module).__name__}: save the "
                                      "model that contains it")
            modules.append({"fqn": fqn, **spec})

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    frozen: list[str] = []
    by_id: dict[int, str] = {}
    storages: set[tuple[int, int]] = set()
    for name, t, is_param in _named_tensors(model):
        if id(t) in by_id:
            aliases[name] = by_id[id(t)]
            continue
        by_id[id(t)] = name
        if is_param and not t.requires_grad:
            frozen.append(name)
        data = t.detach()
        key = (data.untyped_storage().data_ptr(), data.device.index or 0)
        if key in storages or not data.is_contiguous() or data.device.type != "cpu":
            data = data.to("cpu").contiguous().clone()  # own storage: safetensors' rule
        storages.add(key)
        tensors[name] = data
    training = {fqn: m.training for fqn, m in model.named_modules()}
    root_training = model.training
    manifest = {
        "format": FORMAT, "version": VERSION, "source": source, "modules": modules,
        "aliases": aliases, "frozen": frozen, "training": root_training,
        "training_differs": sorted(f for f, t in training.items() if t != root_training),
        "metadata": _jsonable(metadata or {}, "metadata"),
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": FORMAT})
    manifest["sha256"] = {WEIGHTS: _sha256(directory / WEIGHTS)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}: not a rewriter checkpoint "
                              "(a Hugging Face checkpoint loads with "
                              "AutoModelForCausalLM.from_pretrained)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: field 'format' is not {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: field 'version' is {manifest.get('version')!r}; this "
                              f"rewriter reads version {VERSION}")
    for key in ("source", "modules", "aliases", "frozen", "sha256"):
        if key not in manifest:
            raise CheckpointError(f"{path}: field {key!r} is missing")
    return manifest


def read_checkpoint(directory: str | Path, *, verify: bool = True
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """(model, metadata) from ``directory``; ``verify`` checks the weights' sha256."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS}")
    if verify and _sha256(weights) != manifest["sha256"].get(WEIGHTS):
        raise CheckpointError(f"{weights}: sha256 differs from {MANIFEST}: the file was "
                              "changed or truncated after it was written")
    try:
        tensors = {k: v.clone() for k, v in load_file(str(weights)).items()}  # own, aligned
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {exc}") from exc

    with torch.random.fork_rng(devices=[]):  # skeleton init draws random numbers
        model = _build_source(manifest["source"])
        memos: dict[int, ActivationMemo] = {}
        for spec in manifest["modules"]:
            fqn = spec.get("fqn")
            try:
                model.get_submodule(fqn)
            except AttributeError as exc:
                raise CheckpointError(f"{MANIFEST}: module {fqn!r} does not exist in the "
                                      "rebuilt model") from exc
            model.set_submodule(fqn, _build_module(spec, fqn, model, memos))

    aliases, frozen = manifest["aliases"], set(manifest["frozen"])
    expected = {n for n, _, _ in _named_tensors(model)}
    stored = set(tensors) | set(aliases)
    if expected != stored:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise CheckpointError(f"{weights} does not match the rebuilt model: missing "
                              f"{missing[:5]}, unexpected {extra[:5]}")
    objects: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        owner, attr = _owner(model, name)
        if attr in owner._parameters:
            obj = nn.Parameter(tensor, requires_grad=name not in frozen
                               and (tensor.is_floating_point() or tensor.is_complex()))
            owner._parameters[attr] = obj
        else:
            obj = tensor
            owner._buffers[attr] = obj
        objects[name] = obj
    for name, target in aliases.items():
        if target not in objects:
            raise CheckpointError(f"{MANIFEST}: alias {name!r} -> {target!r}, which is not "
                                  f"stored in {WEIGHTS}")
        owner, attr = _owner(model, name)
        (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = \
            objects[target]
    model.train(bool(manifest.get("training", False)))
    for fqn in manifest.get("training_differs", []):
        m = model.get_submodule(fqn)
        m.training = not model.training
    for m in model.modules():  # tensors were assigned: drop caches built on the skeleton's
        if isinstance(m, (FP8Linear, FP8MoEFFN)):
            for cache in (m._dequant_cache, m._activation_memo):
                if cache is not None:
                    cache.clear()
    return model, manifest.get("metadata", {})
