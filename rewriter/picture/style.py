"""Picture styles and node boxes: colours per op category / status / group kind, text sizes.

Pure data and text measuring; no layout, no drawing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = [
    "CATEGORY_STYLE",
    "GROUP_STYLE",
    "STATUS_STYLE",
    "NodeInfo",
    "category",
    "group_style",
    "node_info",
    "text_width",
    "wrap_group_label",
]

Point = tuple[float, float]

FONT_FAMILY = "'DejaVu Sans', Verdana, 'Segoe UI', Helvetica, Arial, sans-serif"
LABEL_FONT = 12.0
SMALL_FONT = 10.0
PARAM_FONT = 10.0
NODE_PAD_X = 10.0
NODE_MIN_W = 52.0
NODE_H1 = 26.0  # one line
NODE_H2 = 38.0  # label + shape line
PARAM_H = 20.0
MAX_LABEL_CHARS = 30
MAX_PARAM_CHARS = 24
MAX_SUB_CHARS = 32

LAYER_GAP = 34.0
NODE_GAP = 22.0
DUMMY_W = 8.0
DUMMY_GAP = 8.0
PORT_W = 8.0

GROUP_PAD_X = 14.0
GROUP_PAD_BOTTOM = 14.0
GROUP_LABEL_FONT = 11.0
GROUP_LABEL_LINE = 14.0
GROUP_LABEL_WRAP = 300.0

MARGIN = 24.0

_NARROW = set("iljtfrI1.,:;'!|()[]{} ")
_WIDE = set("mwMW@%")


def text_width(text: str, size: float) -> float:
    """Rough advance width of ``text`` in a DejaVu-Sans-like font (conservative)."""
    total = 0.0
    for ch in text:
        if ch in _NARROW:
            total += 0.36
        elif ch in _WIDE:
            total += 0.92
        elif ch.isupper():
            total += 0.70
        elif ord(ch) > 0x2000:
            total += 0.85
        else:
            total += 0.62
    return total * size


def _ellipsize(text: str, limit: int, *, keep_tail: bool = False) -> str:
    if len(text) <= limit:
        return text
    if keep_tail:
        return "…" + text[-(limit - 1) :]
    return text[: limit - 1] + "…"


_BOLD_CATEGORIES = ("matmul", "fp8", "attention")
_MATMUL_WORDS = frozenset(
    ("mm", "bmm", "addmm", "addbmm", "baddbmm", "matmul", "gemm", "einsum", "linear", "mv")
)
_MATMUL_PREFIXES = ("linear", "matmul", "gemm", "conv")
_ATTN_WORDS = frozenset(("sdpa", "attention", "attn"))

# category -> (fill, stroke, text colour, legend text)
CATEGORY_STYLE: dict[str, tuple[str, str, str, str]] = {
    "input": ("#dbeafe", "#2563eb", "#1e3a8a", "input"),
    "param": ("#f1f5f9", "#94a3b8", "#475569", "parameter / constant"),
    "compute": ("#ffffff", "#64748b", "#0f172a", "op"),
    "matmul": ("#ede9fe", "#7c3aed", "#3b0764", "matmul / linear"),
    "attention": ("#e0f2fe", "#0284c7", "#0c4a6e", "attention"),
    "fp8": ("#ccfbf1", "#0d9488", "#134e4a", "FP8"),
    "output": ("#fef3c7", "#d97706", "#78350f", "output"),
    "collapsed": ("#f8fafc", "#94a3b8", "#334155", "collapsed nodes"),
}

# status -> (stroke, fill tint or "", dash, badge, legend text)
STATUS_STYLE: dict[str, tuple[str, str, str, str, str]] = {
    "added": ("#16a34a", "#dcfce7", "", "+", "added"),
    "removed": ("#dc2626", "#fee2e2", "5 3", "−", "removed"),
    "changed": ("#ea580c", "#ffedd5", "", "~", "changed"),
}

# group kind -> (fill, stroke, label colour)
GROUP_STYLE: dict[str, tuple[str, str, str]] = {
    "ffn": ("#fffbeb", "#f59e0b", "#92400e"),
    "moe": ("#ecfdf5", "#10b981", "#065f46"),
    "attention": ("#eff6ff", "#60a5fa", "#1e40af"),
    "module": ("#f8fafc", "#94a3b8", "#334155"),
}
_EXTRA_GROUP_STYLES = [
    ("#fdf2f8", "#ec4899", "#9d174d"),
    ("#f5f3ff", "#8b5cf6", "#5b21b6"),
    ("#f0fdfa", "#14b8a6", "#115e59"),
    ("#fefce8", "#eab308", "#854d0e"),
]

EDGE_COLOR = "#94a3b8"
EDGE_PARAM_COLOR = "#cbd5e1"


def group_style(kind: str) -> tuple[str, str, str]:
    if kind in GROUP_STYLE:
        return GROUP_STYLE[kind]
    h = sum(ord(c) * (i + 1) for i, c in enumerate(kind))
    return _EXTRA_GROUP_STYLES[h % len(_EXTRA_GROUP_STYLES)]


def category(op: str, label: str, target: str) -> str:
    if op == "placeholder":
        return "input"
    if op == "get_attr":
        return "param"
    if op == "output":
        return "output"
    if op == "collapsed":
        return "collapsed"
    text = f"{label} {target}".lower()
    if "fp8" in text or "float8" in text:
        return "fp8"
    words = [w for w in re.split(r"[^a-z0-9]+", text) if w]
    if "scaled_dot_product" in text or (
        any(w in _ATTN_WORDS for w in words) and "mask" not in words
    ):
        return "attention"
    if any(w in _MATMUL_WORDS or w.startswith(_MATMUL_PREFIXES) for w in words):
        return "matmul"
    return "compute"


@dataclass
class NodeInfo:
    key: Hashable
    label: str
    op: str
    target: str
    module: str
    group: str | None
    status: str
    shape: str | None
    dtype: str | None
    count: int | None
    category: str
    lines: list[tuple[str, float]]  # (text, font size)
    w: float
    h: float


def node_info(key: Hashable, data: dict) -> NodeInfo:
    op = str(data.get("op") or "call_function")
    label = data.get("label")
    label = str(key) if label is None or label == "" else str(label)
    target = str(data.get("target") or "")
    module = str(data.get("module") or "")
    group = data.get("group")
    group = None if group is None or group == "" else str(group)
    status = str(data.get("status") or "unchanged")
    if status not in STATUS_STYLE:
        status = "unchanged"
    shape = data.get("shape")
    shape = None if shape in (None, "") else str(shape)
    dtype = data.get("dtype")
    dtype = None if dtype in (None, "") else str(dtype)
    count = data.get("count")
    try:
        count = None if count is None else int(count)
    except (TypeError, ValueError):
        count = None
    cat = category(op, label, target)
    if cat == "param":
        lines = [(_ellipsize(label, MAX_PARAM_CHARS, keep_tail=True), PARAM_FONT)]
        h = PARAM_H
    else:
        lines = [(_ellipsize(label, MAX_LABEL_CHARS), LABEL_FONT)]
        sub = None
        if cat == "collapsed" and count is not None:
            sub = f"{count} node{'s' if count != 1 else ''} hidden"
        elif shape or dtype:
            sub = " ".join(s for s in (shape, _short_dtype(dtype)) if s)
        if sub:
            lines.append((_ellipsize(sub, MAX_SUB_CHARS), SMALL_FONT))
        h = NODE_H2 if len(lines) > 1 else NODE_H1
    bold = 1.16 if cat in _BOLD_CATEGORIES else 1.0
    w = max(
        NODE_MIN_W if cat != "param" else 36.0,
        text_width(lines[0][0], lines[0][1]) * bold,
        *(text_width(t, s) for t, s in lines[1:]),
    )
    w += 2 * NODE_PAD_X if cat != "param" else 12.0
    w = math.ceil(w)
    return NodeInfo(
        key, label, op, target, module, group, status, shape, dtype, count, cat, lines, w, h
    )


def _short_dtype(dtype: str | None) -> str | None:
    if not dtype:
        return None
    d = dtype.replace("torch.", "")
    return {
        "float32": "f32",
        "float16": "f16",
        "bfloat16": "bf16",
        "float8_e4m3fn": "fp8e4m3",
        "float8_e5m2": "fp8e5m2",
        "int64": "i64",
        "int32": "i32",
        "bool": "bool",
    }.get(d, d)


# --------------------------------------------------------------------------------------------
# the layered layout engine (works on integer node ids)
# --------------------------------------------------------------------------------------------


def wrap_group_label(label: str, max_w: float) -> list[str]:
    """Wrap a group label at its " · " separators (then spaces) into lines of ``max_w`` px."""
    tokens: list[tuple[str, str]] = []  # (separator before, word)
    for part in (p.strip() for p in label.split("·")):
        if not part:
            continue
        pieces = part.split() if text_width(part, GROUP_LABEL_FONT) > max_w else [part]
        for i, word in enumerate(pieces):
            tokens.append((" · " if i == 0 else " ", word))
    if not tokens:
        return [""]
    lines: list[str] = []
    cur = ""
    for sep, word in tokens:
        cand = f"{cur}{sep}{word}" if cur else word
        if cur and text_width(cand, GROUP_LABEL_FONT) > max_w:
            lines.append(cur)
            cur = word
        else:
            cur = cand
    lines.append(cur)
    if len(lines) > 4:
        lines = lines[:3] + [" · ".join(lines[3:])]
    out = []
    for t in lines:
        if text_width(t, GROUP_LABEL_FONT) > max_w * 1.05:
            while len(t) > 8 and text_width(t + "…", GROUP_LABEL_FONT) > max_w:
                t = t[:-1]
            t = t.rstrip(" ·") + "…"
        out.append(t)
    return out

