"""Clean-up passes: drop ops that compute nothing, then dead code.

Matches: ``dropout`` in eval form (``train=False``), ``alias``, ``clone`` without a memory
format, ``contiguous``, and dtype casts (``_to_copy`` / ``to``) to the dtype the value already
has. Checks: the input's recorded dtype equals the cast's target. Emits: users rewired to the
input; the node erased.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from rewriter.graph_ops import op_name, tensor_meta
from rewriter.pass_manager import PassResult

__all__ = ["remove_identity_ops", "eliminate_dead_code", "is_identity_op"]


def is_identity_op(node: Node) -> bool:
    """True for ops that return their input unchanged (eval dropout, alias, same-dtype cast)."""
    name = op_name(node)
    if node.op not in ("call_function", "call_method") or not node.args:
        return False
    src = node.args[0]
    if not isinstance(src, Node):
        return False
    if name == "dropout":
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", None)
        train = node.kwargs.get("training", train)
        return train is False
    if name in ("alias", "contiguous"):
        return True
    if name == "clone":
        return "memory_format" not in node.kwargs
    if name in ("_to_copy", "to"):
        extra = set(node.kwargs) - {"dtype"}
        dtype = node.kwargs.get("dtype")
        if name == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
            dtype = node.args[1]
        elif len(node.args) > 1:
            return False
        meta = tensor_meta(src)
        return not extra and dtype is not None and meta is not None and meta[1] == dtype
    return False


def remove_identity_ops(gm: GraphModule) -> PassResult:
    """Rewire the users of identity ops to their input and erase them."""
    removed = []
    for node in list(gm.graph.nodes):
        if is_identity_op(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed.append(node.name)
    if removed:
        gm.recompile()
    return PassResult(gm, bool(removed), {"removed": removed})




def eliminate_dead_code(gm: GraphModule) -> PassResult:
    """Erase nodes whose values nobody uses (impure ops are kept)."""
    before = len(gm.graph.nodes)
    changed = gm.graph.eliminate_dead_code()
    if changed:
        gm.recompile()
    return PassResult(gm, changed, {"erased": before - len(gm.graph.nodes)})


