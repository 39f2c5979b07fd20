"""ONNX export of dense, MoE and FP8 models, split by job:

- :mod:`.export`: :func:`export_onnx`, the entry point (argument checks, capture, save).
- :mod:`.translations`: ``torch.onnx.export`` with the custom translation table of the
  ``rewriter::`` ops; unknown custom ops named.
- :mod:`.fp8`: the onnxscript translations of the FP8 ops (blocked QDQ, FP8 embeddings).
- :mod:`.moe`: MoE routing in the graph (sparse, ``dense_moe=True``, or ``fused_moe=True``:
  onnxruntime's ``com.microsoft.MoE``).
- :mod:`.cleanup`: graph clean-up as ``onnx_ir`` passes (constant folding that keeps FP8,
  FP8 data movement folded, metadata stripped, dims renamed).
- :mod:`.io`: input/output names, the exported wrapper, metadata props.

Only public APIs of torch.onnx, onnxscript and onnx_ir are used.
"""

from __future__ import annotations

from rewriter.errors import ExportInputError, OnnxExportError

from ..fp8_linear import ACTIVATION_MODES
from .cleanup import op_counts
from .export import DEFAULT_OPSET, FP8_MIN_OPSET, MAX_OPSET, MIN_OPSET, ExportReport, export_onnx
from .io import flatten_outputs
from .translations import fp8_translation_table

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
