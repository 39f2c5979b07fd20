"""One JSON-ready view of the toolkit's records: configs, conversion info, reports.

    json.dumps(jsonable(conversion_info(model)))    # what report.json and the ONNX metadata hold

Used wherever a config or a report is written as JSON (``Report.to_dict``, the CLI's and the
pipeline's report.json, the ONNX file's ``rewriter.conversion`` metadata), so the same object
is written the same way everywhere and ``json.dumps`` never needs ``default=``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import torch

__all__ = ["jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, recursively.

    Dataclasses -> dicts of their public fields (names not starting with ``_``), mappings ->
    dicts with string keys, lists/tuples/sets -> lists, numpy numbers -> Python numbers,
    ``torch.dtype`` -> ``"float32"``, paths and devices -> strings, one-element tensors ->
    numbers, non-finite floats -> None (JSON has no NaN); anything else -> its ``repr``.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_")}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):  # int, numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # float, numpy floats
        return float(value) if math.isfinite(value) else None
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (PurePath, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return jsonable(value.item())
    return repr(value)
