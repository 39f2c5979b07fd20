"""The public ONNX export module (kept for its importers): a re-export of
:mod:`rewriter.targets.onnx`, where the export is split by job (see its docstring)."""

from __future__ import annotations

from .onnx import (
    ACTIVATION_MODES,
    DEFAULT_OPSET,
    FP8_MIN_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    ExportInputError,
    ExportReport,
    OnnxExportError,
    export_onnx,
    flatten_outputs,
    fp8_translation_table,
    op_counts,
)

__all__ = [
    "ACTIVATION_MODES",
    "DEFAULT_OPSET",
    "FP8_MIN_OPSET",
    "MAX_OPSET",
    "MIN_OPSET",
    "ExportInputError",
    "ExportReport",
    "OnnxExportError",
    "export_onnx",
    "flatten_outputs",
    "fp8_translation_table",
    "op_counts",
]
