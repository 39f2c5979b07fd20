"""rewriter: compiler-style graph rewriting for PyTorch transformers.

Capture a model as one FX graph, find its feed-forward blocks by declared patterns, run passes
over the graph with checks, and inspect every step.
"""

from .capture import CaptureInfo, capture, capture_info
from .errors import CaptureError, InputError, NoFFNError, PassError, RewriterError
from .inspection import Report, inspect, to_networkx
from .pass_manager import PassManager, PassRecord, PassResult, PipelineResult, run_passes
from .patterns import (
    ACTIVATIONS,
    FFN_RULES,
    FFNAnalysis,
    FFNMatch,
    Rejection,
    analyze_ffns,
    find_ffns,
    require_ffns,
)
from .snapshot import GraphDiff, diff_graphs, snapshot

__version__ = "0.1.0"

# The facade (convert and the configs of the passes it drives) imports ``passes``, which
# imports this package's core: load it on first use to keep the import order one-way.
_LAZY = {
    "convert": ("rewriter.conversion", "convert"),
    "conversion_info": ("rewriter.conversion", "conversion_info"),
    "ConversionInfo": ("rewriter.conversion", "ConversionInfo"),
    "MoEConfig": ("passes.ffn_to_moe", "MoEConfig"),
    "FP8Config": ("passes.lower_fp8", "FP8Config"),
    "calibrate": ("passes.calibration", "calibrate"),
    "export_onnx": ("targets.onnx_export", "export_onnx"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rewriter' has no attribute {name!r}")


__all__ = [
    "ACTIVATIONS",
    "FFN_RULES",
    "CaptureError",
    "ConversionInfo",
    "MoEConfig",
    "FP8Config",
    "CaptureInfo",
    "FFNAnalysis",
    "FFNMatch",
    "GraphDiff",
    "InputError",
    "NoFFNError",
    "PassError",
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
    "require_ffns",
    "run_passes",
    "snapshot",
    "to_networkx",
]
