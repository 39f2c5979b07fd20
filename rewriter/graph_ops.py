"""Small vocabulary over FX nodes shared by the matcher, the passes and inspection.

Both front ends are covered: torch.export graphs (``aten.linear.default`` ...) and
torch.fx.symbolic_trace graphs (``F.linear``, ``operator.mul``, ``call_method`` "mul" ...).
Every op gets one canonical name, so rules speak of "linear" or "mul" whatever produced them.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

__all__ = [
    "GROUP_META_KEY",
    "op_name",
    "target_str",
    "is_elementwise",
    "is_split",
    "is_reshape",
    "param_name",
    "owning_module",
    "module_stack",
    "common_module",
    "tensor_meta",
    "last_dim",
    "weight_bytes",
    "same_dims",
    "drop_identity_views",
    "slice_split_views",
    "fetch_attr",
    "attach",
]

_OPERATOR_NAMES = {
    operator.add: "add",
    operator.sub: "sub",
    operator.mul: "mul",
    operator.truediv: "div",
    operator.neg: "neg",
    operator.pow: "pow",
    operator.getitem: "getitem",
    operator.gt: "gt",
    operator.ge: "ge",
    operator.lt: "lt",
    operator.le: "le",
    operator.eq: "eq",
    operator.ne: "ne",
    operator.abs: "abs",
}
_ALIASES = {"truediv": "div", "true_divide": "div", "multiply": "mul", "subtract": "sub"}

# Elementwise ops a feed-forward block may apply between its projections (activations, gates,
# casts, scalar arithmetic). aten ops tagged ``pointwise`` count as well.
_ELEMENTWISE = frozenset(
    """add sub mul div neg pow square sqrt rsqrt reciprocal exp expm1 log log1p abs sign
    tanh sigmoid erf erfc gelu silu relu relu6 mish softplus hardswish hardsigmoid hardtanh
    leaky_relu elu selu celu clamp clamp_min clamp_max maximum minimum where
    gt ge lt le eq ne logical_and logical_or logical_not masked_fill tanhshrink softsign
    to _to_copy type_as float half bfloat16 double contiguous clone alias dropout identity
    """.split()
)
# Ops that cut a tensor into parts (glu cuts the last dim in two and multiplies the halves).
_SPLITS = frozenset({"chunk", "split", "split_with_sizes", "unbind", "getitem", "slice", "narrow",
                     "glu"})
_RESHAPES = frozenset({"view", "reshape", "_unsafe_view", "flatten", "unflatten"})

# Passes tag the nodes they emit with node.meta[GROUP_META_KEY] = (group_id, label, kind) so
# that the picture draws them as one block (e.g. an MoE block that replaced an FFN).
GROUP_META_KEY = "rewriter.group"


def op_name(node: Node) -> str | None:
    """Canonical op name of a call node ("linear", "gelu", "mul", ...), else None."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_module":  # a leaf module of torch.fx.symbolic_trace: nn.GELU -> "gelu"
        root = node.graph.owning_module
        try:
            name = type(root.get_submodule(str(node.target))).__name__.lower()
        except AttributeError:
            return None
    elif node.op == "call_function":
        target = node.target
        if target in _OPERATOR_NAMES:
            return _OPERATOR_NAMES[target]
        if isinstance(target, torch._ops.OpOverload):
            name = target.overloadpacket.__name__
        elif isinstance(target, torch._ops.OpOverloadPacket):
            name = target.__name__
        else:
            name = getattr(target, "__name__", None)
            if name is None:
                return None
    else:
        return None
    name = name.rstrip("_") if name.endswith("_") and not name.startswith("_") else name
    return _ALIASES.get(name, name)


def target_str(node: Node) -> str:
    """Readable full target: "aten.linear.default", "torch.nn.functional.gelu", "x", ..."""
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)
    module = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", repr(t))
    return f"{module}.{name}" if module else name


def is_elementwise(node: Node) -> bool:
    name = op_name(node)
    if name is None:
        return False
    if name in _ELEMENTWISE:
        return True
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def is_split(node: Node) -> bool:
    return op_name(node) in _SPLITS


def is_reshape(node: Node) -> bool:
    return op_name(node) in _RESHAPES


def param_name(gm: GraphModule, node: Any) -> str | None:
    """FQN of the parameter a get_attr node reads, else None (buffers and constants: None)."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    try:
        value = gm.get_parameter(str(node.target))
    except AttributeError:
        return None
    return str(node.target) if isinstance(value, torch.nn.Parameter) else None


def owning_module(node: Node) -> str:
    """FQN of the innermost module that ran ``node`` ("" for the root or unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    fqn = last[0] if isinstance(last, tuple) else str(last)
    return _clean_fqn(fqn)


def module_stack(node: Node) -> list[str]:
    """FQNs of every module active when ``node`` ran, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [_clean_fqn(v[0] if isinstance(v, tuple) else str(v)) for v in stack.values()]


def _clean_fqn(fqn: str) -> str:
    # torch.export can record "L['self'].layers[0].mlp"-like paths: normalise to dotted FQNs.
    fqn = fqn.replace("L['self']", "").replace("L__self__", "")
    fqn = fqn.replace("[", ".").replace("]", "").replace("'", "")
    return ".".join(p for p in fqn.split(".") if p)


def common_module(fqns: list[str]) -> str:
    """Longest common dotted prefix of module FQNs ("a.b.c", "a.b.d" -> "a.b")."""
    if not fqns:
        return ""
    parts = [f.split(".") if f else [] for f in fqns]
    out = []
    for level in zip(*parts):
        if all(p == level[0] for p in level):
            out.append(level[0])
        else:
            break
    return ".".join(out)


def tensor_meta(node: Node) -> tuple[tuple[Any, ...], torch.dtype] | None:
    """(shape, dtype) recorded on a node by torch.export ("val") or ShapeProp ("tensor_meta")."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape), val.dtype
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape), tm.dtype
    return None


def last_dim(node: Node, dim: Any) -> bool | None:
    """Whether ``dim`` names the last dim of ``node``'s value (``dim=2`` of a rank-3 tensor is
    ``dim=-1``): normalised against the rank recorded on the node; None when ``dim`` is not an
    int, or is a non-negative int and no rank is recorded."""
    if not isinstance(dim, int) or isinstance(dim, bool):
        return None
    if dim < 0:
        return dim == -1
    meta = tensor_meta(node)
    return None if meta is None else dim == len(meta[0]) - 1


def same_dims(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Two shapes (or parts of shapes) recorded on nodes are the same: equal ints, and symbolic
    sizes (torch.export's s0, s1 ...) that print the same."""
    return [str(d) for d in a] == [str(d) for d in b]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer of ``model`` (what a checkpoint stores:
    ``state_dict``; a tensor tied under several names counts once). Non-persistent buffers and
    caches (e.g. an FP8Linear's dequantized copy) are left out."""
    stored = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in stored.values())


def _selected(user: Node, view: Node, axis: int, ndim: int) -> int | None:
    """i when ``user`` takes index i of ``view`` on ``axis`` and all of every other axis:
    ``aten.select(view, axis, i)`` or ``view[..., i, :]`` (fx getitem); else None."""
    if user.target is torch.ops.aten.select.int:
        ok = user.args[0] is view and user.args[1] in (axis, axis - ndim)
        return int(user.args[2]) if ok else None
    if user.target is not operator.getitem or user.args[0] is not view:
        return None
    index = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
    if index.count(Ellipsis) > 1:
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (ndim - len(index))
    whole = slice(None)
    if len(index) != ndim or not isinstance(index[axis], int) or \
            any(ix != whole for a, ix in enumerate(index) if a != axis):
        return None
    return index[axis]


def slice_split_views(gm: GraphModule) -> int:
    """Rewrite ``select(view(x, (..., k, F/k)), -2, i)`` as ``x[..., i*F/k:(i+1)*F/k]``: a
    last-dim split spelled as a reshape plus an index (Moshi's fused gate/up,
    ``h.view(b, t, 2, -1)[..., 0, :]``) becomes the slice spelling the FFN matcher reads. Reads
    the shapes recorded on the nodes (``meta["val"]``); only where every user of the view is
    such an index; the values are identical. Returns how many indexes were rewritten."""
    rewritten = 0
    for view in list(gm.graph.nodes):
        if op_name(view) not in ("view", "reshape", "_unsafe_view") or not view.users:
            continue
        src = view.args[0] if view.args else None
        src_val, val = getattr(src, "meta", {}).get("val"), view.meta.get("val")
        if not (isinstance(src_val, torch.Tensor) and isinstance(val, torch.Tensor)):
            continue
        if val.dim() != src_val.dim() + 1 or val.dim() < 2:
            continue
        k, part, width = val.shape[-2], val.shape[-1], src_val.shape[-1]
        if not all(isinstance(v, int) for v in (k, part, width)) or k * part != width or \
                not same_dims(val.shape[:-2], src_val.shape[:-1]):
            continue
        axis = val.dim() - 2
        picks = [_selected(u, view, axis, val.dim()) for u in view.users]
        if any(i is None for i in picks):
            continue
        aten = view.op == "call_function" and isinstance(view.target, torch._ops.OpOverload)
        for user, i in zip(list(view.users), picks):
            i %= k
            with gm.graph.inserting_before(user):
                if aten:
                    piece = gm.graph.call_function(torch.ops.aten.slice.Tensor,
                                                   (src, -1, i * part, (i + 1) * part))
                else:
                    piece = gm.graph.call_function(
                        operator.getitem, (src, (Ellipsis, slice(i * part, (i + 1) * part))))
            piece.meta.update({key: user.meta[key] for key in ("nn_module_stack",
                                                                "stack_trace", "val")
                               if key in user.meta})
            user.replace_all_uses_with(piece)
            gm.graph.erase_node(user)
            rewritten += 1
        gm.graph.erase_node(view)
    if rewritten:
        gm.recompile()
    return rewritten


def drop_identity_views(gm: GraphModule) -> int:
    """Replace a reshape to the shape its input already has (``h.reshape(*x.shape[:-1],
    down.weight.shape[1])`` of an (B, T, F) ``h``) by its input: the same values, and the FFN
    matcher then sees the activation feed the projection. Reads the shapes and dtypes recorded
    on the nodes; a reshape without them is kept. Returns how many were dropped."""
    dropped = 0
    for node in list(gm.graph.nodes):
        src = node.args[0] if node.args else None
        if not is_reshape(node) or not isinstance(src, Node):
            continue
        before, after = tensor_meta(src), tensor_meta(node)
        if before is None or after is None or before[1] != after[1] or \
                not same_dims(before[0], after[0]):
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        dropped += 1
    if dropped:
        gm.recompile()
    return dropped


def fetch_attr(root: nn.Module, target: str) -> Any:
    """``root.a.b.c`` for the dotted ``target`` of a get_attr / call_module node."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def attach(holder: nn.Module, name: str, value: Any) -> None:
    """Register ``value`` on ``holder`` as what it is: a submodule, a parameter, a buffer (a
    plain tensor) or a plain attribute."""
    if isinstance(value, nn.Module):
        holder.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        holder.register_parameter(name, value)
    elif isinstance(value, torch.Tensor):
        holder.register_buffer(name, value)
    else:
        setattr(holder, name, value)
