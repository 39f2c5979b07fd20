"""Structural snapshots of FX graphs and the before/after diff of a rewrite.

A snapshot keeps what a person needs to see what a pass did (node names, ops, targets, args,
owning module, shapes, edges) without holding tensors or copying parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule
from torch.fx.node import map_arg

from .graph_ops import owning_module, target_str, tensor_meta

__all__ = ["NodeInfo", "GraphSnapshot", "GraphDiff", "snapshot", "diff_graphs"]


@dataclass(frozen=True)
class NodeInfo:
    name: str
    op: str
    target: str
    args: str  # args/kwargs with nodes replaced by their names
    module: str
    shape: str | None
    dtype: str | None

    def signature(self) -> tuple[str, str, str]:
        return (self.op, self.target, self.args)


@dataclass(frozen=True)
class GraphSnapshot:
    nodes: tuple[NodeInfo, ...]
    edges: tuple[tuple[str, str], ...]  # (producer, consumer)

    def by_name(self) -> dict[str, NodeInfo]:
        return {n.name: n for n in self.nodes}


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def snapshot(gm: GraphModule | GraphSnapshot) -> GraphSnapshot:
    if isinstance(gm, GraphSnapshot):
        return gm
    nodes, edges = [], []
    for node in gm.graph.nodes:
        args = map_arg((node.args, node.kwargs), lambda n: _Name(n.name))
        meta = tensor_meta(node)
        nodes.append(
            NodeInfo(
                name=node.name,
                op=node.op,
                target=target_str(node),
                args=repr(args[0])[1:-1].rstrip(",") + (f", {args[1]}" if args[1] else ""),
                module=owning_module(node),
                shape=_fmt_shape(meta[0]) if meta else None,
                dtype=str(meta[1]).removeprefix("torch.") if meta else None,
            )
        )
        edges.extend((src.name, node.name) for src in node.all_input_nodes)
    return GraphSnapshot(tuple(nodes), tuple(edges))


class _Name(str):
    def __repr__(self) -> str:
        return str(self)


@dataclass(frozen=True)
class GraphDiff:
    """Nodes added, removed and changed (same name, other op/target/args) by a rewrite."""

    added: tuple[NodeInfo, ...]
    removed: tuple[NodeInfo, ...]
    changed: tuple[tuple[NodeInfo, NodeInfo], ...]
    unchanged: int

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def summary(self) -> str:
        return (
            f"+{len(self.added)} added, -{len(self.removed)} removed, "
            f"~{len(self.changed)} changed, {self.unchanged} unchanged"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        for n in self.removed:
            lines.append(f"- {n.name} = {n.target}({n.args})")
        for n in self.added:
            lines.append(f"+ {n.name} = {n.target}({n.args})")
        for a, b in self.changed:
            lines.append(f"~ {a.name} = {a.target}({a.args})")
            lines.append(f"  -> {b.target}({b.args})")
        return "\n".join(lines)


def diff_graphs(
    before: GraphModule | GraphSnapshot, after: GraphModule | GraphSnapshot
) -> GraphDiff:
    """Diff two graphs by node name (FX keeps the names of nodes a pass leaves alone)."""
    a, b = snapshot(before).by_name(), snapshot(after).by_name()
    added = tuple(n for name, n in b.items() if name not in a)
    removed = tuple(n for name, n in a.items() if name not in b)
    changed = tuple(
        (a[name], n) for name, n in b.items() if name in a and a[name].signature() != n.signature()
    )
    unchanged = sum(1 for name in b if name in a) - len(changed)
    return GraphDiff(added, removed, changed, unchanged)
