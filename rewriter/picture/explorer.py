"""Per-node data overlays of what the passes did, in Google Model Explorer's node-data format.

Model Explorer (PyPI ``ai-edge-model-explorer``, extra ``rewriter[explorer]``) shows an
``ExportedProgram`` interactively; its PyTorch adapter names each node after the FX node, in a
graph with id ``"graph"``. A node-data file is ``{graph id: GraphNodeData}`` where
``GraphNodeData = {"name": str, "results": {node id: {"value": str | number, "bgColor": css}},
"gradient": [...]}`` (``model_explorer/node_data_builder.py``). This module writes four such
overlays, keyed by the node names of an inspected graph (``Report.to_networkx()``):

- ``rewriter: pass``: ``added`` / ``removed`` / ``changed`` / ``unchanged`` (from the pass
  history when there is one; for a model converted in module mode, nodes of a new MoE block are
  ``added`` and nodes of an FP8-lowered module ``changed``);
- ``rewriter: FP8``: ``FP8`` or ``kept: <reason>`` for nodes of every module the FP8 lowering
  decided on;
- ``rewriter: MoE block``: the block's module and shape (experts, top-k, shared width);
- ``rewriter: expert load``: max / mean tokens per expert of the block in the model's last
  forward (1.0 = even), only when a model whose MoE blocks have run is given.

Nothing here needs Model Explorer installed; the files load with
``model_explorer.visualize_pytorch(name, torch.export.export(model, inputs), node_data=infos)``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import networkx as nx
from torch import nn

from ..errors import InputError
from ..models.moe import MoEFFN
from .style import STATUS_STYLE

__all__ = ["GRAPH_ID", "OVERLAYS", "node_data", "write_node_data"]

GRAPH_ID = "graph"  # the graph id Model Explorer's PyTorch adapter gives an ExportedProgram
OVERLAYS = ("rewriter: pass", "rewriter: FP8", "rewriter: MoE block", "rewriter: expert load")

_STATUS_COLOR = {s: tint for s, (_, tint, _, _, _) in STATUS_STYLE.items()}
_FP8_COLOR, _KEPT_COLOR, _MOE_COLOR = "#ccfbf1", "#f1f5f9", "#ecfdf5"


def _owner(module: str, fqns: Sequence[str]) -> str | None:
    """The longest fqn in ``fqns`` that is ``module`` or one of its parents."""
    best = None
    for f in fqns:
        if (module == f or module.startswith(f + ".")) and (best is None or len(f) > len(best)):
            best = f
    return best


def _loads(model: nn.Module | None) -> dict[str, float]:
    """{block fqn: max / mean tokens per expert} of the MoE blocks that have run a forward."""
    if model is None:
        return {}
    return {
        fqn: float(m.load_stats()["max_over_mean"])
        for fqn, m in model.named_modules()
        if isinstance(m, MoEFFN) and m._has_load
    }


def node_data(
    g: nx.DiGraph, *, conversion: Any = None, model: nn.Module | None = None
) -> dict[str, dict]:
    """The overlays as ``{overlay name: GraphNodeData dict}``, keyed by ``g``'s node names.

    ``g``: an uncollapsed graph from ``rewriter.inspection.to_networkx`` (nodes carry
    ``module`` and ``status``). ``conversion``: ``rewriter.convert``'s ``ConversionInfo`` (its
    ``blocks`` and ``fp8_decisions`` are read). ``model``: the converted model, for expert load.
    Overlays with no node are left out. Raises ``InputError`` for a collapsed graph.
    """
    if any(d.get("op") == "collapsed" for _, d in g.nodes(data=True)):
        raise InputError("node_data: the graph is collapsed; use to_networkx(collapse=False)")
    blocks = {b["module"]: b for b in (getattr(conversion, "blocks", None) or ())}
    fp8 = {d.fqn: d for d in (getattr(conversion, "fp8_decisions", None) or ())}
    loads = _loads(model)
    history = any((d.get("status") or "unchanged") != "unchanged" for _, d in g.nodes(data=True))
    res: dict[str, dict[str, dict]] = {name: {} for name in OVERLAYS}
    for key, d in g.nodes(data=True):
        node, module = str(key), str(d.get("module") or "")
        block = _owner(module, list(blocks))
        dec = fp8.get(_owner(module, list(fp8)) or "")
        status = str(d.get("status") or "unchanged")
        if not history:
            status = "added" if block else "changed" if dec is not None and dec.lowered else status
        res["rewriter: pass"][node] = {"value": status, **(
            {"bgColor": _STATUS_COLOR[status]} if status in _STATUS_COLOR else {})}
        if dec is not None:
            text = "FP8" if dec.lowered else f"kept: {dec.reason}"
            res["rewriter: FP8"][node] = {
                "value": text, "bgColor": _FP8_COLOR if dec.lowered else _KEPT_COLOR}
        if block:
            b = blocks[block]
            res["rewriter: MoE block"][node] = {
                "value": f"{block} · {b['experts']} experts, top-{b['top_k']}, "
                f"shared {b['shared_dim']}",
                "bgColor": _MOE_COLOR,
            }
            if block in loads:
                res["rewriter: expert load"][node] = {"value": round(loads[block], 4)}
    out: dict[str, dict] = {}
    for name, results in res.items():
        if not results:
            continue
        data: dict[str, Any] = {"name": name, "results": results}
        if name == "rewriter: expert load":
            data["gradient"] = [
                {"stop": 0, "bgColor": "#dcfce7"},  # most even block
                {"stop": 1, "bgColor": "#fca5a5"},  # most uneven block
            ]
        else:
            data["showExpandedSummaryOnGroupNode"] = True
            data["showLabelCountColumnsInChildrenStatsTable"] = True
        out[name] = data
    return out


def write_node_data(
    g: nx.DiGraph,
    directory: str | os.PathLike[str],
    *,
    conversion: Any = None,
    model: nn.Module | None = None,
    graph_id: str = GRAPH_ID,
) -> list[dict[str, str]]:
    """Write each overlay of :func:`node_data` as ``<directory>/<name>.json`` (``{graph_id:
    GraphNodeData}``); returns Model Explorer ``NodeDataInfo`` dicts (``name``,
    ``node_data_path``) ready for ``visualize_pytorch(..., node_data=...)``."""
    overlays = node_data(g, conversion=conversion, model=model)
    out_dir = pathlib.Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    infos = []
    for name, data in overlays.items():
        path = out_dir / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".json")
        path.write_text(json.dumps({graph_id: data}, indent=1), encoding="utf-8")
        infos.append({"name": name, "node_data_path": str(path)})
    return infos
