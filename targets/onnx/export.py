"""``export_onnx(model, path, example_inputs=...)``: the entry point.

    report = export_onnx(model, "model.onnx", example_inputs=(ids,))   # ExportReport
    report = export_onnx(fp8_moe, "m.onnx", example_inputs={"input_ids": ids},
                         activations="none", dense_moe=False, external_data=None)

``torch.export`` (non-strict) capture, then the public ``torch.onnx.export`` of the program
with our FP8 translations (:mod:`.translations`), then the clean-up passes (:mod:`.cleanup`);
batch and sequence axes of every input are dynamic and named ``batch`` / ``sequence``; inputs
and outputs are named; metadata props carry the conversion config (:mod:`.io`);
``onnx.checker`` full check of the saved file.

Errors: bad arguments (opset too old for FP8, unknown activation mode, a path that cannot be
written) raise :class:`ExportInputError` before anything runs; a model the exporter cannot
handle raises :class:`OnnxExportError` naming the stage (and the node / op when known). The
file is written to a temporary folder beside ``path`` and moved into place only after the
checker passed: nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.onnx import ONNXProgram

from rewriter.errors import ExportInputError, OnnxExportError

from . import cleanup
from .io import (
    DIM_NAMES,
    Exported,
    default_output_names,
    example_tensors,
    flatten_outputs,
    fp8_modules,
    fp8_tables,
    metadata,
    widen,
)
from .moe import moe_blocks, moe_dispatch
from .translations import fp8_translation_table, translate

__all__ = [
    "DEFAULT_OPSET",
    "EXTERNAL_DATA_THRESHOLD",
    "FP8_MIN_OPSET",
    "MAX_OPSET",
    "MIN_OPSET",
    "ExportReport",
    "export_onnx",
]

DEFAULT_OPSET = 20  # models without FP8
FP8_MIN_OPSET = 21  # DequantizeLinear / QuantizeLinear with block_size, FLOAT8 in QDQ
MIN_OPSET = 18  # torchlib's own opset: the oldest the dynamo exporter writes
MAX_OPSET = 23
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights above which they go to a .data file


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote."""

    path: Path
    data_path: Path | None  # external-data file, when used
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    activations: str | None  # FP8 activation mode of the graph ("fp8", "none", None: no FP8)
    dense_moe: bool
    moe_blocks: int
    fp8_initializers: int  # FLOAT8E4M3FN initializers
    file_bytes: int  # .onnx plus external data
    metadata: Mapping[str, str]
    op_counts: Mapping[str, int] = field(repr=False)
    seconds: float = 0.0
    fused_moe_blocks: int = 0  # blocks exported as one com.microsoft.MoE node (fused_moe)
    unfused: tuple[str, ...] = ()  # "<module>: <reason>" of the blocks fused_moe left sparse

    def summary(self) -> str:
        """One paragraph: file, size, opset, names, MoE/FP8 form, the 12 commonest ops."""
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items(),
                                                     key=lambda kv: -kv[1])[:12])
        return (f"{self.path} ({self.file_bytes / 1e6:.2f} MB"
                + (f" with {self.data_path.name}" if self.data_path else "")
                + f"), opset {self.opset}, inputs {list(self.input_names)}, outputs "
                f"{list(self.output_names)}, MoE blocks {self.moe_blocks}"
                + (" (dense)" if self.dense_moe and self.moe_blocks else "")
                + (f" ({self.fused_moe_blocks} fused com.microsoft.MoE)"
                   if self.fused_moe_blocks else "")
                + (f", FP8 activations {self.activations!r}, {self.fp8_initializers} FP8 "
                   "initializers" if self.activations else "")
                + f", {self.seconds:.1f} s\n  ops: {ops}")


def _check_path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ExportInputError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ExportInputError(f"path {str(path)!r} names no file")
    if path.is_dir():
        raise ExportInputError(f"path {str(path)!r} is a directory, not a file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        why = "is not a folder" if parent.exists() else "does not exist"
        raise ExportInputError(f"cannot write {str(path)!r}: {str(parent)!r} {why}")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".rewriter-write-test-"):
            pass
    except OSError as e:
        raise ExportInputError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    if path.exists() and not os.access(path, os.W_OK):
        raise ExportInputError(f"cannot write {str(path)!r}: the file exists and is read-only")
    return path


def _check_opset(opset: Any, has_fp8: bool) -> int:
    if opset is None:
        return FP8_MIN_OPSET if has_fp8 else DEFAULT_OPSET
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise ExportInputError(f"opset must be an int, got {opset!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportInputError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}] (what the dynamo "
                               f"exporter writes), got {opset}")
    if has_fp8 and opset < FP8_MIN_OPSET:
        raise ExportInputError(
            f"opset {opset} is too old for FP8: the model has FP8 layers, which need opset >= "
            f"{FP8_MIN_OPSET} (DequantizeLinear/QuantizeLinear with block_size and "
            "FLOAT8E4M3FN); pass opset=21 or newer")
    return opset


def _check_names(given: Sequence[str] | None, count: int, what: str) -> list[str] | None:
    if given is None:
        return None
    if len(given) != count or len(set(given)) != len(given):
        raise ExportInputError(f"{what} must be {count} distinct names, got {list(given)}")
    return [str(n) for n in given]


def _mode(model: nn.Module) -> str | None:
    modes = {m.activations for m in fp8_modules(model)}
    if not modes:
        return None
    return modes.pop() if len(modes) == 1 else "mixed"


def _weights_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _capture(wrapper: Exported, args: tuple, dims: tuple, dense_moe: bool,
             fused_moe: bool = False):
    """(the exported program, ["<module>: <reason>" per block ``fused_moe`` left sparse])."""
    with moe_dispatch(wrapper.model, dense_moe, fused_moe) as kept, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(wrapper, args, dynamic_shapes={"args": dims},
                                       strict=False), list(kept)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OnnxExportError("capture", f"torch.export could not capture the model: "
                                  f"{type(e).__name__}: {reason}") from e


def _dim_mapping(model: ir.Model, dyn_axes: dict) -> dict[str, str]:
    mapping = {}
    for value in model.graph.inputs:
        axes = dyn_axes.get(value.name, {})
        for i, d in enumerate(value.shape or ()):
            if i in axes and isinstance(d, ir.SymbolicDim) and d.value:
                mapping.setdefault(d.value, axes[i])
    return mapping


def _fixed_axes(program: torch.export.ExportedProgram, names: Sequence[str],
                dyn_axes: Mapping[str, Mapping[int, str]]) -> dict[str, dict[int, int]]:
    """input name -> {axis: size} of the axes asked to be dynamic that the captured program
    specialised (the model's code made them constants)."""
    by_name = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    fixed: dict[str, dict[int, int]] = {}
    for name, spec in zip(names, program.graph_signature.user_inputs):
        val = by_name[spec].meta.get("val") if spec in by_name else None
        shape = getattr(val, "shape", None)
        if shape is None:
            continue
        axes = {a: int(shape[a]) for a in dyn_axes.get(name, {})
                if a < len(shape) and is_concrete_int(shape[a])}
        if axes:
            fixed[name] = axes
    return fixed


def _fix_input_dims(model: ir.Model, fixed: Mapping[str, Mapping[int, int]]) -> None:
    """Write the specialised sizes into the graph's input shapes (so onnxruntime and
    :func:`~rewriter.targets.onnx_runtime.run_onnx` refuse other sizes up front)."""
    for value in model.graph.inputs:
        axes = fixed.get(value.name)
        if axes and value.shape is not None:
            dims = [axes.get(i, d) for i, d in enumerate(value.shape)]
            value.shape = ir.Shape(dims)


def _symbolic_axes(model: ir.Model) -> dict[str, dict[int, str]]:
    """input name -> {axis: dim name} of the axes that stayed symbolic."""
    return {v.name: {i: d.value for i, d in enumerate(v.shape or ())
                     if isinstance(d, ir.SymbolicDim) and d.value}
            for v in model.graph.inputs}


def _save(program: ONNXProgram, path: Path, external_data: bool,
          check: bool) -> tuple[Path | None, int]:
    """Write into a temporary folder beside ``path``, check, then move into place."""
    parent = path.parent if str(path.parent) else Path(".")
    data_name = f"{path.name}.data"
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.tmp-"))
    try:
        tmp_path = tmp / path.name
        try:
            program.save(tmp_path, external_data=external_data)
        except Exception as e:
            raise OnnxExportError("save", f"{type(e).__name__}: {e}") from e
        written = sorted(p.name for p in tmp.iterdir())
        data = [n for n in written if n != path.name]
        if check:
            try:
                onnx.checker.check_model(str(tmp_path), full_check=True)
            except Exception as e:
                raise OnnxExportError("check", f"onnx.checker rejected the model: "
                                      f"{str(e).strip().splitlines()[0] if str(e) else e}") from e
        size = sum((tmp / n).stat().st_size for n in written)
        if data and data != [data_name]:
            raise OnnxExportError("save", f"unexpected files written: {data}")
        for n in data:
            os.replace(tmp / n, parent / n)
        os.replace(tmp_path, path)
        return (parent / data_name if data else None), size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# transformers' fused expert kernels (3-D expert weights of Mixtral, Qwen-MoE, DeepSeek, ...) that
# torch.export captures as a custom op with no ONNX translation -> the same experts as batched
# matmuls (transformers' own "batched_mm" path, exact), for the export only
_UNEXPORTABLE_EXPERTS = {"grouped_mm": "batched_mm"}


@contextlib.contextmanager
def _exportable_experts(model: nn.Module) -> Iterator[None]:
    """While exporting, every Hugging Face model inside ``model`` whose experts run an
    implementation with no ONNX form runs the exportable equivalent; restored after."""
    switched = []
    for m in model.modules():
        config = getattr(m, "config", None)
        current = getattr(config, "_experts_implementation", None)
        if current in _UNEXPORTABLE_EXPERTS and hasattr(m, "set_experts_implementation"):
            switched.append((m, current))
    try:
        for m, current in switched:
            m.set_experts_implementation(_UNEXPORTABLE_EXPERTS[current])
        yield
    finally:
        for m, current in reversed(switched):
            m.set_experts_implementation(current)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: Any,
    opset: int | None = None,
    activations: str | None = None,
    dense_moe: bool = False,
    fused_moe: bool = False,
    external_data: bool | None = None,
    check: bool = True,
    dynamic: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
    optimize: bool = True,
    node_metadata: bool = False,
) -> ExportReport:
    """Export ``model`` to ``path`` (see :mod:`rewriter.targets.onnx` for the graph's form).

    ``example_inputs``: a tensor, a tuple (positional) or a dict (keyword, HF style).
    ``opset``: default 20, or 21 when the model has FP8 layers (the minimum for them).
    ``activations``: FP8 activation mode in the graph: None (each layer's own), "fp8" (W8A8,
    1x128 QDQ in the graph) or "none" (W8A16). ``dense_moe``: every expert on every token
    (static shapes) instead of sparse routing. ``fused_moe``: each MoE block's routed experts as
    one node of onnxruntime's ``com.microsoft.MoE`` contrib op (fp32 blocks with SiLU/quick-GELU
    gated or relu/silu/gelu ungated experts; the others stay sparse and are named in the
    report's ``unfused``): a file only onnxruntime runs, its routed experts ~1.7x faster there
    (BENCHMARKS.md). ``external_data``: weights in
    ``<name>.data`` beside the file; None: only above 1 GiB of weights. ``check``: run
    ``onnx.checker`` (full check) on the saved file. ``dynamic``: batch and sequence axes
    symbolic. ``input_names``/``output_names``: override the names. ``config``: conversion
    config for the metadata (default: the model's ``rewriter_conversion``). ``optimize``:
    constant folding and clean-up. ``node_metadata``: keep the exporter's per-node debug
    metadata (stack traces, module paths; ~1 KB a node).

    Raises :class:`ExportInputError` (bad argument, before anything runs) or
    :class:`OnnxExportError` (stage "run", "capture", "translate", "optimize", "check",
    "save"); ``path`` is untouched on error.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ExportInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = _check_path(path)
    has_fp8 = bool(fp8_modules(model)) or bool(fp8_tables(model))
    opset = _check_opset(opset, has_fp8)
    table = fp8_translation_table(activations)
    for name, value in (("dense_moe", dense_moe), ("fused_moe", fused_moe), ("check", check),
                        ("dynamic", dynamic), ("optimize", optimize),
                        ("node_metadata", node_metadata)):
        if not isinstance(value, bool):
            raise ExportInputError(f"{name} must be a bool, got {value!r}")
    if dense_moe and fused_moe:
        raise ExportInputError("dense_moe and fused_moe are two forms of the MoE blocks: pass "
                               "one of them")
    if external_data is not None and not isinstance(external_data, bool):
        raise ExportInputError(f"external_data must be None or a bool, got {external_data!r}")
    names, tensors, as_kwargs = example_tensors(model, example_inputs)
    onnx_inputs = _check_names(input_names, len(tensors), "input_names") or list(names)
    graph_activations = activations if has_fp8 and activations else _mode(model)
    meta = metadata(model, config, activations=graph_activations, dense_moe=dense_moe,
                    opset=opset, fused_moe=fused_moe)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        try:
            with torch.no_grad():
                reference = flatten_outputs(
                    model(**dict(zip(names, tensors))) if as_kwargs else model(*tensors))
        except Exception as e:
            raise OnnxExportError("run", f"the model failed on example_inputs: "
                                  f"{type(e).__name__}: {e}") from e
        if not reference:
            raise OnnxExportError("run", "the model returned no tensor")
        onnx_outputs = (_check_names(output_names, len(reference), "output_names")
                        or default_output_names(model, reference))
        dyn_axes, dims_spec, args = {}, [], []
        for name, t in zip(onnx_inputs, tensors):
            axes = {i: DIM_NAMES[i] for i in range(min(t.dim(), 2))} if dynamic else {}
            dyn_axes[name] = axes
            # AUTO: a dim the model fixes (a feature dim) becomes static instead of failing
            dims_spec.append({i: torch.export.Dim.AUTO for i in axes} or None)
            args.append(widen(t, list(axes)).contiguous())  # no stride guards
        with _exportable_experts(model):
            program, unfused = _capture(Exported(model, names, as_kwargs), tuple(args),
                                        tuple(dims_spec), dense_moe, fused_moe)
        onnx_program = translate(program, table, opset, onnx_inputs, onnx_outputs)
    finally:
        for m, training in modes:
            m.training = training

    graph = onnx_program.model
    try:
        cleanup.optimize(graph, optimize)
        cleanup.InterfaceNames(onnx_inputs, onnx_outputs)(graph)  # forward's argument names
        if not node_metadata:
            cleanup.StripNodeMetadata()(graph)
        cleanup.RenameDims(_dim_mapping(graph, dyn_axes))(graph)
    except Exception as e:
        raise OnnxExportError("optimize", f"{type(e).__name__}: {e}") from e
    n_fp8 = cleanup.count_fp8_initializers(graph)
    training = any(getattr(m, "mode", None) == "training" for m in fp8_modules(model))
    if n_fp8 == 0 and ((has_fp8 and not training and fp8_modules(model)) or fp8_tables(model)):
        raise OnnxExportError("translate", "the FP8 weights did not survive: no FLOAT8E4M3FN "
                              "initializer in the graph (were they constant-folded to fp32?)")
    graph.producer_name = "rewriter"
    graph.metadata_props.update(meta)
    if external_data is None:
        external_data = _weights_bytes(model) > EXTERNAL_DATA_THRESHOLD
    fixed = _fixed_axes(program, onnx_inputs, dyn_axes)
    _fix_input_dims(graph, fixed)
    # token ids (B, T) and (B, T, C) features: the axes are batch and sequence, so one fixed
    # is news; a 2-D float input's axis 1 is usually its feature size, fixed as it should be
    fixed = {name: axes for name, axes in fixed.items()
             if not (tensors[onnx_inputs.index(name)].is_floating_point()
                     and tensors[onnx_inputs.index(name)].dim() < 3)}
    if fixed:
        warnings.warn(
            "the model's code fixed axes asked to be dynamic, so the ONNX graph accepts only "
            "the example's size there: " + "; ".join(
                f"{name} axis {a} = {size}" for name, axes in fixed.items()
                for a, size in axes.items())
            + " (torch.export specialised them: e.g. a Python list built from the length)",
            stacklevel=2)
    kept = _symbolic_axes(graph)
    data_path, size = _save(onnx_program, path, external_data, check)
    return ExportReport(
        path=path, data_path=data_path, opset=opset, input_names=tuple(onnx_inputs),
        output_names=tuple(onnx_outputs), dynamic_axes=kept,
        activations=graph_activations, dense_moe=dense_moe, moe_blocks=len(moe_blocks(model)),
        fused_moe_blocks=len(moe_blocks(model)) - len(unfused) if fused_moe else 0,
        unfused=tuple(unfused),
        fp8_initializers=n_fp8, file_bytes=size, metadata=meta,
        op_counts=cleanup.ir_op_counts(graph), seconds=time.perf_counter() - start)
