"""Capture a model as one FX GraphModule: torch.export (non-strict) first, torch.fx as fallback.

The captured module keeps ``nn_module_stack`` metadata on its nodes (which module owns each op),
shares its parameters with the source model (nothing is copied or mutated) and carries a
:class:`CaptureInfo` in ``gm.meta["rewriter.capture"]``.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect as _pyinspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from .errors import CaptureError, InputError
from .graph_ops import drop_identity_views, slice_split_views

__all__ = [
    "CaptureInfo",
    "activation_quantization_bypassed",
    "activation_quantization_enabled",
    "buffers_kept",
    "quantizes_activations",
    "capture",
    "capture_info",
    "conform_inputs",
    "detached_inputs",
    "first_float_output",
    "is_token_logits",
    "kv_cache_off",
    "normalize_inputs",
    "outputs_close",
    "real_positions",
    "sequence_rows",
    "token_ids",
    "training_mode",
]

CAPTURE_META_KEY = "rewriter.capture"


@dataclass(frozen=True)
class CaptureInfo:
    """How a graph was captured; stored in ``gm.meta["rewriter.capture"]``."""

    method: str  # "torch.export" | "torch.fx.symbolic_trace"
    model_class: str
    input_names: tuple[str, ...]
    dynamic_dims: Mapping[str, tuple[int, ...]]  # input name -> dims left symbolic
    example_args: tuple[Any, ...] = field(repr=False)
    example_kwargs: Mapping[str, Any] = field(repr=False)
    export_error: str | None = None  # why torch.export failed when the fallback was used
    max_abs_error: float = 0.0  # captured graph vs eager model on the example inputs
    # "exact": compared as is; "activations bypassed": the model quantizes activations (W8A8),
    # a step function, so both sides ran with activation quantization bypassed
    check: str = "exact"
    quantized_max_abs_error: float | None = None  # W8A8 models: with quantization on (info)


def capture_info(gm: torch.fx.GraphModule) -> CaptureInfo | None:
    """The :class:`CaptureInfo` of a graph made by :func:`capture`, else None."""
    return getattr(gm, "meta", {}).get(CAPTURE_META_KEY)


# ----------------------------------------------------------------------------- inputs


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Tensor | tuple/list | dict -> (args, kwargs); every leaf must be a tensor (or None/bool)."""
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise InputError(
            "example_inputs must be a tensor, a tuple of tensors or a dict of tensors, "
            f"got {type(example_inputs).__name__}"
        )
    named = [(f"args[{i}]", a) for i, a in enumerate(args)] + list(kwargs.items())
    if not named:
        raise InputError("example_inputs is empty: give at least one input tensor")
    for name, value in named:
        if not isinstance(value, (torch.Tensor, type(None), bool, int, float)):
            raise InputError(
                f"example input {name} must be a tensor, got {type(value).__name__}"
            )
    return args, kwargs


def conform_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: Mapping[str, Any],
                   where: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Cast each tensor input to the dtype of the example input it stands for, when the cast
    keeps every value (a bool or 0./1. attention_mask where an int64 one was captured);
    InputError naming the input and both dtypes when it would not. A graph made by
    :func:`capture` is specialised to its example inputs' dtypes; an eager model is not."""
    info = capture_info(gm)
    if info is None:
        return tuple(args), dict(kwargs)

    def conform(name: str, value: Any, example: Any) -> Any:
        if not (isinstance(value, torch.Tensor) and isinstance(example, torch.Tensor)) \
                or value.dtype == example.dtype:
            return value
        cast = value.to(example.dtype)
        if not torch.equal(cast.to(value.dtype), value):
            raise InputError(
                f"{where}: input {name} is {value.dtype}, but the model was captured with "
                f"{example.dtype} there and the cast would change its values; give "
                f"{example.dtype} inputs")
        return cast

    args = tuple(conform(f"args[{i}]", a, info.example_args[i] if i < len(info.example_args)
                         else None) for i, a in enumerate(args))
    kwargs = {k: conform(k, v, info.example_kwargs.get(k)) for k, v in kwargs.items()}
    return args, kwargs


def sequence_rows(args: tuple, kwargs: Mapping) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """(args, kwargs) of a batch of B sequences -> B (args, kwargs) of one sequence each. B is
    the first dim of ``input_ids``, else of the first tensor that has one; every tensor with that
    first dim is sliced, other inputs are shared. No tensor with a dim: the batch as it is."""
    ids = kwargs.get("input_ids")
    first = ids if isinstance(ids, torch.Tensor) else next(
        (v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()), None)
    if first is None:
        return [(tuple(args), dict(kwargs))]
    n = first.shape[0]

    def take(v: Any, i: int) -> Any:
        return v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v

    return [(tuple(take(v, i) for v in args), {k: take(v, i) for k, v in kwargs.items()})
            for i in range(n)]


def detached_inputs(args: tuple, kwargs: Mapping) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Fresh contiguous copies of the input tensors, without storage history: torch.export
    guards on how an input was made (a view's ``_base``), so a graph exported from a slice
    ``ids[:2, :16]`` would reject every fresh tensor. What a graph accepts must depend only on
    the inputs' dtype and shapes."""

    def fresh(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        out = v.detach().clone(memory_format=torch.contiguous_format)
        return out.requires_grad_(v.requires_grad) if v.is_leaf else out

    return tuple(fresh(a) for a in args), {k: fresh(v) for k, v in kwargs.items()}


def _describe(args: tuple, kwargs: Mapping) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
        return repr(v)

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _input_names(model: nn.Module, args: tuple, kwargs: Mapping) -> tuple[str, ...]:
    try:
        params = [
            p.name
            for p in _pyinspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    names = [params[i] if i < len(params) else f"arg{i}" for i in range(len(args))]
    return tuple(names) + tuple(kwargs)


def _widen_unit_dims(value: Any, dims: Sequence[int]) -> Any:
    """Repeat size-1 batch/sequence dims to 2 so torch.export keeps them symbolic."""
    if not isinstance(value, torch.Tensor):
        return value
    for d in dims:
        if d < value.dim() and value.shape[d] == 1:
            value = torch.cat([value, value], dim=d)
    return value


# ----------------------------------------------------------------------------- HF helpers


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Run the body, then put back the value the buffers of ``model``'s train-mode modules had
    before it. A forward in train mode updates batch norm's running statistics in place;
    running the user's model to capture or trace it must not (a graph captured from it shares
    those buffers). Eval-mode modules' buffers are not copied: an FP8 inference model keeps its
    weights in buffers, and copying them would double its memory."""
    saved = [(b, b.detach().clone()) for m in model.modules() if m.training
             for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Temporarily set every module of ``model`` to train (``training=True``) or eval mode
    (dropout off, batch norm on its running statistics); restore each module's own flag
    afterwards, not the root's (a model may hold a frozen, eval-mode part while the rest
    trains)."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training


@contextlib.contextmanager
def kv_cache_off(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``config.use_cache = False`` (HF models) and restore it afterwards."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache"):
        yield
        return
    saved = config.use_cache
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = saved


def _first_lines(exc: BaseException, n: int = 4) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    out = "\n    ".join(lines[:n])
    return out + (" ..." if len(lines) > n else "")


# ----------------------------------------------------------------------------- comparison

# W8A8 models are step functions of their input: one ulp can move an activation across an FP8
# rounding boundary, so two runtimes of the same model (eager vs captured graph, torch vs
# onnxruntime) cannot be compared at fp32 tolerance. Inside ``activation_quantization_bypassed``
# the FP8 ops (rewriter.targets) multiply unquantized activations by the FP8 weights, on every
# path (eager modules and captured graphs alike); then the comparison is continuous again.
_ACTIVATION_QUANTIZATION = contextvars.ContextVar("rewriter_activation_quantization",
                                                  default=True)


def activation_quantization_enabled() -> bool:
    """False inside :func:`activation_quantization_bypassed` (read by the FP8 ops)."""
    return _ACTIVATION_QUANTIZATION.get()


@contextlib.contextmanager
def activation_quantization_bypassed() -> Iterator[None]:
    """Run FP8 (W8A8) modules and ops with their activation quantization bypassed: weights
    stay FP8, activations stay in their precision. For checks that compare two runtimes."""
    token = _ACTIVATION_QUANTIZATION.set(False)
    try:
        yield
    finally:
        _ACTIVATION_QUANTIZATION.reset(token)


def quantizes_activations(model: nn.Module) -> bool:
    """True when some submodule quantizes its activations (``activations == "fp8"``, the
    attribute of rewriter.targets' FP8 modules): the model is then a step function."""
    return any(getattr(m, "activations", None) == "fp8" for m in model.modules())



def first_float_output(output: Any) -> torch.Tensor | None:
    """The first floating tensor leaf of a model output (the logits of an LM or HF output),
    or None."""
    return next((leaf for leaf in pytree.tree_leaves(output)
                 if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()), None)


def token_ids(args: tuple, kwargs: Mapping) -> torch.Tensor | None:
    """A batch's token ids: ``input_ids``, else the first positional integer tensor."""
    ids = kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return ids
    return next((a for a in args if isinstance(a, torch.Tensor) and not a.is_floating_point()
                 and not a.is_complex() and a.dtype != torch.bool), None)


def is_token_logits(y: torch.Tensor, ids: torch.Tensor | None) -> bool:
    """True when ``y`` (B, T, V) reads as language-model logits over ``ids`` (B, T): the same
    batch and length, and every id a valid index into the last dim."""
    return (isinstance(ids, torch.Tensor) and y.dim() == 3 and ids.dim() == 2
            and tuple(y.shape[:2]) == tuple(ids.shape)
            and int(ids.max()) < y.shape[-1])


def real_positions(attention_mask: Any, y: torch.Tensor) -> torch.Tensor | None:
    """``attention_mask`` (B, T) as a bool mask broadcastable to ``y`` (B, T, ...): True at
    real positions; None when there is no mask of y's first two dims."""
    if not isinstance(attention_mask, torch.Tensor) or y.dim() < 2 or \
            tuple(attention_mask.shape) != tuple(y.shape[:2]):
        return None
    return (attention_mask != 0).reshape(*attention_mask.shape, *([1] * (y.dim() - 2)))


def outputs_close(reference: Any, actual: Any) -> float:
    """Max absolute difference over the tensor leaves of two outputs (inf if structures differ)."""
    ref_leaves = [x for x in pytree.tree_leaves(reference) if isinstance(x, torch.Tensor)]
    act_leaves = [x for x in pytree.tree_leaves(actual) if isinstance(x, torch.Tensor)]
    if len(ref_leaves) != len(act_leaves):
        return float("inf")
    worst = 0.0
    for r, a in zip(ref_leaves, act_leaves):
        if r.shape != a.shape:
            return float("inf")
        if r.numel():
            worst = max(worst, (r.double() - a.double()).abs().max().item())
    return worst


def _tolerance(reference: Any) -> float:
    leaves = [x for x in pytree.tree_leaves(reference) if isinstance(x, torch.Tensor)]
    scale = max((x.double().abs().max().item() for x in leaves if x.numel()), default=1.0)
    eps = max((torch.finfo(x.dtype).eps for x in leaves if x.is_floating_point()), default=1e-7)
    return 64 * eps * max(scale, 1.0)


# ----------------------------------------------------------------------------- front ends


def _export(model, args, kwargs, dynamic: bool) -> torch.fx.GraphModule:
    if dynamic:
        def dims_for(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() >= 1:
                return {d: Dim.AUTO for d in range(min(v.dim(), 2))}
            return None

        args = tuple(_widen_unit_dims(a, (0, 1)) for a in args)
        kwargs = {k: _widen_unit_dims(v, (0, 1)) for k, v in kwargs.items()}
        dynamic_shapes: Any = _bound_spec(model, args, kwargs, dims_for)
    else:
        dynamic_shapes = None
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    return ep.module()


def _bound_spec(model: nn.Module, args: tuple, kwargs: Mapping, dims_for) -> Any:
    """torch.export's dynamic_shapes for ``model(*args, **kwargs)``, keyed as the inputs bind
    to ``forward``'s signature: a ``*args`` parameter takes a tuple of specs, a ``**kwargs``
    one a dict (a wrapper's ``forward(self, *args, **kwargs)``)."""
    try:
        bound = _pyinspect.signature(model.forward).bind(*args, **kwargs).arguments
        params = _pyinspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to bind to: positions, then names
        if not kwargs:
            return tuple(dims_for(a) for a in args)
        names = _input_names(model, args, {})
        return {**{n: dims_for(a) for n, a in zip(names, args)},
                **{k: dims_for(v) for k, v in kwargs.items()}}
    if not kwargs and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return tuple(dims_for(a) for a in args)  # no names needed
    spec = {}
    for name, value in bound.items():
        kind = params[name].kind
        if kind is _pyinspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(dims_for(v) for v in value)
        elif kind is _pyinspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: dims_for(v) for k, v in value.items()}
        else:
            spec[name] = dims_for(value)
    return spec


class _NoLeafTracer(torch.fx.Tracer):
    """Trace through every submodule so linears appear as F.linear on get_attr weights."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False


def _symbolic_trace(model: nn.Module, args: tuple, kwargs: Mapping) -> torch.fx.GraphModule:
    names = _input_names(model, args, {})
    concrete = {
        name: p.default
        for name, p in _pyinspect.signature(model.forward).parameters.items()
        if name not in names and name not in kwargs and p.default is not p.empty
    }
    graph = _NoLeafTracer().trace(model, concrete_args=concrete or None)
    gm = torch.fx.GraphModule(model, graph, model.__class__.__name__)
    # the traced forward takes its inputs in the signature's order, whatever the dict order
    given = dict(zip(names, args)) | dict(kwargs)
    ordered = [given[n.target] for n in gm.graph.find_nodes(op="placeholder")
               if n.target in given]
    with torch.no_grad():
        ShapeProp(gm).propagate(*ordered)
    return gm


def _dynamic_dims(gm: torch.fx.GraphModule) -> dict[str, tuple[int, ...]]:
    dims: dict[str, tuple[int, ...]] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            # a SymInt the trace specialised (the model's code fixed that size) is static
            sym = tuple(i for i, s in enumerate(val.shape) if not is_concrete_int(s))
            if sym:
                dims[node.name] = sym
    return dims


# ----------------------------------------------------------------------------- public API


def capture(
    model: nn.Module, example_inputs: Any, *, dynamic: bool = True
) -> torch.fx.GraphModule:
    """Capture ``model`` as one FX GraphModule.

    ``example_inputs``: a tensor, a tuple of positional tensors, or a dict of keyword tensors
    (HF style: ``{"input_ids": ids}``). With ``dynamic=True`` the first two dims of every input
    (batch, sequence) stay symbolic where the model allows it. The model is run once eagerly on
    the inputs (a wrong shape or dtype is reported as :class:`InputError` before anything else),
    captured with ``torch.export`` (non-strict; HF KV cache off), falling back to
    ``torch.fx.symbolic_trace``, and the result is checked against the eager output.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    cls = type(model).__name__

    stepwise = quantizes_activations(model)
    with kv_cache_off(model), buffers_kept(model), torch.no_grad():
        try:
            reference = model(*args, **kwargs)
        except Exception as exc:  # the user's model rejected the inputs: say which and why
            raise InputError(
                f"{cls} cannot run on the example inputs {_describe(args, kwargs)}: "
                f"{_first_lines(exc, 2)}"
            ) from exc

        export_error: str | None = None
        fresh_args, fresh_kwargs = detached_inputs(args, kwargs)
        try:
            gm = _export(model, fresh_args, fresh_kwargs, dynamic)
            method = "torch.export"
        except Exception as exc:
            export_error = _first_lines(exc)
            try:
                gm = _symbolic_trace(model, fresh_args, fresh_kwargs)
                method = "torch.fx.symbolic_trace"
            except Exception as fx_exc:
                raise CaptureError(
                    f"cannot capture {cls} as one graph.\n"
                    f"  torch.export (non-strict) failed: {export_error}\n"
                    f"  torch.fx.symbolic_trace failed: {_first_lines(fx_exc)}\n"
                    "  hint: data-dependent Python control flow (if/for on tensor values) "
                    "cannot be captured; rewrite it with torch.where / torch.cond."
                ) from exc

        slice_split_views(gm)  # canonical spellings the matcher reads; same values
        drop_identity_views(gm)
        actual = gm(*args, **kwargs)
        quantized_error = None
        if stepwise:  # compare the continuous part; the quantized difference is information
            quantized_error = outputs_close(reference, actual)
            with activation_quantization_bypassed():
                reference = model(*args, **kwargs)
                actual = gm(*args, **kwargs)
    error = outputs_close(reference, actual)
    if not model.training and error > _tolerance(reference):
        raise CaptureError(
            f"captured graph of {cls} ({method}) differs from the eager model on the example "
            f"inputs: max abs error {error:.3g}"
            + (" (activation quantization bypassed on both sides)" if stepwise else "")
        )
    gm.meta[CAPTURE_META_KEY] = CaptureInfo(
        method=method,
        model_class=cls,
        input_names=_input_names(model, args, kwargs),
        dynamic_dims=_dynamic_dims(gm),
        example_args=args,
        example_kwargs=dict(kwargs),
        export_error=export_error,
        max_abs_error=error,
        check="activations bypassed" if stepwise else "exact",
        quantized_max_abs_error=quantized_error,
    )
    return gm
