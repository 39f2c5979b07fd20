"""rewriter: compiler-style graph rewriting for PyTorch transformers.

Capture a model as one FX graph, find its feed-forward blocks by declared patterns, run passes
over the graph with checks, and inspect every step. The packages form one-way layers (checked
by import-linter, see ``[tool.importlinter]`` in pyproject.toml):

- core: ``errors``, ``graph_ops``, ``capture``, ``patterns``, ``snapshot``, ``pass_manager``
- ``rewriter.models`` (reference models, the MoE block), ``rewriter.targets`` (FP8, Triton,
  ONNX), ``rewriter.passes`` (graph transformations), each importing only layers below it
- front end: ``inspection``, ``conversion``, ``recipes``, ``training``, ``pipeline``, ``cli``
"""

from rewriter.capture import CaptureInfo, capture, capture_info
from rewriter.errors import (
    CaptureError,
    CheckpointError,
    ExportInputError,
    FP8InferenceModeError,
    InputError,
    MissingDependencyError,
    NoFFNError,
    OnnxExportError,
    OnnxRuntimeError,
    PassError,
    RewriterError,
    UnknownModelError,
)
from rewriter.pass_manager import PassManager, PassRecord, PassResult, PipelineResult, run_passes
from rewriter.patterns import (
    ACTIVATIONS,
    CAPTURED_ACTIVATION,
    FFN_RULES,
    FFNAnalysis,
    FFNMatch,
    Rejection,
    analyze_ffns,
    find_ffns,
    require_ffns,
)
from rewriter.snapshot import GraphDiff, diff_graphs, snapshot

# isort: split
from rewriter.conversion import ConversionInfo, conversion_info, convert
from rewriter.inspection import Report, inspect, to_networkx
from rewriter.passes.calibration import calibrate
from rewriter.passes.ffn_to_moe import MoEConfig
from rewriter.passes.lower_fp8 import FP8Config
from rewriter.passes.recovery import RecoveryConfig, RecoveryReport, recover
from rewriter.serialization import load, save
from rewriter.targets.onnx import export_onnx

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "CAPTURED_ACTIVATION",
    "FFN_RULES",
    "CaptureError",
    "CheckpointError",
    "ConversionInfo",
    "MoEConfig",
    "FP8Config",
    "RecoveryConfig",
    "RecoveryReport",
    "CaptureInfo",
    "FFNAnalysis",
    "FFNMatch",
    "GraphDiff",
    "InputError",
    "NoFFNError",
    "PassError",
    "ExportInputError",
    "FP8InferenceModeError",
    "MissingDependencyError",
    "OnnxExportError",
    "OnnxRuntimeError",
    "UnknownModelError",
    "PassManager",
    "PassRecord",
    "PassResult",
    "PipelineResult",
    "Rejection",
    "Report",
    "RewriterError",
    "analyze_ffns",
    "calibrate",
    "convert",
    "conversion_info",
    "export_onnx",
    "capture",
    "capture_info",
    "diff_graphs",
    "find_ffns",
    "inspect",
    "load",
    "recover",
    "save",
    "require_ffns",
    "run_passes",
    "snapshot",
    "to_networkx",
]
