"""The picture's layout: every group laid out on its own, then placed as one box.

Each group (an FFN / MoE / attention block) is laid out by :func:`.layered.place` with virtual
"ports" where edges enter at its top and leave at its bottom; the top-level graph then treats
the group as one big box, so group boxes never overlap each other or foreign nodes. Edges that
cross a group's border are stitched from three pieces: inside the source group, between the
boxes, inside the target group.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import networkx as nx

from .layered import Placed, place
from .style import (
    GROUP_LABEL_FONT,
    GROUP_LABEL_LINE,
    GROUP_LABEL_WRAP,
    GROUP_PAD_BOTTOM,
    GROUP_PAD_X,
    PORT_W,
    NodeInfo,
    Point,
    node_info,
    text_width,
    wrap_group_label,
)

__all__ = ["EdgeRoute", "GroupBox", "Layout", "NodeBox", "compute_layout", "layout"]

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
    info: dict[Hashable, NodeInfo] = field(repr=False, default_factory=dict)

    @property
    def pos(self) -> dict[Hashable, Point]:
        return {k: (b.x, b.y) for k, b in self.nodes.items()}



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
    out: Placed
    idx: dict[Hashable, int]  # member -> engine id
    in_idx: dict[Hashable, int]  # outside source -> in-port id
    out_idx: dict[Hashable, int]  # member feeding the outside -> out-port id
    eids: dict[tuple, int]  # ("i", u, v) | ("in", u, v) | ("out", u) -> edge id
    lines: list[str]
    align: str


def compute_layout(g: nx.DiGraph) -> Layout:
    """Full layout of ``g``: node boxes, group boxes and edge polylines."""
    keys = list(g.nodes)
    info = {k: node_info(k, g.nodes[k]) for k in keys}
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

        def run(
            lines: list[str],
            _heights=heights,
            _widths=widths,
            _edges=edges,
            _weak=weak,
            _in=in_idx,
            _out=out_idx,
            _eids=eids,
        ) -> Placed:
            header = len(lines) * GROUP_LABEL_LINE + 10.0
            for j in _in.values():
                _heights[j] = header  # in-edges drop vertically through the label header
            out = place(_widths, _heights, _edges, top=_in.values(), bottom=_out.values())
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
            return max(text_width(t, GROUP_LABEL_FONT) for t in lines) * 1.14

        lines = wrap_group_label(label, GROUP_LABEL_WRAP)
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
                narrow = wrap_group_label(label, max(left, right) / 1.14)
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
    top = place(tw, th, top_edges)

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

