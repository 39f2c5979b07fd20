"""A layered (Sugiyama) placement of boxes of different sizes, built on igraph.

igraph does the parts of a layered layout that are hard to get right: breaking cycles (Eades-Lin-
Smyth feedback arc set), ordering each layer to reduce crossings (barycenter sweeps) and placing
dummy vertices on edges that span several layers (``Graph.layout_sugiyama``). This module only
picks the layers (longest path, with pure sources pulled down next to their first consumer, and
optional pinned top / bottom rows), lets long edges from one point share a trunk (edge
concentration, as extra thin vertices igraph orders like any other), turns igraph's unit grid into
pixels for boxes of different widths and heights (least-squares packing per layer), and returns
each edge as a polyline through its dummy points.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import igraph

from .style import DUMMY_GAP, DUMMY_W, LAYER_GAP, NODE_GAP, Point

__all__ = ["Placed", "place"]

# (edge id, source box, target box, x offset of the edge's start, x offset of its end)
Edge = tuple[int, int, int, float, float]


@dataclass
class Placed:
    """Box centers ``x``/``y`` (px), layer per box, routes per edge id, overall size (px)."""

    x: list[float]
    y: list[float]
    layer: list[int]
    routes: dict[int, list[Point]]
    width: float
    height: float
    reversed_edges: set[int]


def _layers(n: int, dag: list[tuple[int, int]], top: set[int], bottom: set[int]) -> list[int]:
    """Longest-path layers of an acyclic edge list; sources feeding later layers move down."""
    g = igraph.Graph(n=n, edges=dag, directed=True)
    order = g.topological_sorting(mode="out")
    preds = g.get_adjlist(mode="in")
    succs = g.get_adjlist(mode="out")
    layer = [0] * n
    for v in order:
        if v in bottom:
            continue
        for u in preds[v]:
            if u not in bottom:
                layer[v] = max(layer[v], layer[u] + 1)
    for v in reversed(order):  # a weight or an input sits just above its first consumer
        if not preds[v] and succs[v] and v not in top:
            layer[v] = max(0, min(layer[w] for w in succs[v]) - 1)
    if top:
        layer = [0 if v in top else layer[v] + 1 for v in range(n)]
    if bottom:
        last = max((layer[v] for v in range(n) if v not in bottom), default=0) + 1
        for v in bottom:
            layer[v] = last
    return layer


def _pack(targets: Sequence[float], seps: Sequence[float]) -> list[float]:
    """Positions closest (least squares) to ``targets`` with ``x[i+1] - x[i] >= seps[i]``.

    Pool-adjacent-violators on ``x[i] - offset[i]``: the exact isotonic fit, O(n).
    """
    offs = [0.0]
    for s in seps:
        offs.append(offs[-1] + s)
    blocks: list[list[float]] = []  # [mean, count]
    for t, o in zip(targets, offs):
        blocks.append([t - o, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    out: list[float] = []
    for m, c in blocks:
        out.extend([m] * int(c))
    return [y + o for y, o in zip(out, offs)]


def place(
    widths: Sequence[float],
    heights: Sequence[float],
    edges: Iterable[Edge],
    *,
    top: Iterable[int] = (),
    bottom: Iterable[int] = (),
) -> Placed:
    """Place ``len(widths)`` boxes (px) in layers, top to bottom, every edge pointing down.

    ``edges``: ``(id, a, b, a_off, b_off)``, ``b`` consumes ``a``; the route leaves ``a``'s bottom
    at ``x[a] + a_off`` and enters ``b``'s top at ``x[b] + b_off``. ``top`` / ``bottom``: boxes
    pinned to the first / last layer (ports of a group). Self loops get no route; edges that
    close a cycle are laid out reversed and listed in ``reversed_edges``.
    """
    n = len(widths)
    edges = [e for e in edges if e[1] != e[2]]
    top, bottom = set(top), set(bottom)
    if n == 0:
        return Placed([], [], [], {}, 0.0, 0.0, set())
    g = igraph.Graph(n=n, edges=[(a, b) for _, a, b, _, _ in edges], directed=True)
    flipped = set(g.feedback_arc_set(method="eades")) if not g.is_dag() else set()
    dag = [(b, a) if i in flipped else (a, b) for i, (_, a, b, _, _) in enumerate(edges)]
    layer = _layers(n, dag, top, bottom)
    offs = [(b_o, a_o) if i in flipped else (a_o, b_o)
            for i, (_, _, _, a_o, b_o) in enumerate(edges)]

    # edge concentration: long edges leaving one point (rotary tables, masks broadcast to every
    # layer) share a trunk of thin vertices, one per layer, and branch off where they end
    vlayer = list(layer)
    long_from: dict[tuple[int, float], list[int]] = {}
    for i, (a, b) in enumerate(dag):
        if layer[b] - layer[a] > 1:
            long_from.setdefault((a, offs[i][0]), []).append(i)
    ig_edges: list[tuple[int, int]] = []
    chains: dict[int, list[int]] = {}  # edge index -> the trunk vertices it runs through
    for (a, _), idxs in long_from.items():
        if len(idxs) < 2:
            continue
        trunk, prev = {}, a
        for lv in range(layer[a] + 1, max(layer[dag[i][1]] for i in idxs)):
            trunk[lv] = len(vlayer)
            vlayer.append(lv)
            ig_edges.append((prev, trunk[lv]))
            prev = trunk[lv]
        for i in idxs:
            chains[i] = [trunk[lv] for lv in range(layer[a] + 1, layer[dag[i][1]])]
    last_hop = {}
    for i, (a, b) in enumerate(dag):
        last_hop[i] = len(ig_edges)
        ig_edges.append((chains[i][-1] if i in chains else a, b))
    total = len(vlayer)
    sug = igraph.Graph(n=total, edges=ig_edges, directed=True).layout_sugiyama(
        layers=vlayer, hgap=1, vgap=1, maxiter=200
    )
    routing = sug.edge_routing

    # every layer as (unit x, width, vertex id or ("d", igraph edge, k)) items, packed to pixels
    n_layers = max(vlayer) + 1
    rows: list[list[tuple[float, float, object]]] = [[] for _ in range(n_layers)]
    for v in range(total):
        rows[vlayer[v]].append((sug[v][0], widths[v] if v < n else DUMMY_W, v))
    dummies: dict[int, list[int]] = {}
    for e, pts in enumerate(routing):
        for k, (px, py) in enumerate(pts):
            rows[int(round(py))].append((px, DUMMY_W, ("d", e, k)))
            dummies.setdefault(e, []).append(int(round(py)))

    def thin(ref: object) -> bool:
        return isinstance(ref, tuple) or ref >= n

    real = [w for w in widths if w > DUMMY_W] or [DUMMY_W]
    unit = min(statistics.median(real) / 2 + NODE_GAP, 2 * (DUMMY_W + DUMMY_GAP))
    xs: list[float] = [0.0] * total
    dx: dict[tuple[int, int], float] = {}
    for row in rows:
        row.sort(key=lambda it: (it[0], thin(it[2])))
        seps = []
        for (_, wa, ra), (_, wb, rb) in zip(row, row[1:]):
            seps.append((wa + wb) / 2 + (DUMMY_GAP if thin(ra) or thin(rb) else NODE_GAP))
        for (_, _, ref), px in zip(row, _pack([it[0] * unit for it in row], seps)):
            if isinstance(ref, tuple):
                dx[(ref[1], ref[2])] = px
            else:
                xs[ref] = px
    half = [widths[v] / 2 if v < n else DUMMY_W / 2 for v in range(total)]
    left = min([xs[v] - half[v] for v in range(total)] + [p - DUMMY_W / 2 for p in dx.values()])
    right = max([xs[v] + half[v] for v in range(total)] + [p + DUMMY_W / 2 for p in dx.values()])
    xs = [x - left for x in xs]
    dx = {k: p - left for k, p in dx.items()}

    # y: each layer as tall as its tallest box
    tall = [0.0] * n_layers
    for v in range(n):
        tall[layer[v]] = max(tall[layer[v]], heights[v])
    center, y = [], 0.0
    for h in tall:
        center.append(y + h / 2)
        y += h + LAYER_GAP
    height = y - LAYER_GAP
    ys = [center[layer[v]] for v in range(n)]

    def through(px: float, lv: int) -> list[Point]:
        return [(px, center[lv] - tall[lv] / 2), (px, center[lv] + tall[lv] / 2)]

    routes: dict[int, list[Point]] = {}
    rev: set[int] = set()
    for i, (eid, *_) in enumerate(edges):
        (a, b), (a_off, b_off) = dag[i], offs[i]
        pts = [(xs[a] + a_off, ys[a] + heights[a] / 2)]
        for v in chains.get(i, []):
            pts += through(xs[v], vlayer[v])
        e = last_hop[i]
        for k, lv in enumerate(dummies.get(e, [])):
            pts += through(dx[(e, k)], lv)
        pts.append((xs[b] + b_off, ys[b] - heights[b] / 2))
        if i in flipped:
            pts.reverse()
            rev.add(eid)
        routes[eid] = pts
    return Placed(xs[:n], ys, layer, routes, right - left, height, rev)
