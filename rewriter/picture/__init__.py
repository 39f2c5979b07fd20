"""Pictures of computation graphs: a layered layout (igraph's Sugiyama) drawn as SVG / HTML.

The output is one self-contained file: no Graphviz, no network, no external scripts or fonts.

Input contract: a ``networkx.DiGraph`` whose nodes carry ``label``, ``op`` (``placeholder`` |
``get_attr`` | ``call_function`` | ``call_module`` | ``call_method`` | ``output`` |
``collapsed``), ``target``, ``module``, optional ``group`` (a block id), ``status``
(``unchanged`` | ``added`` | ``removed`` | ``changed``), optional ``shape``, ``dtype`` and
``count`` (for collapsed nodes). ``g.graph["title"]`` is the default title and
``g.graph["groups"]`` maps a group id to ``{"label": str, "kind": str}``. An edge ``u -> v``
means ``v`` consumes ``u``. ``rewriter.inspection.to_networkx`` builds such graphs.

Modules: ``style`` (colours, sizes), ``layered`` (igraph placement of boxes), ``layout``
(groups as boxes), ``svg``, ``html``, ``explorer`` (Model Explorer node-data overlays).
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import networkx as nx

from ..errors import InputError
from .explorer import node_data, write_node_data
from .html import render_html
from .layout import EdgeRoute, GroupBox, Layout, NodeBox, compute_layout, layout
from .svg import render_svg

__all__ = [
    "EdgeRoute",
    "GroupBox",
    "Layout",
    "NodeBox",
    "compute_layout",
    "layout",
    "node_data",
    "render_html",
    "render_svg",
    "write_node_data",
    "write_picture",
]


def write_picture(
    g: nx.DiGraph, path: str | os.PathLike[str], *, title: str | None = None
) -> pathlib.Path:
    """Write ``g`` as ``.svg`` or ``.html``/``.htm`` (by suffix), atomically; returns the path.

    Raises ``InputError`` (a ``ValueError``) for another suffix, before anything is written.
    """
    p = pathlib.Path(path)
    suffix = p.suffix.lower()
    if suffix == ".svg":
        text = render_svg(g, title=title)
    elif suffix in (".html", ".htm"):
        text = render_html(g, title=title)
    else:
        raise InputError(
            f"write_picture: unsupported suffix {p.suffix!r} for {str(p)!r} "
            "(use .svg, .html or .htm)"
        )
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the usual 0666 & ~umask
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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
