"""Pictures of computation graphs: a layered layout and a self-contained SVG / HTML renderer.

Pure Python (stdlib + networkx); no Graphviz, no network, no external scripts or fonts.

Input contract: a ``networkx.DiGraph`` whose nodes carry ``label``, ``op`` (``placeholder`` |
``get_attr`` | ``call_function`` | ``call_module`` | ``call_method`` | ``output`` |
``collapsed``), ``target``, ``module``, optional ``group`` (a block id), ``status``
(``unchanged`` | ``added`` | ``removed`` | ``changed``), optional ``shape``, ``dtype`` and
``count`` (for collapsed nodes). ``g.graph["title"]`` is the default title and
``g.graph["groups"]`` maps a group id to ``{"label": str, "kind": str}``. An edge ``u -> v``
means ``v`` consumes ``u``.

Layout: Sugiyama-style, top to bottom. Each group is laid out on its own (with virtual "ports"
where edges enter at its top and leave at its bottom) and then placed as one box in the
top-level layout, so group boxes never overlap each other or foreign nodes. Layering is longest
path (with nodes that only feed later layers pulled down next to their consumers), crossings are
reduced by barycenter sweeps, x coordinates come from the priority method, long edges run
through dummy points and are drawn as smooth vertical-tangent cubic curves. Cycles (not expected
in FX graphs) are broken by reversing a few edges.
"""

from __future__ import annotations

import heapq
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import networkx as nx

__all__ = [
    "EdgeRoute",
    "GroupBox",
    "Layout",
    "NodeBox",
    "compute_layout",
    "example_graph",
    "layout",
    "render_html",
    "render_svg",
    "write_picture",
]

Point = tuple[float, float]

# --------------------------------------------------------------------------------------------
# sizes and styles
# --------------------------------------------------------------------------------------------

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


def _text_width(text: str, size: float) -> float:
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


def _group_style(kind: str) -> tuple[str, str, str]:
    if kind in GROUP_STYLE:
        return GROUP_STYLE[kind]
    h = sum(ord(c) * (i + 1) for i, c in enumerate(kind))
    return _EXTRA_GROUP_STYLES[h % len(_EXTRA_GROUP_STYLES)]


def _category(op: str, label: str, target: str) -> str:
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
class _NodeInfo:
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


def _node_info(key: Hashable, data: dict) -> _NodeInfo:
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
    cat = _category(op, label, target)
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
        _text_width(lines[0][0], lines[0][1]) * bold,
        *(_text_width(t, s) for t, s in lines[1:]),
    )
    w += 2 * NODE_PAD_X if cat != "param" else 12.0
    w = math.ceil(w)
    return _NodeInfo(
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


@dataclass
class _EngineOut:
    x: list[float]
    y: list[float]
    layer: list[int]
    routes: dict[int, list[Point]]
    width: float
    height: float
    reversed_edges: set[int]


def _break_cycles(n: int, pairs: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Topological order (smallest index first) and, per edge, whether it must be reversed."""
    indeg = [0] * n
    out: list[list[int]] = [[] for _ in range(n)]
    inn: list[list[int]] = [[] for _ in range(n)]
    for i, (u, v) in enumerate(pairs):
        out[u].append(i)
        inn[v].append(i)
        indeg[v] += 1
    rev = [False] * len(pairs)
    done = [False] * n
    heap = [v for v in range(n) if indeg[v] == 0]
    heapq.heapify(heap)
    order: list[int] = []
    while len(order) < n:
        if not heap:
            # stuck on a cycle: free the remaining node with the fewest pending inputs
            cand = min((v for v in range(n) if not done[v]), key=lambda v: (indeg[v], v))
            for i in inn[cand]:
                u = pairs[i][0]
                if not done[u] and not rev[i]:
                    rev[i] = True
                    indeg[cand] -= 1
            heap.append(cand)
        v = heapq.heappop(heap)
        if done[v]:
            continue
        done[v] = True
        order.append(v)
        for i in out[v]:
            if rev[i]:
                continue
            w = pairs[i][1]
            indeg[w] -= 1
            if indeg[w] == 0 and not done[w]:
                heapq.heappush(heap, w)
    return order, rev


def _count_crossings(upper: list[int], lower_pos: dict[int, int] | list[int], down) -> int:
    """Crossings between two adjacent layers; ``upper`` in order, ``down[v]`` neighbours below."""
    seq: list[int] = []
    for v in upper:
        ps = sorted(lower_pos[b] for b in down[v])
        seq.extend(ps)
    if len(seq) < 2:
        return 0
    size = max(seq) + 2
    tree = [0] * (size + 1)
    crossings = 0
    seen = 0
    for p in seq:
        # count previously seen values > p
        i = p + 1
        s = 0
        while i > 0:
            s += tree[i]
            i -= i & -i
        crossings += seen - s
        i = p + 1
        while i <= size:
            tree[i] += 1
            i += i & -i
        seen += 1
    return crossings


def _median(vals: list[float]) -> float:
    vals = sorted(vals)
    m = len(vals)
    if m % 2:
        return vals[m // 2]
    return 0.5 * (vals[m // 2 - 1] + vals[m // 2])


def _engine(
    widths: list[float],
    heights: list[float],
    edges: list[tuple[int, int, int, float, float]],
    *,
    top: Iterable[int] = (),
    bottom: Iterable[int] = (),
    side: Iterable[int] = (),
    weak: Iterable[int] = (),
    no_spread: Iterable[int] = (),
    layer_gap: float = LAYER_GAP,
    node_gap: float = NODE_GAP,
    sweeps: int = 4,
) -> _EngineOut:
    """Lay out nodes ``0..n-1`` with sizes ``widths/heights``.

    ``edges`` are ``(eid, u, v, u_offset, v_offset)``: offsets shift the attachment point of the
    edge on the node horizontally (used for group ports). ``top`` nodes are forced to layer 0,
    ``bottom`` nodes to the last layer. ``side`` nodes (parameters) yield to others when x
    coordinates are assigned, and ``weak`` edge ids (from parameters, to or from removed nodes)
    do not pull their end nodes into line. Edges arriving at a node get distinct end points
    unless it is in ``no_spread`` (groups, whose edges end at ports). Returns node centers and
    one polyline per edge id (self loops get none).
    """
    n = len(widths)
    top = set(top)
    bottom = set(bottom)
    side_set = set(side)
    weak_set = set(weak)
    no_spread_set = set(no_spread) | bottom
    es = [e for e in edges if e[1] != e[2]]
    order, rev = _break_cycles(n, [(u, v) for _, u, v, _, _ in es])

    # ---- layering -------------------------------------------------------------------------
    preds: list[list[int]] = [[] for _ in range(n)]
    succs: list[list[int]] = [[] for _ in range(n)]
    directed: list[tuple[int, int]] = []
    for k, (_, u, v, _, _) in enumerate(es):
        a, b = (v, u) if rev[k] else (u, v)
        directed.append((a, b))
        preds[b].append(a)
        succs[a].append(b)
    base = 1 if top else 0
    layer = [0] * n
    for v in order:
        if v in top:
            layer[v] = 0
            continue
        lv = base
        for a in preds[v]:
            if layer[a] + 1 > lv:
                lv = layer[a] + 1
        layer[v] = lv
    # pull nodes that feed only later layers down next to their consumers
    for v in reversed(order):
        if v in top or v in bottom or not succs[v] or len(succs[v]) < len(preds[v]):
            continue
        want = min(layer[s] for s in succs[v]) - 1
        if want > layer[v]:
            layer[v] = want
    if bottom:
        rest = [layer[v] for v in range(n) if v not in bottom]
        last = (max(rest) + 1) if rest else 0
        for v in bottom:
            layer[v] = last

    # ---- proper layering with dummy nodes ---------------------------------------------------
    w = list(widths)
    h = list(heights)
    lay = list(layer)
    is_dummy = [False] * n
    is_side = [v in side_set for v in range(n)]
    # neighbour lists: (neighbour, its offset, my offset, weak)
    up: list[list[tuple[int, float, float, bool]]] = [[] for _ in range(n)]
    down: list[list[tuple[int, float, float, bool]]] = [[] for _ in range(n)]
    chains: list[list[int]] = []

    def new_dummy(lv: int) -> int:
        w.append(DUMMY_W)
        h.append(0.0)
        lay.append(lv)
        is_dummy.append(True)
        is_side.append(False)
        up.append([])
        down.append([])
        return len(w) - 1

    # long edges from one attachment point share a trunk of dummies (edge concentration):
    # values broadcast to every layer (rotary tables, masks) become one line with branches
    trunks: dict[tuple[int, float], dict[int, int]] = {}
    for k, (eid, _, _, uo, vo) in enumerate(es):
        a, b = directed[k]
        wk = eid in weak_set
        ao, bo = (uo, vo) if not rev[k] else (0.0, 0.0)
        trunk = trunks.setdefault((a, ao), {}) if not rev[k] else {}
        chain = [a]
        for lv in range(lay[a] + 1, lay[b]):
            d = trunk.get(lv)
            if d is None:
                d = trunk[lv] = new_dummy(lv)
                p = chain[-1]
                po = ao if p == a else 0.0
                down[p].append((d, 0.0, po, wk))
                up[d].append((p, po, 0.0, wk))
            chain.append(d)
        p = chain[-1]
        po = ao if p == a else 0.0
        down[p].append((b, bo, po, wk))
        up[b].append((p, po, bo, wk))
        chain.append(b)
        chains.append(chain)
    total = len(w)
    nlayers = (max(lay) + 1) if total else 0
    layers: list[list[int]] = [[] for _ in range(nlayers)]

    # initial order: depth-first discovery from the top, children in edge order
    disc = [-1] * total
    counter = 0
    roots = sorted(range(total), key=lambda v: (lay[v], v))
    for r in roots:
        if disc[r] >= 0:
            continue
        stack = [r]
        while stack:
            v = stack.pop()
            if disc[v] >= 0:
                continue
            disc[v] = counter
            counter += 1
            for q, _, _, _ in reversed(down[v]):
                if disc[q] < 0:
                    stack.append(q)
    for v in sorted(range(total), key=lambda v: disc[v]):
        layers[lay[v]].append(v)

    # ---- crossing reduction -------------------------------------------------------------------
    pos = [0] * total
    for lv in layers:
        for i, v in enumerate(lv):
            pos[v] = i
    down_n = [[t[0] for t in down[v]] for v in range(total)]
    up_n = [[t[0] for t in up[v]] for v in range(total)]

    pair_c = [_count_crossings(layers[i], pos, down_n) for i in range(nlayers - 1)]
    best = [list(lv) for lv in layers]
    best_c = sum(pair_c)
    for _ in range(sweeps if best_c else 0):
        for rng, nbrs in (
            (range(1, nlayers), up_n),
            (range(nlayers - 2, -1, -1), down_n),
        ):
            changed: set[int] = set()
            for li in rng:
                lv = layers[li]
                keys = {}
                for v in lv:
                    ns = nbrs[v]
                    keys[v] = (sum(pos[q] for q in ns) / len(ns)) if ns else float(pos[v])
                new = sorted(lv, key=lambda v: keys[v])
                if new != lv:
                    layers[li] = new
                    changed.add(li)
                    for i, v in enumerate(new):
                        pos[v] = i
            for pi in sorted({p for li in changed for p in (li - 1, li) if 0 <= p < nlayers - 1}):
                pair_c[pi] = _count_crossings(layers[pi], pos, down_n)
            c = sum(pair_c)
            if c < best_c:
                best_c = c
                best = [list(lv) for lv in layers]
            if c == 0:
                break
        if best_c == 0:
            break
    layers = best
    for lv in layers:
        for i, v in enumerate(lv):
            pos[v] = i

    # ---- x coordinates: priority method --------------------------------------------------------
    def sep(a: int, b: int) -> float:
        if is_dummy[a] and is_dummy[b]:
            g = DUMMY_GAP
        elif is_dummy[a] or is_dummy[b]:
            g = node_gap * 0.6
        else:
            g = node_gap
        return (w[a] + w[b]) / 2 + g

    x = [0.0] * total
    for lv in layers:
        cur = 0.0
        for i, v in enumerate(lv):
            if i:
                cur += sep(lv[i - 1], v)
            x[v] = cur
        for v in lv:
            x[v] -= cur / 2

    def place(lv: list[int], nbrs: list[list[tuple[int, float, float, bool]]]) -> None:
        m = len(lv)
        if m == 0:
            return
        desired: list[float | None] = []
        prio: list[float] = []
        for v in lv:
            ns = nbrs[v]
            if not is_dummy[v]:
                # real nodes align with real, non-side neighbours; long edges make room
                real = [t for t in ns if not is_dummy[t[0]]]
                main = [t for t in real if not t[3]]
                ns = main or real or ns
            if ns:
                desired.append(_median([x[t[0]] + t[1] - t[2] for t in ns]))
            else:
                desired.append(None)
            if is_dummy[v]:
                prio.append(1.0)
            elif is_side[v]:
                prio.append(1.5)
            else:
                prio.append(2.0 + len(ns))
        xs = [x[v] for v in lv]
        seps = [sep(lv[k], lv[k + 1]) for k in range(m - 1)]
        fixed = [False] * m
        for i in sorted(range(m), key=lambda i: (-prio[i], i)):
            d = desired[i]
            if d is not None:
                xi = xs[i]
                if d > xi:
                    lim = math.inf
                    acc = 0.0
                    for k in range(i + 1, m):
                        acc += seps[k - 1]
                        if fixed[k]:
                            lim = xs[k] - acc
                            break
                    nx_ = d if d < lim else lim
                    if nx_ > xi:
                        xs[i] = nx_
                        for k in range(i + 1, m):
                            need = xs[k - 1] + seps[k - 1]
                            if xs[k] < need:
                                xs[k] = need
                            else:
                                break
                elif d < xi:
                    lim = -math.inf
                    acc = 0.0
                    for k in range(i - 1, -1, -1):
                        acc += seps[k]
                        if fixed[k]:
                            lim = xs[k] + acc
                            break
                    nx_ = d if d > lim else lim
                    if nx_ < xi:
                        xs[i] = nx_
                        for k in range(i - 1, -1, -1):
                            need = xs[k + 1] - seps[k]
                            if xs[k] > need:
                                xs[k] = need
                            else:
                                break
            fixed[i] = True
        for v, xv in zip(lv, xs, strict=True):
            x[v] = xv

    both = [up[v] + down[v] for v in range(total)]
    for direction in ("down", "up", "down", "up", "both"):
        if direction == "down":
            for li in range(1, nlayers):
                place(layers[li], up)
        elif direction == "up":
            for li in range(nlayers - 2, -1, -1):
                place(layers[li], down)
        else:
            for li in range(nlayers):
                place(layers[li], both)

    # straighten long edges: runs of dummies share one x wherever the layers leave room
    for lv in layers:
        for i, v in enumerate(lv):
            pos[v] = i

    def room(d: int) -> tuple[float, float]:
        lv = layers[lay[d]]
        i = pos[d]
        lo = x[lv[i - 1]] + sep(lv[i - 1], d) if i > 0 else -math.inf
        hi = x[lv[i + 1]] - sep(d, lv[i + 1]) if i + 1 < len(lv) else math.inf
        return lo, hi

    def settle(seg: list[int], lo: float, hi: float) -> None:
        target = _median([x[d] for d in seg])
        target = min(max(target, lo), hi)
        for d in seg:
            x[d] = target

    for start in range(n, total):
        if any(is_dummy[t[0]] for t in up[start]):
            continue  # not the first dummy of its run
        seg: list[int] = []
        lo, hi = -math.inf, math.inf
        d: int | None = start
        while d is not None:
            a, b = room(d)
            if seg and (max(lo, a) > min(hi, b)):
                settle(seg, lo, hi)
                seg, lo, hi = [], -math.inf, math.inf
            seg.append(d)
            lo, hi = max(lo, a), min(hi, b)
            d = next((t[0] for t in down[d] if is_dummy[t[0]]), None)
        settle(seg, lo, hi)

    if total:
        minx = min(x[v] - w[v] / 2 for v in range(total))
        for v in range(total):
            x[v] -= minx
        width = max(x[v] + w[v] / 2 for v in range(total))
    else:
        width = 0.0

    # ---- y coordinates --------------------------------------------------------------------------
    lh = [max((h[v] for v in lv), default=0.0) for lv in layers]
    ytop = [0.0] * nlayers
    for li in range(1, nlayers):
        gap = layer_gap
        maxdx = 0.0
        for v in layers[li - 1]:
            for q, qo, vo, _ in down[v]:
                maxdx = max(maxdx, abs(x[v] + vo - x[q] - qo))
        gap = max(gap, min(layer_gap * 3.0, maxdx * 0.2))
        ytop[li] = ytop[li - 1] + lh[li - 1] + gap
    height = (ytop[-1] + lh[-1]) if nlayers else 0.0
    y = [ytop[lay[v]] + lh[lay[v]] / 2 for v in range(total)]

    # ---- routes ---------------------------------------------------------------------------------
    # A node lower than its layer (beside a group box) gets vertical lead-out / lead-in lines
    # to the layer's edges, so no curve cuts through a neighbouring box.
    routes: dict[int, list[Point]] = {}
    reversed_edges: set[int] = set()
    arrivals: dict[int, list[tuple[float, int, list[Point], bool]]] = {}
    for k, (eid, _, _, _, _) in enumerate(es):
        chain = chains[k]
        a, b = chain[0], chain[-1]
        ao, bo = (es[k][3], es[k][4]) if not rev[k] else (0.0, 0.0)
        pts: list[Point] = [(x[a] + ao, y[a] + h[a] / 2)]
        la, lb = lay[a], lay[b]
        if h[a] < lh[la] - 0.5:
            pts.append((x[a] + ao, ytop[la] + lh[la]))
        for d in chain[1:-1]:
            t = ytop[lay[d]]
            bt = t + lh[lay[d]]
            pts.append((x[d], t))
            if bt > t:
                pts.append((x[d], bt))
        lead_in = h[b] < lh[lb] - 0.5
        if lead_in:
            pts.append((x[b] + bo, ytop[lb]))
        pts.append((x[b] + bo, y[b] - h[b] / 2))
        if rev[k]:
            pts.reverse()
            reversed_edges.add(eid)
        elif b not in no_spread_set:
            prev = chain[-2]
            px = x[prev] + (ao if prev == a else 0.0)
            arrivals.setdefault(b, []).append((px, k, pts, lead_in))
        routes[eid] = pts
    # edges arriving at one node get distinct end points, ordered by where they come from
    for b, arr in arrivals.items():
        if len(arr) < 2:
            continue
        arr.sort(key=lambda t: (t[0], t[1]))
        span = max(0.0, w[b] - 20.0)
        step = min(14.0, span / (len(arr) - 1))
        for i, (_, _, pts, lead_in) in enumerate(arr):
            nxb = x[b] + (i - (len(arr) - 1) / 2) * step
            pts[-1] = (nxb, pts[-1][1])
            if lead_in:
                pts[-2] = (nxb, pts[-2][1])
    return _EngineOut(x[:n], y[:n], lay[:n], routes, width, height, reversed_edges)


# --------------------------------------------------------------------------------------------
# public layout
# --------------------------------------------------------------------------------------------


@dataclass
class NodeBox:
    """A node's box: center ``(x, y)``, size ``w x h``."""

    x: float
    y: float
    w: float
    h: float


@dataclass
class GroupBox:
    """A group's rounded box: top-left ``(x, y)``, size ``w x h``, wrapped label lines."""

    gid: str
    label: str
    kind: str
    x: float
    y: float
    w: float
    h: float
    lines: list[str] = field(default_factory=list)
    nodes: list[Hashable] = field(default_factory=list)
    align: str = "start"

    def contains(self, px: float, py: float) -> bool:
        return self.x <= px <= self.x + self.w and self.y <= py <= self.y + self.h


@dataclass
class EdgeRoute:
    """An edge ``u -> v`` drawn through ``points`` (first at ``u``, last at ``v``)."""

    u: Hashable
    v: Hashable
    points: list[Point]
    reversed: bool = False


@dataclass
class Layout:
    """Everything the renderer needs; coordinates start at (0, 0) top-left."""

    nodes: dict[Hashable, NodeBox]
    groups: dict[str, GroupBox]
    edges: list[EdgeRoute]
    width: float
    height: float
    info: dict[Hashable, _NodeInfo] = field(repr=False, default_factory=dict)

    @property
    def pos(self) -> dict[Hashable, Point]:
        return {k: (b.x, b.y) for k, b in self.nodes.items()}


def _wrap_group_label(label: str, max_w: float) -> list[str]:
    """Wrap a group label at its " · " separators (then spaces) into lines of ``max_w`` px."""
    tokens: list[tuple[str, str]] = []  # (separator before, word)
    for part in (p.strip() for p in label.split("·")):
        if not part:
            continue
        pieces = part.split() if _text_width(part, GROUP_LABEL_FONT) > max_w else [part]
        for i, word in enumerate(pieces):
            tokens.append((" · " if i == 0 else " ", word))
    if not tokens:
        return [""]
    lines: list[str] = []
    cur = ""
    for sep, word in tokens:
        cand = f"{cur}{sep}{word}" if cur else word
        if cur and _text_width(cand, GROUP_LABEL_FONT) > max_w:
            lines.append(cur)
            cur = word
        else:
            cur = cand
    lines.append(cur)
    if len(lines) > 4:
        lines = lines[:3] + [" · ".join(lines[3:])]
    out = []
    for t in lines:
        if _text_width(t, GROUP_LABEL_FONT) > max_w * 1.05:
            while len(t) > 8 and _text_width(t + "…", GROUP_LABEL_FONT) > max_w:
                t = t[:-1]
            t = t.rstrip(" ·") + "…"
        out.append(t)
    return out


def _dedupe(points: list[Point]) -> list[Point]:
    out: list[Point] = []
    for p in points:
        if out and abs(out[-1][0] - p[0]) < 0.5 and abs(out[-1][1] - p[1]) < 0.5:
            continue
        out.append(p)
    return out


@dataclass
class _GroupLayout:
    """A group laid out on its own: box size, content offset, engine output and its ids."""

    w: float
    h: float
    ox: float  # content origin inside the box
    oy: float
    out: _EngineOut
    idx: dict[Hashable, int]  # member -> engine id
    in_idx: dict[Hashable, int]  # outside source -> in-port id
    out_idx: dict[Hashable, int]  # member feeding the outside -> out-port id
    eids: dict[tuple, int]  # ("i", u, v) | ("in", u, v) | ("out", u) -> edge id
    lines: list[str]
    align: str


def compute_layout(g: nx.DiGraph) -> Layout:
    """Full layout of ``g``: node boxes, group boxes and edge polylines."""
    keys = list(g.nodes)
    info = {k: _node_info(k, g.nodes[k]) for k in keys}
    meta = g.graph.get("groups") or {}

    group_order: list[str] = []
    members: dict[str, list[Hashable]] = {}
    for k in keys:
        gid = info[k].group
        if gid is None:
            continue
        if gid not in members:
            members[gid] = []
            group_order.append(gid)
        members[gid].append(k)
    group_of = {k: info[k].group for k in keys}

    internal: dict[str, list[tuple[Hashable, Hashable]]] = {gid: [] for gid in group_order}
    cross: list[tuple[Hashable, Hashable]] = []
    self_loops: list[Hashable] = []
    for u, v in g.edges():
        if u == v:
            self_loops.append(u)
            continue
        gu, gv = group_of[u], group_of[v]
        if gu is not None and gu == gv:
            internal[gu].append((u, v))
        else:
            cross.append((u, v))

    inports: dict[str, dict[Hashable, int]] = {gid: {} for gid in group_order}
    outports: dict[str, dict[Hashable, int]] = {gid: {} for gid in group_order}
    for u, v in cross:
        gu, gv = group_of[u], group_of[v]
        if gv is not None and u not in inports[gv]:
            inports[gv][u] = len(inports[gv])
        if gu is not None and u not in outports[gu]:
            outports[gu][u] = len(outports[gu])

    def weak_src(u: Hashable) -> bool:
        return info[u].category == "param" or info[u].status == "removed"

    def weak_dst(v: Hashable) -> bool:
        return info[v].status == "removed"

    # ---- lay out every group on its own ---------------------------------------------------------
    glay: dict[str, _GroupLayout] = {}
    for gid in group_order:
        gm = meta.get(gid) or {}
        label = str(gm.get("label") or gid) if isinstance(gm, dict) else str(gid)
        mem = members[gid]
        idx = {k: i for i, k in enumerate(mem)}
        widths = [info[k].w for k in mem]
        heights = [info[k].h for k in mem]
        in_idx: dict[Hashable, int] = {}
        for u in inports[gid]:
            in_idx[u] = len(widths)
            widths.append(PORT_W)
            heights.append(0.0)
        out_idx: dict[Hashable, int] = {}
        for u in outports[gid]:
            out_idx[u] = len(widths)
            widths.append(PORT_W)
            heights.append(0.0)
        eids: dict[tuple, int] = {}
        edges: list[tuple[int, int, int, float, float]] = []

        weak: list[int] = []

        def add(key: tuple, a: int, b: int, wk: bool, _edges=edges, _eids=eids, _weak=weak):
            if key in _eids:
                return
            _eids[key] = len(_edges)
            if wk:
                _weak.append(len(_edges))
            _edges.append((len(_edges), a, b, 0.0, 0.0))

        for u, v in internal[gid]:
            add(("i", u, v), idx[u], idx[v], weak_src(u) or weak_dst(v))
        for u, v in cross:
            if group_of[v] == gid:
                add(("in", u, v), in_idx[u], idx[v], weak_src(u) or weak_dst(v))
            if group_of[u] == gid:
                add(("out", u), idx[u], out_idx[u], weak_src(u))
        side = [idx[k] for k in mem if info[k].category == "param"]

        def run(
            lines: list[str],
            _heights=heights,
            _widths=widths,
            _edges=edges,
            _side=side,
            _weak=weak,
            _in=in_idx,
            _out=out_idx,
            _eids=eids,
        ) -> _EngineOut:
            header = len(lines) * GROUP_LABEL_LINE + 10.0
            for j in _in.values():
                _heights[j] = header  # in-edges drop vertically through the label header
            out = _engine(
                _widths,
                _heights,
                _edges,
                top=_in.values(),
                bottom=_out.values(),
                side=_side,
                weak=_weak,
            )
            # line up the main way in and the main way out so the spine runs straight through
            if _in and _out:
                fan = {u: 0 for u in _in}
                for key, e in _eids.items():
                    if key[0] == "in" and e not in _weak:
                        fan[key[1]] += 1
                p_in = _in[max(_in, key=lambda u: fan[u])]
                strong_out = [u for u in _out if not weak_src(u)]
                p_out = _out[strong_out[0] if strong_out else next(iter(_out))]
                mid = (out.x[p_in] + out.x[p_out]) / 2
                out.x[p_in] = out.x[p_out] = mid
            return out

        def label_width(lines: list[str]) -> float:
            return max(_text_width(t, GROUP_LABEL_FONT) for t in lines) * 1.14

        lines = _wrap_group_label(label, GROUP_LABEL_WRAP)
        out = run(lines)
        cw = out.width
        bw = max(cw + 2 * GROUP_PAD_X, label_width(lines) + 2 * 10.0)
        ox = (bw - cw) / 2
        align = "start"
        if in_idx:
            # keep the label clear of the vertical lines of entering edges
            port_xs = [out.x[j] for j in in_idx.values()]
            lw = label_width(lines)
            left = ox + min(port_xs) - 8.0 - 10.0
            right = bw - 10.0 - (ox + max(port_xs) + 8.0)
            if lw > left and lw > right and max(left, right) >= 120.0:
                narrow = _wrap_group_label(label, max(left, right) / 1.14)
                if len(narrow) <= 4 and label_width(narrow) <= max(left, right):
                    if len(narrow) != len(lines):
                        out = run(narrow)
                    lines, lw = narrow, label_width(narrow)
            if lw <= left:
                align = "start"
            elif lw <= right:
                align = "end"
            elif left >= right:  # widen the box on the roomier side
                bw += lw - left
                ox += lw - left
            else:
                bw += lw - right
                align = "end"
        header = len(lines) * GROUP_LABEL_LINE + 10.0
        for key, e in eids.items():
            r = out.routes.get(e)
            if not r:
                continue
            if key[0] == "in":
                px = out.x[in_idx[key[1]]]
                r[0] = (px, r[0][1])
                r.insert(0, (px, 0.0))
            elif key[0] == "out":
                r[-1] = (out.x[out_idx[key[1]]], r[-1][1])
        oy = 0.0 if in_idx else header + 8.0
        bh = out.height + oy
        if not out_idx:
            bh += GROUP_PAD_BOTTOM
        glay[gid] = _GroupLayout(bw, bh, ox, oy, out, idx, in_idx, out_idx, eids, lines, align)

    # ---- top-level layout -----------------------------------------------------------------------
    items: list[tuple[str, Hashable]] = []  # ("n", key) or ("g", gid)
    item_of: dict[Hashable, int] = {}
    gitem: dict[str, int] = {}
    for k in keys:
        gid = group_of[k]
        if gid is None:
            item_of[k] = len(items)
            items.append(("n", k))
        elif gid not in gitem:
            gitem[gid] = len(items)
            items.append(("g", gid))
    for k in keys:
        if group_of[k] is not None:
            item_of[k] = gitem[group_of[k]]
    tw = [info[r].w if t == "n" else glay[r].w for t, r in items]
    th = [info[r].h if t == "n" else glay[r].h for t, r in items]

    def port_off(gid: str, pidx: int) -> float:
        gl = glay[gid]
        return gl.ox + gl.out.x[pidx] - gl.w / 2 if pidx < len(gl.out.x) else 0.0

    top_edges: list[tuple[int, int, int, float, float]] = []
    top_eid: dict[tuple, int] = {}
    top_weak: list[int] = []
    for u, v in cross:
        gu, gv = group_of[u], group_of[v]
        key = (u, item_of[v])
        if key in top_eid:
            continue
        uo = port_off(gu, glay[gu].out_idx[u]) if gu is not None else 0.0
        vo = port_off(gv, glay[gv].in_idx[u]) if gv is not None else 0.0
        top_eid[key] = len(top_edges)
        if weak_src(u) or (gv is None and weak_dst(v)):
            top_weak.append(len(top_edges))
        top_edges.append((len(top_edges), item_of[u], item_of[v], uo, vo))
    top_side = [i for i, (t, r) in enumerate(items) if t == "n" and info[r].category == "param"]
    top = _engine(
        tw,
        th,
        top_edges,
        side=top_side,
        weak=top_weak,
        no_spread=[i for i, (t, _) in enumerate(items) if t == "g"],
    )

    # ---- absolute coordinates -------------------------------------------------------------------
    nodes: dict[Hashable, NodeBox] = {}
    groups: dict[str, GroupBox] = {}
    gorigin: dict[str, Point] = {}
    for i, (t, r) in enumerate(items):
        if t == "n":
            nodes[r] = NodeBox(top.x[i], top.y[i], info[r].w, info[r].h)
        else:
            gl = glay[r]
            x0 = top.x[i] - gl.w / 2
            y0 = top.y[i] - gl.h / 2
            gm = meta.get(r) or {}
            label = str(gm.get("label") or r) if isinstance(gm, dict) else str(r)
            kind = str(gm.get("kind") or "module") if isinstance(gm, dict) else "module"
            groups[r] = GroupBox(
                r, label, kind, x0, y0, gl.w, gl.h, gl.lines, list(members[r]), gl.align
            )
            gorigin[r] = (x0 + gl.ox, y0 + gl.oy)
            for k in members[r]:
                j = gl.idx[k]
                nodes[k] = NodeBox(
                    x0 + gl.ox + gl.out.x[j], y0 + gl.oy + gl.out.y[j], info[k].w, info[k].h
                )

    def internal_route(gid: str, key: tuple) -> list[Point]:
        gl = glay[gid]
        e = gl.eids.get(key)
        if e is None or e not in gl.out.routes:
            return []
        ox, oy = gorigin[gid]
        return [(ox + px, oy + py) for px, py in gl.out.routes[e]]

    routes: list[EdgeRoute] = []
    for gid in group_order:
        for u, v in internal[gid]:
            e = glay[gid].eids[("i", u, v)]
            routes.append(
                EdgeRoute(
                    u,
                    v,
                    _dedupe(internal_route(gid, ("i", u, v))),
                    e in glay[gid].out.reversed_edges,
                )
            )
    for u, v in cross:
        gu, gv = group_of[u], group_of[v]
        pts: list[Point] = []
        if gu is not None:
            pts += internal_route(gu, ("out", u))
        e = top_eid[(u, item_of[v])]
        pts += top.routes.get(e, [])
        if gv is not None:
            pts += internal_route(gv, ("in", u, v))
        routes.append(EdgeRoute(u, v, _dedupe(pts), e in top.reversed_edges))
    for k in self_loops:
        b = nodes[k]
        x1, y1 = b.x + b.w / 2, b.y
        routes.append(
            EdgeRoute(k, k, [(x1, y1 - 4), (x1 + 18, y1 - 4), (x1 + 18, y1 + 4), (x1, y1 + 4)])
        )

    return Layout(nodes, groups, routes, top.width, top.height, info)


def layout(g: nx.DiGraph) -> dict[Hashable, Point]:
    """Node centers ``{node: (x, y)}`` of the layered top-to-bottom layout of ``g``."""
    return compute_layout(g).pos


# --------------------------------------------------------------------------------------------
# SVG
# --------------------------------------------------------------------------------------------


def _xml_ok(ch: str) -> bool:
    o = ord(ch)
    if o < 0x20:
        return ch in "\t\n\r"
    return not (0xD800 <= o <= 0xDFFF or o in (0xFFFE, 0xFFFF))


def _xml(text: object) -> str:
    """Escape for XML text and attribute values; drops characters XML cannot carry."""
    s = str(text)
    if not all(map(_xml_ok, s)):
        s = "".join(ch for ch in s if _xml_ok(ch))
    return (
        s.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#39;")
    )


def _f(v: float) -> str:
    r = round(v, 1)
    if r == int(r):
        return str(int(r))
    return f"{r:.1f}"


def _path_d(points: list[Point]) -> str:
    if not points:
        return ""
    x0, y0 = points[0]
    parts = [f"M{_f(x0)},{_f(y0)}"]
    for x1, y1 in points[1:]:
        if abs(x1 - x0) < 0.5 or y1 <= y0:
            parts.append(f"L{_f(x1)},{_f(y1)}")
        else:
            ym = (y0 + y1) / 2
            parts.append(f"C{_f(x0)},{_f(ym)} {_f(x1)},{_f(ym)} {_f(x1)},{_f(y1)}")
        x0, y0 = x1, y1
    return " ".join(parts)


def _arrow(points: list[Point], size: float = 7.0) -> tuple[str, list[Point]]:
    """Arrowhead polygon at the end of a route, and the route shortened to the arrow's base."""
    (x0, y0), (x1, y1) = points[-2], points[-1]
    if abs(x1 - x0) >= 0.5 and y1 > y0:
        dx, dy = 0.0, 1.0  # cubic arrives vertically
    else:
        dx, dy = x1 - x0, y1 - y0
        n = math.hypot(dx, dy) or 1.0
        dx, dy = dx / n, dy / n
    bx, by = x1 - dx * size, y1 - dy * size
    px, py = -dy * size * 0.45, dx * size * 0.45
    poly = f"{_f(x1)},{_f(y1)} {_f(bx + px)},{_f(by + py)} {_f(bx - px)},{_f(by - py)}"
    short = list(points)
    short[-1] = (x1 - dx * size * 0.6, y1 - dy * size * 0.6)
    return poly, short


def _tooltip(nf: _NodeInfo) -> str:
    rows = [nf.label]
    if nf.target and nf.target != nf.label:
        rows.append(nf.target)
    rows.append(f"op: {nf.op}")
    if nf.module:
        rows.append(f"module: {nf.module}")
    if nf.shape:
        rows.append(f"shape: {nf.shape}")
    if nf.dtype:
        rows.append(f"dtype: {nf.dtype}")
    if nf.count is not None:
        rows.append(f"hidden nodes: {nf.count}")
    if nf.group:
        rows.append(f"group: {nf.group}")
    if nf.status != "unchanged":
        rows.append(f"status: {nf.status}")
    return "\n".join(rows)


def _text(
    x: float,
    y: float,
    s: str,
    *,
    size: float,
    fill: str,
    anchor: str = "middle",
    weight: str = "normal",
    halo: bool = False,
    extra: str = "",
) -> str:
    base = (
        f'x="{_f(x)}" y="{_f(y)}" font-size="{_f(size)}" text-anchor="{anchor}" '
        f'font-weight="{weight}"{extra}'
    )
    out = ""
    if halo:
        out += (
            f'<text {base} fill="#ffffff" stroke="#ffffff" stroke-width="3" '
            f'stroke-linejoin="round" aria-hidden="true">{_xml(s)}</text>'
        )
    out += f'<text {base} fill="{fill}">{_xml(s)}</text>'
    return out


def _counts(g: nx.DiGraph) -> dict[str, int]:
    c = {"nodes": g.number_of_nodes(), "edges": g.number_of_edges(), "hidden": 0}
    for s in STATUS_STYLE:
        c[s] = 0
    gids = set()
    for _, d in g.nodes(data=True):
        s = d.get("status") or "unchanged"
        if s in STATUS_STYLE:
            c[s] += 1
        if d.get("group"):
            gids.add(str(d["group"]))
        if d.get("op") == "collapsed" and d.get("count"):
            try:
                c["hidden"] += int(d["count"])
            except (TypeError, ValueError):
                pass
    c["groups"] = len(gids)
    return c


def _legend_entries(lay: Layout) -> list[tuple[str, str, str, str, str]]:
    """(kind, fill, stroke, dash, text) for the categories / statuses / group kinds shown."""
    cats_present = {nf.category for nf in lay.info.values()}
    entries = []
    for cat, (fill, stroke, _, text) in CATEGORY_STYLE.items():
        if cat in cats_present or cat in ("input", "compute", "matmul", "output"):
            entries.append(("node", fill, stroke, "", text))
    for _st, (stroke, tint, dash, _, text) in STATUS_STYLE.items():
        entries.append(("status", tint, stroke, dash, text))
    for kind in sorted({gb.kind for gb in lay.groups.values()}):
        fill, stroke, _ = _group_style(kind)
        entries.append(("group", fill, stroke, "", f"{kind} block"))
    return entries


def _legend_svg(lay: Layout, max_w: float) -> tuple[str, float, float]:
    parts: list[str] = []
    x = y = 0.0
    row_h = 20.0
    used_w = 0.0
    for kind, fill, stroke, dash, text in _legend_entries(lay):
        item_w = 26 + _text_width(text, 11) + 16
        if x > 0 and x + item_w > max_w:
            x = 0.0
            y += row_h
        da = f' stroke-dasharray="{dash}"' if dash else ""
        if kind == "group":
            parts.append(
                f'<rect x="{_f(x)}" y="{_f(y + 2)}" width="20" height="14" rx="5" '
                f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>'
            )
        elif kind == "status":
            parts.append(
                f'<rect x="{_f(x)}" y="{_f(y + 3)}" width="20" height="12" rx="3" '
                f'fill="{fill}" stroke="{stroke}" stroke-width="2.2"{da}/>'
            )
        else:
            parts.append(
                f'<rect x="{_f(x)}" y="{_f(y + 3)}" width="20" height="12" rx="3" '
                f'fill="{fill}" stroke="{stroke}" stroke-width="1.2"/>'
            )
        parts.append(_text(x + 26, y + 13, text, size=11, fill="#334155", anchor="start"))
        x += item_w
        used_w = max(used_w, x)
    return "".join(parts), used_w, y + row_h


def _edge_style(lay: Layout, r: EdgeRoute) -> tuple[str, str, float]:
    su = lay.info[r.u].status
    sv = lay.info[r.v].status
    if "removed" in (su, sv):
        return STATUS_STYLE["removed"][0], "5 3", 1.4
    if "added" in (su, sv):
        return STATUS_STYLE["added"][0], "", 1.4
    if lay.info[r.u].category == "param":
        return EDGE_PARAM_COLOR, "", 1.1
    return EDGE_COLOR, "", 1.3


def _graph_svg(g: nx.DiGraph, lay: Layout) -> str:
    """The drawing of groups, edges and nodes in layout coordinates."""
    out: list[str] = []
    # groups
    out.append('<g class="groups">')
    for gb in lay.groups.values():
        fill, stroke, _ = _group_style(gb.kind)
        out.append(
            f'<g class="group" data-group="{_xml(gb.gid)}"><title>{_xml(gb.label)}</title>'
            f'<rect class="group-box" x="{_f(gb.x)}" y="{_f(gb.y)}" width="{_f(gb.w)}" '
            f'height="{_f(gb.h)}" rx="12" ry="12" fill="{fill}" stroke="{stroke}" '
            f'stroke-width="1.5"/></g>'
        )
    out.append("</g>")
    # edges
    out.append('<g class="edges" fill="none">')
    for r in lay.edges:
        if len(r.points) < 2:
            continue
        color, dash, width = _edge_style(lay, r)
        poly, pts = _arrow(r.points)
        da = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<g class="edge"><path d="{_path_d(pts)}" stroke="{color}" '
            f'stroke-width="{_f(width)}"{da}/>'
            f'<polygon points="{poly}" fill="{color}" stroke="none"/></g>'
        )
    out.append("</g>")
    # group labels (above edges, with a halo)
    out.append('<g class="group-labels">')
    for gb in lay.groups.values():
        _, _, tcol = _group_style(gb.kind)
        for i, line in enumerate(gb.lines):
            out.append(
                _text(
                    gb.x + 10 if gb.align == "start" else gb.x + gb.w - 10,
                    gb.y + 16 + i * GROUP_LABEL_LINE,
                    line,
                    size=GROUP_LABEL_FONT,
                    fill=tcol,
                    anchor=gb.align,
                    weight="bold" if i == 0 else "normal",
                    halo=True,
                )
            )
    out.append("</g>")
    # nodes
    out.append('<g class="nodes">')
    for i, (k, b) in enumerate(lay.nodes.items()):
        nf = lay.info[k]
        fill, stroke, tcol, _ = CATEGORY_STYLE[nf.category]
        x0, y0 = b.x - b.w / 2, b.y - b.h / 2
        rx = b.h / 2 if nf.category in ("input", "output") else (3 if nf.category == "param" else 6)
        sw = 1.6 if nf.category in ("matmul", "fp8", "attention", "output", "input") else 1.0
        dash = ' stroke-dasharray="4 2"' if nf.category == "collapsed" else ""
        parts = [
            f'<g class="node" id="n{i}" data-node="{_xml(k)}" data-op="{_xml(nf.op)}" '
            f'data-status="{nf.status}"><title>{_xml(_tooltip(nf))}</title>'
        ]
        if nf.category == "collapsed":
            for d in (6, 3):
                parts.append(
                    f'<rect x="{_f(x0 + d)}" y="{_f(y0 - d)}" width="{_f(b.w)}" '
                    f'height="{_f(b.h)}" rx="{_f(rx)}" fill="{fill}" stroke="{stroke}" '
                    f'stroke-width="0.8"/>'
                )
        if nf.status in STATUS_STYLE:
            scol, tint, sdash, badge, _ = STATUS_STYLE[nf.status]
            sda = f' stroke-dasharray="{sdash}"' if sdash else ""
            parts.append(
                f'<rect class="status-ring" x="{_f(x0 - 3.5)}" y="{_f(y0 - 3.5)}" '
                f'width="{_f(b.w + 7)}" height="{_f(b.h + 7)}" rx="{_f(rx + 3)}" '
                f'fill="{tint}" stroke="{scol}" stroke-width="2.2"{sda}/>'
            )
        parts.append(
            f'<rect class="box" x="{_f(x0)}" y="{_f(y0)}" width="{_f(b.w)}" height="{_f(b.h)}" '
            f'rx="{_f(rx)}" fill="{fill}" stroke="{stroke}" stroke-width="{_f(sw)}"{dash}/>'
        )
        lines = nf.lines
        if len(lines) == 1:
            t, s = lines[0]
            ys = [b.y + s * 0.36]
        else:
            ys = [b.y - 4.5, b.y + 11.5]
        for j, ((t, s), ty) in enumerate(zip(lines, ys, strict=False)):
            weight = "bold" if j == 0 and nf.category in _BOLD_CATEGORIES else "normal"
            color = tcol if j == 0 else "#64748b"
            extra = ""
            if nf.status == "removed" and j == 0:
                extra = ' text-decoration="line-through"'
            parts.append(_text(b.x, ty, t, size=s, fill=color, weight=weight, extra=extra))
        if nf.status in STATUS_STYLE:
            scol, _, _, badge, _ = STATUS_STYLE[nf.status]
            bx, by = x0 + b.w + 1, y0 - 1
            parts.append(
                f'<circle cx="{_f(bx)}" cy="{_f(by)}" r="6.5" fill="{scol}"/>'
                + _text(bx, by + 3.6, badge, size=10.5, fill="#ffffff", weight="bold")
            )
        parts.append("</g>")
        out.append("".join(parts))
    out.append("</g>")
    return "\n".join(out)


def _svg_document(
    g: nx.DiGraph,
    lay: Layout,
    title: str,
    *,
    header: bool = True,
) -> str:
    c = _counts(g)
    gw, gh = lay.width, lay.height
    parts: list[str] = []
    top = MARGIN
    width = gw + 2 * MARGIN
    if header:
        legend_max = max(gw, 620.0)
        legend, lw, lh = _legend_svg(lay, legend_max)
        title_w = _text_width(title, 16) * 1.05
        width = max(width, lw + 2 * MARGIN, title_w + 2 * MARGIN)
        parts.append(
            _text(
                MARGIN, MARGIN + 14, title, size=16, fill="#0f172a", anchor="start", weight="bold"
            )
        )
        parts.append(
            _text(
                MARGIN,
                MARGIN + 32,
                _summary(c),
                size=11,
                fill="#475569",
                anchor="start",
            )
        )
        parts.append(f'<g class="legend" transform="translate({_f(MARGIN)},{_f(MARGIN + 44)})">')
        parts.append(legend)
        parts.append("</g>")
        top = MARGIN + 44 + lh + 18
    height = top + gh + MARGIN
    gx = (width - gw) / 2
    body = (
        _graph_svg(g, lay)
        if lay.nodes
        else _text(gw / 2, 20, "(empty graph)", size=12, fill="#64748b")
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{_f(width)}" '
        f'height="{_f(height)}" viewBox="0 0 {_f(width)} {_f(height)}" '
        f'font-family="{_xml(FONT_FAMILY)}" role="img" aria-label="{_xml(title)}">\n'
        f"<title>{_xml(title)}</title>\n"
        f'<rect class="background" x="0" y="0" width="{_f(width)}" height="{_f(height)}" '
        f'fill="#ffffff"/>\n'
        + "\n".join(parts)
        + f'\n<g class="graph" transform="translate({_f(gx)},{_f(top)})">\n'
        + body
        + "\n</g>\n</svg>\n"
    )


def _summary(c: dict[str, int]) -> str:
    s = f"{c['nodes']} nodes"
    if c["hidden"]:
        s += f" (+{c['hidden']} hidden)"
    s += f" · {c['edges']} edges · {c['groups']} groups"
    s += f" · {c['added']} added · {c['removed']} removed · {c['changed']} changed"
    return s


def _title(g: nx.DiGraph, title: str | None) -> str:
    return str(title or g.graph.get("title") or "computation graph")


def render_svg(g: nx.DiGraph, *, title: str | None = None) -> str:
    """A standalone SVG picture of ``g`` (title, counts, legend, groups, nodes, edges)."""
    return _svg_document(g, compute_layout(g), _title(g, title), header=True)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_HTML_CSS = """
*{box-sizing:border-box}
html,body{margin:0;height:100%;font-family:'DejaVu Sans',Verdana,'Segoe UI',Helvetica,Arial,
sans-serif;color:#0f172a;background:#f8fafc}
body{display:flex;flex-direction:column}
header{padding:10px 16px;background:#fff;border-bottom:1px solid #e2e8f0;
display:flex;flex-wrap:wrap;align-items:center;gap:6px 18px}
h1{font-size:17px;margin:0}
.counts{font-size:12px;color:#475569}
.counts b{color:#0f172a}
.counts .added{color:#16a34a}.counts .removed{color:#dc2626}.counts .changed{color:#ea580c}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:11px;color:#334155;width:100%}
.legend span{display:inline-flex;align-items:center;gap:6px}
.legend i{display:inline-block;width:20px;height:12px;border-radius:3px;border:1.5px solid}
.legend i.group{border-radius:5px;height:14px}
.controls{margin-left:auto;display:flex;gap:6px}
button{font:inherit;font-size:12px;padding:3px 10px;border:1px solid #cbd5e1;
border-radius:6px;background:#fff;cursor:pointer}
button:hover{background:#f1f5f9}
#viewport{flex:1;overflow:hidden;position:relative;cursor:grab;background:#fff}
#viewport.dragging{cursor:grabbing}
#viewport svg{position:absolute;left:0;top:0;width:100%;height:100%;user-select:none}
.hint{font-size:11px;color:#94a3b8}
"""

_HTML_JS = """
(function(){
  var vp=document.getElementById('viewport'), svg=vp.querySelector('svg');
  var W=parseFloat(svg.getAttribute('width')), H=parseFloat(svg.getAttribute('height'));
  svg.removeAttribute('width'); svg.removeAttribute('height');
  svg.setAttribute('preserveAspectRatio','none');
  var s=1, tx=0, ty=0;
  function apply(){
    var cw=vp.clientWidth||1, ch=vp.clientHeight||1;
    svg.setAttribute('viewBox',tx+' '+ty+' '+(cw/s)+' '+(ch/s));
  }
  function fit(){
    var cw=vp.clientWidth||1, ch=vp.clientHeight||1;
    s=Math.min(cw/W, ch/H); tx=-(cw/s-W)/2; ty=-(ch/s-H)/2; apply();
  }
  function fitWidth(){
    var cw=vp.clientWidth||1;
    s=Math.min(cw/W, 1); tx=-(cw/s-W)/2; ty=0; apply();
  }
  function actual(){
    var cw=vp.clientWidth||1; s=1; tx=-(cw-W)/2; ty=0; apply();
  }
  function zoomAt(f, cx, cy){
    var r=vp.getBoundingClientRect(), px=cx-r.left, py=cy-r.top;
    var sx=tx+px/s, sy=ty+py/s;
    s=Math.max(0.02, Math.min(8, s*f)); tx=sx-px/s; ty=sy-py/s; apply();
  }
  vp.addEventListener('wheel', function(e){
    e.preventDefault();
    var d=e.deltaMode===1?e.deltaY*16:e.deltaY;
    zoomAt(Math.exp(-d*0.0015), e.clientX, e.clientY);
  }, {passive:false});
  var drag=null;
  vp.addEventListener('pointerdown', function(e){
    if(e.button!==0) return;
    drag={x:e.clientX, y:e.clientY, tx:tx, ty:ty};
    vp.classList.add('dragging'); vp.setPointerCapture(e.pointerId);
  });
  vp.addEventListener('pointermove', function(e){
    if(!drag) return;
    tx=drag.tx-(e.clientX-drag.x)/s; ty=drag.ty-(e.clientY-drag.y)/s; apply();
  });
  function end(){ drag=null; vp.classList.remove('dragging'); }
  vp.addEventListener('pointerup', end); vp.addEventListener('pointercancel', end);
  document.getElementById('fit').onclick=fit;
  document.getElementById('fitw').onclick=fitWidth;
  document.getElementById('one').onclick=actual;
  window.addEventListener('keydown', function(e){
    if(e.target.tagName==='INPUT') return;
    if(e.key==='f') fit(); else if(e.key==='w') fitWidth(); else if(e.key==='1') actual();
    else if(e.key==='+'||e.key==='=') zoomAt(1.25, innerWidth/2, innerHeight/2);
    else if(e.key==='-') zoomAt(0.8, innerWidth/2, innerHeight/2);
  });
  window.addEventListener('resize', apply);
  if(Math.min((vp.clientWidth||1)/W, (vp.clientHeight||1)/H) >= 0.5) fit(); else fitWidth();
})();
"""


def _legend_html(lay: Layout) -> str:
    items = []
    for kind, fill, stroke, dash, text in _legend_entries(lay):
        style = f"background:{fill};border-color:{stroke}"
        if dash:
            style += ";border-style:dashed"
        if kind == "status":
            style += ";border-width:2px"
        cls = ' class="group"' if kind == "group" else ""
        items.append(f'<span><i{cls} style="{style}"></i>{_xml(text)}</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


def render_html(g: nx.DiGraph, *, title: str | None = None) -> str:
    """A self-contained HTML page: header (title, counts, legend) and the SVG with pan / zoom."""
    t = _title(g, title)
    lay = compute_layout(g)
    c = _counts(g)
    svg = _svg_document(g, lay, t, header=False)
    hidden = f" (+{c['hidden']} hidden)" if c["hidden"] else ""
    counts = (
        f'<span class="counts"><b>{c["nodes"]}</b> nodes{hidden} · <b>{c["edges"]}</b> edges · '
        f'<b>{c["groups"]}</b> groups · <span class="added"><b>{c["added"]}</b> added</span> · '
        f'<span class="removed"><b>{c["removed"]}</b> removed</span> · '
        f'<span class="changed"><b>{c["changed"]}</b> changed</span></span>'
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_xml(t)}</title>\n<style>{_HTML_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{_xml(t)}</h1>{counts}"
        '<span class="controls"><span class="hint">wheel: zoom · drag: pan</span>'
        '<button id="fit" title="whole graph (f)">Fit</button>'
        '<button id="fitw" title="fit width (w)">Width</button>'
        '<button id="one" title="actual size (1)">1:1</button></span>'
        f"{_legend_html(lay)}</header>\n"
        f'<div id="viewport">\n{svg}</div>\n'
        f"<script>{_HTML_JS}</script>\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def write_picture(
    g: nx.DiGraph, path: str | os.PathLike[str], *, title: str | None = None
) -> pathlib.Path:
    """Write ``g`` as ``.svg`` or ``.html``/``.htm`` (by suffix), atomically; returns the path."""
    p = pathlib.Path(path)
    suffix = p.suffix.lower()
    if suffix == ".svg":
        text = render_svg(g, title=title)
    elif suffix in (".html", ".htm"):
        text = render_html(g, title=title)
    else:
        raise ValueError(
            f"write_picture: unsupported suffix {p.suffix!r} for {str(p)!r} "
            "(use .svg, .html or .htm)"
        )
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


# --------------------------------------------------------------------------------------------
# an example
# --------------------------------------------------------------------------------------------


def example_graph(n_layers: int = 2, *, moe_layers: Iterable[int] = (1,)) -> nx.DiGraph:
    """A small transformer-like graph (embedding, attention, GLU FFN / MoE) for demos and tests.

    Layers listed in ``moe_layers`` show an FFN -> MoE rewrite: the dense projections are
    ``removed``, the router / experts are ``added``, and the attention output projection is
    ``changed`` to FP8.
    """
    moe_layers = set(moe_layers)
    g = nx.DiGraph()
    g.graph["title"] = f"toy transformer · {n_layers} layers"
    groups: dict[str, dict] = {}
    g.graph["groups"] = groups
    d, f_ = 64, 172

    def node(name, label, op="call_function", target="", module="", group=None, **kw):
        g.add_node(
            name,
            label=label,
            op=op,
            target=target or label,
            module=module,
            group=group,
            status=kw.pop("status", "unchanged"),
            **kw,
        )
        return name

    def fn(name, label, target, inputs, module="", group=None, **kw):
        node(name, label, "call_function", target, module, group, **kw)
        for i in inputs:
            g.add_edge(i, name)
        return name

    def param(name, module, group=None, **kw):
        return node(
            name,
            name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1],
            "get_attr",
            name,
            module,
            group,
            **kw,
        )

    act = "(s0, s1, 64)"
    x = node(
        "input_ids", "input_ids", "placeholder", "input_ids", shape="(s0, s1)", dtype="torch.int64"
    )
    emb_w = param("model.embed_tokens.weight", "model.embed_tokens")
    h = fn(
        "embedding",
        "embedding",
        "aten.embedding.default",
        [emb_w, x],
        "model.embed_tokens",
        shape=act,
        dtype="torch.float32",
    )
    for i in range(n_layers):
        pre = f"model.layers.{i}"
        ag = f"attn{i}"
        groups[ag] = {"label": f"attention {i} · {pre}.self_attn", "kind": "attention"}
        n1w = param(f"{pre}.input_layernorm.weight", f"{pre}.input_layernorm")
        n1 = fn(
            f"rms_norm_{i}a",
            "rms_norm",
            "aten.rms_norm.default",
            [h, n1w],
            f"{pre}.input_layernorm",
            shape=act,
        )
        qkv = []
        for p in "qkv":
            w_ = param(f"{pre}.self_attn.{p}_proj.weight", f"{pre}.self_attn.{p}_proj", ag)
            lin = fn(
                f"{p}_proj_{i}",
                "linear",
                "aten.linear.default",
                [n1, w_],
                f"{pre}.self_attn.{p}_proj",
                ag,
                shape=act,
            )
            vw = fn(
                f"{p}_view_{i}",
                "view",
                "aten.view.default",
                [lin],
                f"{pre}.self_attn",
                ag,
                shape="(s0, s1, 4, 16)",
            )
            qkv.append(vw)
        att = fn(
            f"sdpa_{i}",
            "scaled_dot_product_attention",
            "aten.scaled_dot_product_attention.default",
            qkv,
            f"{pre}.self_attn",
            ag,
            shape="(s0, 4, s1, 16)",
        )
        rs = fn(
            f"attn_reshape_{i}",
            "reshape",
            "aten.reshape.default",
            [att],
            f"{pre}.self_attn",
            ag,
            shape=act,
        )
        ow = param(f"{pre}.self_attn.o_proj.weight", f"{pre}.self_attn.o_proj", ag)
        if i in moe_layers:
            o = fn(
                f"o_proj_{i}",
                "fp8_linear",
                "rewriter.fp8_linear",
                [rs, ow],
                f"{pre}.self_attn.o_proj",
                ag,
                shape=act,
                status="changed",
            )
        else:
            o = fn(
                f"o_proj_{i}",
                "linear",
                "aten.linear.default",
                [rs, ow],
                f"{pre}.self_attn.o_proj",
                ag,
                shape=act,
            )
        h = fn(f"add_{i}a", "add", "aten.add.Tensor", [h, o], pre, shape=act)
        n2w = param(f"{pre}.post_attention_layernorm.weight", f"{pre}.post_attention_layernorm")
        n2 = fn(
            f"rms_norm_{i}b",
            "rms_norm",
            "aten.rms_norm.default",
            [h, n2w],
            f"{pre}.post_attention_layernorm",
            shape=act,
        )
        mlp = f"{pre}.mlp"
        if i not in moe_layers:
            fg = f"ffn{i}"
            groups[fg] = {"label": f"FFN {i} · {mlp} · GLU/silu · {d}→{f_}→{d}", "kind": "ffn"}
            gw = param(f"{mlp}.gate_proj.weight", f"{mlp}.gate_proj", fg)
            gate = fn(
                f"gate_proj_{i}",
                "linear",
                "aten.linear.default",
                [n2, gw],
                f"{mlp}.gate_proj",
                fg,
                shape=f"(s0, s1, {f_})",
            )
            silu = fn(
                f"silu_{i}",
                "silu",
                "aten.silu.default",
                [gate],
                f"{mlp}.act_fn",
                fg,
                shape=f"(s0, s1, {f_})",
            )
            uw = param(f"{mlp}.up_proj.weight", f"{mlp}.up_proj", fg)
            upp = fn(
                f"up_proj_{i}",
                "linear",
                "aten.linear.default",
                [n2, uw],
                f"{mlp}.up_proj",
                fg,
                shape=f"(s0, s1, {f_})",
            )
            mul = fn(
                f"mul_{i}", "mul", "aten.mul.Tensor", [silu, upp], mlp, fg, shape=f"(s0, s1, {f_})"
            )
            dw = param(f"{mlp}.down_proj.weight", f"{mlp}.down_proj", fg)
            out = fn(
                f"down_proj_{i}",
                "linear",
                "aten.linear.default",
                [mul, dw],
                f"{mlp}.down_proj",
                fg,
                shape=act,
            )
        else:
            fg = f"moe{i}"
            groups[fg] = {
                "label": f"MoE {i} · {mlp} · 1 shared + 8 routed experts, top-2 · FP8",
                "kind": "moe",
            }
            st = {"status": "removed"}
            gw = param(f"{mlp}.gate_proj.weight", f"{mlp}.gate_proj", fg, **st)
            gate = fn(
                f"gate_proj_{i}",
                "linear",
                "aten.linear.default",
                [n2, gw],
                f"{mlp}.gate_proj",
                fg,
                shape=f"(s0, s1, {f_})",
                **st,
            )
            silu = fn(f"silu_{i}", "silu", "aten.silu.default", [gate], f"{mlp}.act_fn", fg, **st)
            uw = param(f"{mlp}.up_proj.weight", f"{mlp}.up_proj", fg, **st)
            upp = fn(
                f"up_proj_{i}",
                "linear",
                "aten.linear.default",
                [n2, uw],
                f"{mlp}.up_proj",
                fg,
                shape=f"(s0, s1, {f_})",
                **st,
            )
            mul = fn(f"mul_{i}", "mul", "aten.mul.Tensor", [silu, upp], mlp, fg, **st)
            dw = param(f"{mlp}.down_proj.weight", f"{mlp}.down_proj", fg, **st)
            dense = fn(
                f"down_proj_{i}",
                "linear",
                "aten.linear.default",
                [mul, dw],
                f"{mlp}.down_proj",
                fg,
                shape=act,
                **st,
            )
            ad = {"status": "added"}
            q = fn(
                f"quant_{i}",
                "quantize_fp8",
                "rewriter.quantize_fp8",
                [n2],
                mlp,
                fg,
                shape=act,
                dtype="torch.float8_e4m3fn",
                **ad,
            )
            rw = param(f"{mlp}.router.weight", f"{mlp}.router", fg, **ad)
            router = fn(
                f"router_{i}",
                "linear",
                "aten.linear.default",
                [n2, rw],
                f"{mlp}.router",
                fg,
                shape="(s0, s1, 8)",
                **ad,
            )
            sm = fn(
                f"softmax_{i}", "softmax", "aten.softmax.int", [router], f"{mlp}.router", fg, **ad
            )
            tk = fn(
                f"topk_{i}",
                "topk",
                "aten.topk.default",
                [sm],
                f"{mlp}.router",
                fg,
                shape="(s0, s1, 2)",
                **ad,
            )
            sh = fn(
                f"shared_{i}",
                "fp8_linear",
                "rewriter.fp8_linear",
                [q],
                f"{mlp}.shared_expert",
                fg,
                shape=act,
                **ad,
            )
            node(
                f"experts_{i}",
                "routed experts ×8",
                "collapsed",
                "experts",
                f"{mlp}.experts",
                fg,
                count=48,
                status="added",
            )
            g.add_edge(q, f"experts_{i}")
            g.add_edge(tk, f"experts_{i}")
            out = fn(
                f"combine_{i}",
                "add",
                "aten.add.Tensor",
                [sh, f"experts_{i}"],
                mlp,
                fg,
                shape=act,
                **ad,
            )
            g.add_edge(dense, f"add_{i}b")
        h = fn(f"add_{i}b", "add", "aten.add.Tensor", [h, out], pre, shape=act)
    nw = param("model.norm.weight", "model.norm")
    hn = fn("final_norm", "rms_norm", "aten.rms_norm.default", [h, nw], "model.norm", shape=act)
    lw = param("lm_head.weight", "lm_head")
    logits = fn(
        "lm_head", "linear", "aten.linear.default", [hn, lw], "lm_head", shape="(s0, s1, 49152)"
    )
    node("output", "output", "output", "output")
    g.add_edge(logits, "output")
    return g
