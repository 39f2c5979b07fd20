"""ExportedProgram -> ONNX through the public ``torch.onnx.export(program, dynamo=True,
custom_translation_table=...)``, with our translations of the ``rewriter::`` ops.

A failure names the node and op when it can: an op of a namespace torchlib does not cover and
that has no custom translation is found in the program itself (no parsing of the exporter's
messages); otherwise the innermost reason of the exporter's error is kept.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
from torch.export import ExportedProgram
from torch.onnx import ONNXProgram

from rewriter.errors import ExportInputError, OnnxExportError

from .. import fp8_ops  # noqa: F401  (registers torch.ops.rewriter.*)
from ..fp8_linear import ACTIVATION_MODES
from . import fp8 as onnx_fp8

__all__ = ["TORCHLIB_NAMESPACES", "fp8_translation_table", "translate", "untranslated_ops"]

_ops = torch.ops.rewriter
# op namespaces the exporter translates by itself (torchlib and torch.onnx.ops)
TORCHLIB_NAMESPACES = frozenset({"aten", "prims", "onnx", "onnx_symbolic",
                                 "quantized_decomposed", "torchvision"})


def fp8_translation_table(activations: str | None = None) -> dict:
    """torch op -> onnxscript translation function for every ``rewriter::`` FP8 op.

    ``activations=None`` keeps each op's own mode; ``"fp8"`` exports every FP8 linear as W8A8
    (activations QDQ'd per 1x128 in the graph), ``"none"`` as W8A16 (weight-only).
    Raises :class:`ExportInputError` on another value."""
    if activations not in (None, *ACTIVATION_MODES):
        raise ExportInputError(
            f"activations must be one of None, {', '.join(map(repr, ACTIVATION_MODES))}, "
            f"got {activations!r}")
    linear = onnx_fp8.fp8_linear_weight_only if activations == "none" else onnx_fp8.fp8_linear
    weight_only = (onnx_fp8.fp8_weight_only_as_w8a8 if activations == "fp8"
                   else onnx_fp8.fp8_weight_only_linear)
    return {
        _ops.fp8_linear.default: linear,
        _ops.fp8_weight_only_linear.default: weight_only,
        _ops.fp8_linear_hp.default: onnx_fp8.fp8_linear_hp,
        _ops.fp8_quantize_rowwise.default: onnx_fp8.fp8_quantize_rowwise,
        _ops.fp8_quantize_blockwise.default: onnx_fp8.fp8_quantize_blockwise,
        _ops.fp8_gemm.default: onnx_fp8.fp8_gemm,
        _ops.fp8_embedding.default: onnx_fp8.fp8_embedding,
        _ops.fp8_embedding_linear.default: onnx_fp8.fp8_embedding_linear,
    }


def untranslated_ops(program: ExportedProgram, table: dict) -> list[tuple[str, str]]:
    """[(node name, op)] of the program's calls to ops outside :data:`TORCHLIB_NAMESPACES`
    that ``table`` does not translate (custom ops the exporter cannot handle)."""
    found = []
    for node in program.graph.nodes:
        namespace = getattr(node.target, "namespace", None)  # OpOverloads have one
        if node.op != "call_function" or namespace is None:
            continue
        if namespace not in TORCHLIB_NAMESPACES and node.target not in table:
            found.append((node.name, str(node.target)))  # "ns.op.overload"
    return found


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress and logs registry warnings (missing torchvision ...)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_Null()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class _Null:
    def write(self, *_):
        return 0

    def flush(self):
        pass


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def translate(program: ExportedProgram, table: dict, opset: int, inputs: list[str],
              outputs: list[str]) -> ONNXProgram:
    """ExportedProgram -> ONNXProgram (unoptimized: :mod:`.cleanup` does that).

    Raises :class:`OnnxExportError` (stage "translate") naming the node and op of a custom op
    without a translation, else the innermost reason of the exporter's failure."""
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                program, (), dynamo=True, opset_version=opset, custom_translation_table=table,
                input_names=inputs, output_names=outputs, optimize=False, verbose=False)
    except Exception as e:
        missing = untranslated_ops(program, table)
        if missing:
            node, op = missing[0]
            raise OnnxExportError(
                "translate", f"no ONNX translation for {op} (register one in the custom "
                "translation table)", node=node, op=op) from e
        reasons = [str(x).strip().splitlines()[0] for x in _chain(e) if str(x).strip()]
        raise OnnxExportError("translate", reasons[-1] if reasons else type(e).__name__) from e
    if onnx_program is None:
        raise OnnxExportError("translate", "torch.onnx.export returned nothing")
    return onnx_program
