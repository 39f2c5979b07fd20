"""Inspection: what was found and what was rewritten, as tables, a diff, a graph, a picture.

``inspect(obj)`` accepts a model (captured on the fly), a captured/rewritten GraphModule or a
pass-manager result and returns a :class:`Report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.fx import GraphModule, Node

from .capture import CaptureInfo, capture, capture_info
from .errors import InputError
from .graph_ops import GROUP_META_KEY, op_name, owning_module, target_str, tensor_meta
from .jsonable import jsonable
from .model_stats import model_stats
from .pass_manager import HISTORY_META_KEY, PassRecord, PipelineResult
from .patterns import FFNAnalysis, analyze_ffns
from .picture import write_node_data, write_picture
from .snapshot import GraphDiff, GraphSnapshot, diff_graphs

__all__ = ["Report", "inspect", "to_networkx", "format_table", "GROUP_META_KEY"]

CONVERSION_ATTR = "rewriter_conversion"  # set by rewriter.convert on what it returns


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        bool(rows) and all(_is_num(r[i]) or r[i] == "" for r in rows)
        for i in range(len(headers))
    ]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x: Any) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


# ----------------------------------------------------------------------------- graph


def _collapse_key(module: str, keep_prefixes: set[str]) -> str | None:
    """Shortest prefix of ``module`` that is not on the path to a kept module, else None."""
    if not module:
        return None
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix not in keep_prefixes:
            return prefix
    return None


def _ancestors(fqn: str) -> set[str]:
    parts = fqn.split(".") if fqn else []
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _label(node: Node) -> str:
    if node.op in ("placeholder", "output"):
        return node.name
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[2]
    name = op_name(node) or node.name
    module = owning_module(node)
    if name in ("linear", "addmm", "mm", "matmul") and module:
        return f"{name} · {module.rpartition('.')[2]}"
    return name


def _shape_str(node: Node) -> tuple[str | None, str | None]:
    meta = tensor_meta(node)
    if meta is None:
        return None, None
    shape = "(" + ", ".join(str(s) for s in meta[0]) + ")"
    return shape, str(meta[1]).removeprefix("torch.")


def _is_value_node(node: Node) -> bool:
    """Nodes worth drawing: tensors (not sym sizes, asserts, guard calls or parameter reads)."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "get_attr" or (node.op == "call_module" and str(node.target).startswith("_")):
        return False  # parameter reads, torch.export's _guards_fn
    val = node.meta.get("val")
    if val is not None and not isinstance(val, (torch.Tensor, tuple, list)):
        return False
    target = target_str(node)
    return "sym_size" not in target and "_assert" not in target


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "complex"))


def _short(op: str, target: str) -> str:
    """"aten.linear.default" -> "linear"; "a.b.weight" -> "weight"."""
    if op != "get_attr" and target.startswith("aten."):
        return target.split(".")[1]
    return target.rpartition(".")[2]


def to_networkx(
    gm: GraphModule,
    *,
    analysis: FFNAnalysis | None = None,
    baseline: GraphSnapshot | None = None,
    collapse: bool = False,
    title: str | None = None,
    expand_to: Sequence[str] = (),
) -> nx.DiGraph:
    """The graph as a networkx DiGraph (node attrs: label, op, target, module, group, status,
    shape, dtype, count; graph attrs: title, groups).

    ``baseline``: a snapshot of an earlier graph; nodes added/changed since are marked and
    removed ones appear as ghosts with status "removed". ``collapse``: merge each module that
    holds no FFN (attention, norms, embeddings) into one node and drop parameter reads;
    ``expand_to``: module FQNs drawn as boxes of their own even though they hold no FFN (the
    MoE blocks of a converted model).
    """
    analysis = analysis if analysis is not None else analyze_ffns(gm)
    groups: dict[str, dict[str, str]] = {}
    node_group: dict[str, str] = {}
    for m in analysis.matches:
        gid = f"ffn{m.index}"
        groups[gid] = {
            "label": f"FFN {m.index} · {m.module or '<root>'} · {m.kind}/{m.activation} · "
            f"{m.d_model}→{m.d_ff}→{m.d_model}",
            "kind": "ffn",
        }
        for n in m.nodes:
            node_group[n.name] = gid
    for node in gm.graph.nodes:
        tag = node.meta.get(GROUP_META_KEY)
        if tag:
            gid, label, kind = tag
            groups.setdefault(gid, {"label": label, "kind": kind})
            node_group[node.name] = gid

    keep: set[str] = set()
    for m in analysis.matches:
        keep |= _ancestors(m.module)
    for fqn in expand_to:  # the module's parents open up; the module is one box
        keep |= _ancestors(fqn.rpartition(".")[0]) if "." in fqn else set()
    for node in gm.graph.nodes:
        if node.name in node_group:
            keep |= _ancestors(owning_module(node))
    status: dict[str, str] = {}
    ghosts: list = []
    if baseline is not None:
        d = diff_graphs(baseline, gm)
        status.update({n.name: "added" for n in d.added})
        status.update({b.name: "changed" for _, b in d.changed})
        ghosts = list(d.removed)

    g = nx.DiGraph(title=title or gm.__class__.__name__, groups=groups)
    rep: dict[str, str] = {}  # fx node name -> drawn node id

    def add_node(name: str, attrs: dict[str, Any], module: str) -> None:
        key = None
        if (collapse and name not in node_group and attrs["status"] != "removed"
                and attrs["op"] not in ("placeholder", "output")):
            key = _collapse_key(module, keep)
            if key is None and attrs["dtype"] and not _is_float(attrs["dtype"]):
                key = "masks & positions"  # integer/bool bookkeeping: one box
        if key is None:
            rep[name] = name
            g.add_node(name, **attrs)
            return
        cid = f"[{key}]"
        rep[name] = cid
        if cid not in g:
            g.add_node(cid, label=f"{key.rpartition('.')[2] or key}", op="collapsed",
                       target=key, module=key, group=None, status="unchanged",
                       shape=None, dtype=None, count=0)
        g.nodes[cid]["count"] += 1
        g.nodes[cid]["label"] = f"{key.rpartition('.')[2] or key} ({g.nodes[cid]['count']} ops)"
        if attrs["status"] != "unchanged":
            g.nodes[cid]["status"] = "changed"

    for node in gm.graph.nodes:
        if collapse and not _is_value_node(node):
            continue
        shape, dtype = _shape_str(node)
        module = owning_module(node)
        add_node(node.name, dict(
            label=_label(node), op=node.op, target=target_str(node), module=module,
            group=node_group.get(node.name), status=status.get(node.name, "unchanged"),
            shape=shape, dtype=dtype, count=None,
        ), module)
    for info in ghosts:
        if collapse and info.op == "get_attr":
            continue
        add_node(info.name, dict(
            label=_short(info.op, info.target),
            op=info.op, target=info.target, module=info.module, group=None,
            status="removed", shape=info.shape, dtype=info.dtype, count=None,
        ), info.module)

    def add_edge(src: str, dst: str) -> None:
        if src in rep and dst in rep and rep[src] != rep[dst]:
            g.add_edge(rep[src], rep[dst])

    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            add_edge(src.name, node.name)
    if baseline is not None and ghosts:
        ghost_names = {n.name for n in ghosts}
        for src, dst in baseline.edges:
            if src in ghost_names or dst in ghost_names:
                add_edge(src, dst)
    return g


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True, eq=False)
class Report:
    """What :func:`inspect` found. ``str(report)`` gives the tables."""

    graph_module: GraphModule
    analysis: FFNAnalysis
    history: tuple[PassRecord, ...]
    capture: CaptureInfo | None
    conversion: Any = None  # rewriter.conversion.ConversionInfo of a converted model
    stats: Any = None  # rewriter.model_stats.ModelStats of the inspected model

    @property
    def ffns(self):
        return list(self.analysis.matches)

    @property
    def rejections(self):
        return list(self.analysis.rejections)

    def ffn_rows(self) -> list[dict[str, Any]]:
        return [
            dict(index=m.index, module=m.module, kind=m.kind, activation=m.activation,
                 d_model=m.d_model, d_ff=m.d_ff, bias=m.has_bias, layout=m.layout,
                 params=m.params, flops_per_token=m.flops_per_token)
            for m in self.analysis.matches
        ]

    def ffn_table(self) -> str:
        rows = self.ffn_rows()
        if not rows:
            return "no feed-forward blocks found"
        headers = ["#", "module", "kind", "act", "d_model", "d_ff", "bias", "params",
                   "FLOPs/token"]
        keys = ["index", "module", "kind", "activation", "d_model", "d_ff", "bias", "params",
                "flops_per_token"]
        body = [[r[k] for k in keys] for r in rows]
        total = sum(r["params"] for r in rows)
        flops = sum(r["flops_per_token"] for r in rows)
        body.append(["", "total", "", "", "", "", "", total, flops])
        return format_table(headers, body)

    def rejection_table(self, *, near_misses_only: bool = False) -> str:
        rej = [r for r in self.analysis.rejections if r.near_miss or not near_misses_only]
        if not rej:
            return "no rejected candidates"
        rows = [[r.module or r.node.name, "near miss" if r.near_miss else "", r.reason]
                for r in rej]
        return format_table(["candidate", "", "reason"], rows)

    def conversion_table(self) -> str:
        """The blocks ``rewriter.convert`` emitted (experts, sizes, strategies, router recall)."""
        if self.conversion is None:
            return "not converted by rewriter.convert"
        rows = []
        for b in self.conversion.blocks:
            recall = b.get("router_recall")
            rows.append([b["module"], b["experts"], b["expert_dim"], b["shared_dim"], b["top_k"],
                         b["grouping"], b["router_init"],
                         "-" if recall is None else f"{recall:.2f}"])
        return format_table(["module", "experts", "expert_dim", "shared", "top_k", "grouping",
                             "router", "recall@k"], rows)

    def fp8_table(self) -> str:
        """What the FP8 lowering did: each module lowered or kept, and why."""
        decisions = getattr(self.conversion, "fp8_decisions", ()) if self.conversion else ()
        if not decisions:
            return "not lowered to FP8"
        rows = [[d.fqn, "FP8" if d.lowered else "kept", d.kind, d.params, d.reason]
                for d in decisions]
        lowered = sum(d.lowered for d in decisions)
        return (f"{lowered} of {len(decisions)} modules lowered\n"
                + format_table(["module", "", "kind", "params", "reason"], rows))

    def summary_table(self) -> str:
        """Params total / active per token, weight bytes and matmul FLOPs per token of the
        model, before and after conversion, and the conversion's exactness checks."""
        if self.stats is None:
            return ""
        source = getattr(self.conversion, "source_stats", None)
        names = {"params": "params", "active_params": "params active per token",
                 "weight_bytes": "weight bytes", "matmul_flops_per_token": "matmul FLOPs/token"}
        rows = []
        for key, label in names.items():
            after = getattr(self.stats, key)
            if source is None:
                rows.append([label, after])
            else:
                before = getattr(source, key)
                rows.append([label, before, after, f"{after / before:.3f}" if before else "-"])
        headers = ["", "model"] if source is None else ["", "source", "converted", "ratio"]
        text = format_table(headers, rows)
        c = self.conversion
        checks = []
        if getattr(c, "split_error", None) is not None:
            checks.append(f"experts partition the dense FFNs exactly: all experts on vs dense, "
                          f"float64 rel. error {c.split_error:.1e}")
        if getattr(c, "output_error", None) is not None:
            checks.append(f"outputs vs the model given to convert, on the example inputs: max "
                          f"rel. error "
                          f"{c.output_error:.2e}")
        recovery = getattr(c, "recovery", None)
        if recovery and recovery.get("before") is not None:
            checks.append(f"recovery: {recovery['steps']} steps on {recovery['sequences']} "
                          f"sequences ({recovery['seconds']:.0f} s); MoE blocks vs the dense "
                          f"FFNs on held-out text, mean rel. squared error "
                          f"{recovery['before']:.4f} -> {recovery['after']:.4f}")
        if getattr(c, "recipe", None):
            checks.insert(0, f"recipe: {c.recipe}")
        return text + ("\n" + "\n".join(checks) if checks else "")

    def history_table(self) -> str:
        if not self.history:
            return "no passes have run"
        rows = []
        for r in self.history:
            d = diff_graphs(r.before, r.after)
            err = "-" if r.max_rel_error is None else f"{r.max_rel_error:.2g}"
            rows.append([r.name, r.modified, d.summary(), err, f"{r.seconds * 1e3:.1f} ms"])
        return format_table(["pass", "modified", "graph change", "rel.err", "time"], rows)

    def diff(self, which: int | str = -1) -> GraphDiff:
        """Diff of one pass (by index or name), or of the whole pipeline with ``"all"``."""
        if not self.history:
            raise ValueError("no passes have run on this graph: there is nothing to diff")
        if which == "all":
            return diff_graphs(self.history[0].before, self.history[-1].after)
        if isinstance(which, str):
            named = [r for r in self.history if r.name == which]
            if not named:
                known = ", ".join(r.name for r in self.history)
                raise KeyError(f"no pass named {which!r} in the history (passes: {known})")
            rec = named[-1]
        else:
            rec = self.history[which]
        return diff_graphs(rec.before, rec.after)

    def to_networkx(self, *, collapse: bool = False) -> nx.DiGraph:
        baseline = self.history[0].before if self.history else None
        expand = tuple(getattr(self.conversion, "modules", ()) or ())
        return to_networkx(self.graph_module, analysis=self.analysis, baseline=baseline,
                           collapse=collapse, title=self._title(), expand_to=expand)

    def write_picture(self, path: str | Path, *, collapse: bool = True) -> Path:
        """Write the graph as a self-contained .html or .svg picture."""

        return write_picture(self.to_networkx(collapse=collapse), Path(path),
                             title=self._title())

    def write_node_data(self, directory: str | Path, *,
                        model: nn.Module | None = None) -> list[dict[str, str]]:
        """Model Explorer node-data overlays of this graph (what each pass did: added / removed
        / changed, FP8 or kept and why, MoE block, expert load of ``model``'s last forward), one
        JSON file each; returns ``node_data`` entries for ``model_explorer.visualize_pytorch``
        (see ``rewriter.picture.explorer``)."""
        return write_node_data(self.to_networkx(), Path(directory), conversion=self.conversion,
                               model=model)

    def _title(self) -> str:
        name = self.capture.model_class if self.capture else type(self.graph_module).__name__
        moe = sum(1 for n in self.graph_module.graph.nodes if GROUP_META_KEY in n.meta)
        return f"{name}: {len(self.analysis.matches)} FFN blocks" + (
            f", {moe} rewritten blocks" if moe else "")

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON types, through :func:`rewriter.jsonable.jsonable` (the
        conversion info is written as everywhere else; ``json.dumps`` needs no ``default=``)."""
        return jsonable({
            "model": self.capture.model_class if self.capture else None,
            "capture_method": self.capture.method if self.capture else None,
            "nodes": len(self.graph_module.graph.nodes),
            "ffns": self.ffn_rows(),
            "rejections": [
                {"candidate": r.module or r.node.name, "near_miss": r.near_miss,
                 "reason": r.reason}
                for r in self.analysis.rejections
            ],
            "passes": [
                {"name": r.name, "modified": r.modified, "seconds": r.seconds,
                 "max_rel_error": r.max_rel_error,
                 "diff": diff_graphs(r.before, r.after).summary()}
                for r in self.history
            ],
            "stats": self.stats,
            "conversion": self.conversion,
        })

    def __str__(self) -> str:
        head = []
        if self.capture is not None:
            dyn = ", ".join(f"{k}{list(v)}" for k, v in self.capture.dynamic_dims.items())
            head.append(f"captured {self.capture.model_class} with {self.capture.method}"
                        f" ({len(self.graph_module.graph.nodes)} nodes; dynamic dims: "
                        f"{dyn or 'none'})")
        converted = self.conversion is not None and self.conversion.blocks
        parts = ["\n".join(head)]
        if self.stats is not None:
            parts += ["Summary", self.summary_table()]
        if not converted or self.analysis.matches:
            parts += ["Feed-forward blocks" + (" (still dense)" if converted else ""),
                      self.ffn_table()]
            near = [r for r in self.analysis.rejections if r.near_miss]
            parts += ["Near misses" if near else "Rejected candidates",
                      self.rejection_table(near_misses_only=bool(near))]
        if converted:
            parts += ["Converted blocks", self.conversion_table()]
        if self.conversion is not None and getattr(self.conversion, "fp8_decisions", ()):
            parts += ["FP8 lowering", self.fp8_table()]
        if self.history:
            parts += ["Passes", self.history_table()]
        return "\n\n".join(p for p in parts if p)


def _default_inputs(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise InputError(
            f"example_inputs is required to inspect {type(model).__name__} (it has no "
            "config.vocab_size to make token ids from)"
        )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    name = getattr(model, "main_input_name", None)
    return {name: ids} if isinstance(name, str) else (ids,)


def inspect(obj: Any, example_inputs: Any = None, *, dynamic: bool = True) -> Report:
    """Report on a model, a captured GraphModule or a :class:`PipelineResult`.

    A plain ``nn.Module`` is captured first, with ``example_inputs`` (token ids are made up for
    language models that have ``config.vocab_size``).
    """
    conversion = getattr(obj, CONVERSION_ATTR, None)
    if isinstance(obj, PipelineResult):
        gm = obj.graph_module
    elif isinstance(obj, GraphModule):
        gm = obj
    elif isinstance(obj, nn.Module):
        inputs = example_inputs if example_inputs is not None else _default_inputs(obj)
        gm = capture(obj, inputs, dynamic=dynamic)
    else:
        raise InputError(
            f"inspect() takes a model, a GraphModule or a pipeline result, got "
            f"{type(obj).__name__}"
        )

    return Report(
        graph_module=gm,
        analysis=analyze_ffns(gm),
        history=tuple(gm.meta.get(HISTORY_META_KEY, ())),
        capture=capture_info(gm),
        conversion=conversion if conversion is not None else gm.meta.get(CONVERSION_ATTR),
        stats=model_stats(obj.graph_module if isinstance(obj, PipelineResult) else obj),
    )
