"""SVG drawing of a :class:`.layout.Layout`: group boxes, curved edges, styled node boxes.

Self-contained: no external fonts, scripts or images; text is escaped for XML.
"""

from __future__ import annotations

import math

import networkx as nx

from .layout import EdgeRoute, Layout, compute_layout
from .style import (
    _BOLD_CATEGORIES,
    CATEGORY_STYLE,
    EDGE_COLOR,
    EDGE_PARAM_COLOR,
    FONT_FAMILY,
    GROUP_LABEL_FONT,
    GROUP_LABEL_LINE,
    MARGIN,
    STATUS_STYLE,
    NodeInfo,
    Point,
    group_style,
    text_width,
)

__all__ = ["counts", "legend_entries", "render_svg", "svg_document", "title_of", "xml"]

def _xml_ok(ch: str) -> bool:
    o = ord(ch)
    if o < 0x20:
        return ch in "\t\n\r"
    return not (0xD800 <= o <= 0xDFFF or o in (0xFFFE, 0xFFFF))


def xml(text: object) -> str:
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


def _tooltip(nf: NodeInfo) -> str:
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
            f'stroke-linejoin="round" aria-hidden="true">{xml(s)}</text>'
        )
    out += f'<text {base} fill="{fill}">{xml(s)}</text>'
    return out


def counts(g: nx.DiGraph) -> dict[str, int]:
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


def legend_entries(lay: Layout) -> list[tuple[str, str, str, str, str]]:
    """(kind, fill, stroke, dash, text) for the categories / statuses / group kinds shown."""
    cats_present = {nf.category for nf in lay.info.values()}
    entries = []
    for cat, (fill, stroke, _, text) in CATEGORY_STYLE.items():
        if cat in cats_present or cat in ("input", "compute", "matmul", "output"):
            entries.append(("node", fill, stroke, "", text))
    for _st, (stroke, tint, dash, _, text) in STATUS_STYLE.items():
        entries.append(("status", tint, stroke, dash, text))
    for kind in sorted({gb.kind for gb in lay.groups.values()}):
        fill, stroke, _ = group_style(kind)
        entries.append(("group", fill, stroke, "", f"{kind} block"))
    return entries


def _legend_svg(lay: Layout, max_w: float) -> tuple[str, float, float]:
    parts: list[str] = []
    x = y = 0.0
    row_h = 20.0
    used_w = 0.0
    for kind, fill, stroke, dash, text in legend_entries(lay):
        item_w = 26 + text_width(text, 11) + 16
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
        fill, stroke, _ = group_style(gb.kind)
        out.append(
            f'<g class="group" data-group="{xml(gb.gid)}"><title>{xml(gb.label)}</title>'
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
        _, _, tcol = group_style(gb.kind)
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
            f'<g class="node" id="n{i}" data-node="{xml(k)}" data-op="{xml(nf.op)}" '
            f'data-status="{nf.status}"><title>{xml(_tooltip(nf))}</title>'
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


def svg_document(
    g: nx.DiGraph,
    lay: Layout,
    title: str,
    *,
    header: bool = True,
) -> str:
    c = counts(g)
    gw, gh = lay.width, lay.height
    parts: list[str] = []
    top = MARGIN
    width = gw + 2 * MARGIN
    if header:
        legend_max = max(gw, 620.0)
        legend, lw, lh = _legend_svg(lay, legend_max)
        title_w = text_width(title, 16) * 1.05
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
        f'font-family="{xml(FONT_FAMILY)}" role="img" aria-label="{xml(title)}">\n'
        f"<title>{xml(title)}</title>\n"
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


def title_of(g: nx.DiGraph, title: str | None) -> str:
    return str(title or g.graph.get("title") or "computation graph")


def render_svg(g: nx.DiGraph, *, title: str | None = None) -> str:
    """A standalone SVG picture of ``g`` (title, counts, legend, groups, nodes, edges)."""
    return svg_document(g, compute_layout(g), title_of(g, title), header=True)


# --------------------------------------------------------------------------------------------
# HTML
