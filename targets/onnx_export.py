"""Deprecated import path, kept for code written against it: ``rewriter.targets.onnx_export``
re-exports :mod:`rewriter.targets.onnx` (where the export is split by job) and warns once on
import. Import from ``rewriter.targets.onnx`` (or ``rewriter.export_onnx``) instead."""

from __future__ import annotations

import warnings

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

warnings.warn("rewriter.targets.onnx_export is deprecated: import from rewriter.targets.onnx",
              DeprecationWarning, stacklevel=2)
