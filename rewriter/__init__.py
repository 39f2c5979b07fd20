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

__all__ = [
    "ACTIVATIONS",
    "FFN_RULES",
    "CaptureError",
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
