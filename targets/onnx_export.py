"""Deprecated import path, kept for code written against it: ``rewriter.targets.onnx_export``
re-exports :mod:`rewriter.targets.onnx` (where the export is split by job) and warns once on
import. Import from ``rewriter.targets.onnx`` (or ``rewriter.export_onnx``) instead."""

from __future__ import annotations

import warnings

from .onnx import *  # noqa: F403  (the same public names, one list: onnx.__all__)
from .onnx import __all__  # noqa: F401

warnings.warn("rewriter.targets.onnx_export is deprecated: import from rewriter.targets.onnx",
              DeprecationWarning, stacklevel=2)
