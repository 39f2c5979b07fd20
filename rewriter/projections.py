"""Projections over a captured graph: which matmuls are an activation times a parameter.

A projection is a matmul of an activation against a 2-D parameter, however it is spelled:
``linear(x, W, b)`` (nn.Linear, F.linear), ``view(addmm(b, view(x), W))`` (GPT-2's Conv1D),
``x @ W.T``, ``matmul``/``mm``/``bmm``/``einsum`` with the weight transposed (t, ``.T``,
transpose, permute) or broadcast (expand) any number of times, plus a bias added right after.
Each is normalised to one weight in "linear" (out, in) or "conv1d" (in, out) layout
(:class:`Projection`). A matmul of two activations (attention's q @ k^T, p @ v) is never a
projection. The FFN matcher (:mod:`rewriter.patterns`) and the FP8 lowering read these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .graph_ops import is_reshape, op_name, param_name, same_dims, tensor_meta

__all__ = ["Projection", "WeightRef", "find_projections"]



@dataclass(frozen=True)
class WeightRef:
    """A parameter of the source model, by FQN, with the tensor itself."""

    fqn: str
    param: torch.nn.Parameter = field(repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


@dataclass(frozen=True, eq=False)
class Projection:
    """A matmul of an activation against a parameter weight."""

    node: Node  # the linear / addmm / mm / matmul node
    input: Node  # the activation it reads (before any flattening view)
    output: Node  # the node that yields its result in the activation's layout
    weight: WeightRef
    bias: WeightRef | None
    layout: str  # "linear": W is (out, in); "conv1d": W is (in, out)
    nodes: tuple[Node, ...]  # every node it covers (weight reads, views, the matmul)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] if self.layout == "linear" else self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] if self.layout == "linear" else self.weight.shape[1]

    @property
    def module(self) -> str:
        return self.weight.fqn.rpartition(".")[0]

    @property
    def params(self) -> int:
        return self.weight.param.numel() + (self.bias.param.numel() if self.bias else 0)


def _weight_ref(gm: GraphModule, node: Any) -> WeightRef | None:
    fqn = param_name(gm, node)
    return WeightRef(fqn, gm.get_parameter(fqn)) if fqn else None


def _only_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _token_flatten(x: Node, out: Node) -> tuple[Node, Node] | None:
    """(source, unflatten) when a linear's input is its source with the tokens flattened and
    its only user puts them back: ``h.reshape(-1, K) -> linear -> .view(*lead, N)``, the last
    dims untouched, the leading dims of the source and of the result the same (read from the
    recorded shapes). Per token, that is the linear of the source."""
    user = _only_user(out)
    if not (is_reshape(x) and len(x.users) == 1 and user is not None and is_reshape(user)):
        return None
    src = x.args[0]
    metas = [tensor_meta(n) if isinstance(n, Node) else None for n in (src, x, out, user)]
    if any(m is None for m in metas):
        return None
    source, flat, result, back = (m[0] for m in metas)  # type: ignore[index]
    if not (same_dims(source[-1:], flat[-1:]) and same_dims(result[-1:], back[-1:])
            and same_dims(source[:-1], back[:-1])):
        return None
    return src, user


def _module_projection(gm: GraphModule, node: Node) -> Projection | None:
    """A leaf nn.Linear call (plain torch.fx.symbolic_trace graphs)."""
    module = gm.get_submodule(str(node.target))
    if not isinstance(module, torch.nn.Linear) or not isinstance(node.args[0], Node):
        return None
    weight = WeightRef(f"{node.target}.weight", module.weight)
    bias = WeightRef(f"{node.target}.bias", module.bias) if module.bias is not None else None
    flattened = _token_flatten(node.args[0], node)
    if flattened is not None:
        source, out = flattened
        return Projection(node, source, out, weight, bias, "linear",
                          (node.args[0], node, out))
    return Projection(node, node.args[0], node, weight, bias, "linear", (node,))


# How a weight can reach a matmul: read as a parameter, then transposed, made contiguous or
# given broadcast batch dims (bmm). Anything else (a slice, an arithmetic op) is not a weight.
_TRANSPOSES = frozenset({"t", "numpy_T", "transpose", "permute", "swapaxes", "mT", "T"})
_PASS_THROUGH = frozenset({"contiguous", "clone", "alias", "detach", "expand", "unsqueeze"})
_MATMULS = frozenset({"mm", "matmul", "bmm", "addmm", "linear", "einsum"})


@dataclass(frozen=True)
class _WeightPath:
    weight: WeightRef
    transposed: bool  # the matmul sees W^T of the parameter
    nodes: tuple[Node, ...]  # get_attr and every op on the way


def _dims(node: Node) -> list[int] | None:
    """The two dims a transpose / permute node swaps (normalised to >= 0), if it swaps two."""
    meta = tensor_meta(node.args[0]) if isinstance(node.args[0], Node) else None
    ndim = len(meta[0]) if meta is not None else 2
    name = op_name(node)
    rest = [*node.args[1:], *node.kwargs.values()]
    if name in ("t", "numpy_T", "T", "mT"):
        return [ndim - 2, ndim - 1]
    if name == "permute":
        perm = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        perm = [int(p) % ndim for p in perm]
        moved = [i for i, p in enumerate(perm) if p != i]
        return moved if len(moved) == 2 and perm[moved[0]] == moved[1] else None
    if len(rest) == 2 and all(isinstance(d, int) for d in rest):  # transpose / swapaxes
        return sorted(int(d) % ndim for d in rest)
    return None


def _weight_path(gm: GraphModule, node: Any) -> _WeightPath | None:
    """The parameter behind a matmul operand, through transposes and broadcast views."""
    covered: list[Node] = []
    transposed = False
    while isinstance(node, Node):
        if node.op == "get_attr":
            ref = _weight_ref(gm, node)
            if ref is None or len(ref.shape) != 2:
                return None
            return _WeightPath(ref, transposed, (node, *covered[::-1]))
        if covered and len(node.users) != 1:  # a weight view also used elsewhere
            return None
        if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
            name = str(node.args[1])  # torch.fx: W.T / W.mT
        else:
            name = op_name(node)
        if name in _TRANSPOSES:
            dims = [0, 1] if name in ("T", "mT") and node.target is getattr else _dims(node)
            meta = tensor_meta(node)
            ndim = len(meta[0]) if meta is not None else 2
            if dims is None or sorted(dims) != [ndim - 2, ndim - 1]:
                return None  # a permutation that is not a transpose of the matrix
            transposed = not transposed
        elif name not in _PASS_THROUGH:
            return None
        covered.append(node)
        node = node.args[0] if node.args else None
    return None


def _einsum_operands(node: Node) -> tuple[str, list[Any]] | None:
    if not node.args or not isinstance(node.args[0], str):
        return None
    ops = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
        else node.args[1:]
    return node.args[0].replace(" ", ""), list(ops)


def _einsum_projection(gm: GraphModule, node: Node):
    """``einsum("...d,fd->...f", x, W)`` (either order, either weight layout): (x, path,
    weight-is-(out, in))."""
    parsed = _einsum_operands(node)
    if parsed is None or "->" not in parsed[0] or len(parsed[1]) != 2:
        return None
    eq, ops = parsed
    lhs, out = eq.split("->")
    subs = lhs.split(",")
    for wi in (1, 0):
        path = _weight_path(gm, ops[wi])
        x, xs, ws = ops[1 - wi], subs[1 - wi], subs[wi]
        if path is None or not isinstance(x, Node) or len(ws) != 2 or len(set(ws)) != 2:
            continue
        c = xs[-1:]  # contracted: the activation's last dim
        if c not in ws or ws.count(c) != 1 or c in out or xs.count(c) != 1:
            continue
        o = ws.replace(c, "")
        if o in xs or out != xs[:-1] + o:
            continue
        return x, path, ws == o + c
    return None


def _absorb_bias(gm: GraphModule, out: Node, features: int) -> tuple[Node, WeightRef | None]:
    """``y + b`` right after a bias-free matmul, b a 1-D parameter of the output width."""
    user = _only_user(out)
    if user is None or op_name(user) != "add" or len(user.args) != 2 or user.kwargs:
        return out, None
    other = user.args[1] if user.args[0] is out else user.args[0]
    ref = _weight_ref(gm, other)
    if ref is None or ref.shape != (features,) or len(other.users) != 1:
        return out, None
    return user, ref


def _projection(gm: GraphModule, node: Node) -> Projection | None:
    """A matmul of an activation against a parameter, however it is spelled: linear, mm,
    matmul, bmm, addmm, einsum, ``@``, with the weight transposed any number of times (t,
    ``.T``, transpose, permute) or broadcast to a batch (bmm): normalised to a weight in
    "linear" (out, in) or "conv1d" (in, out) layout, plus the bias added right after."""
    if node.op == "call_module":
        return _module_projection(gm, node)
    name = op_name(node)
    if name not in _MATMULS:
        return None
    b = None
    if name == "einsum":
        found = _einsum_projection(gm, node)
        if found is None:
            return None
        x, path, out_in = found
    elif name == "linear" and len(node.args) >= 2:
        x, path = node.args[0], _weight_path(gm, node.args[1])
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        out_in = path is not None and not path.transposed
    elif name == "addmm" and len(node.args) >= 3:
        b, x, path = node.args[0], node.args[1], _weight_path(gm, node.args[2])
        out_in = path is not None and path.transposed
    elif name in ("mm", "matmul", "bmm") and len(node.args) >= 2:
        x, path = node.args[0], _weight_path(gm, node.args[1])
        out_in = path is not None and path.transposed
    else:
        return None
    if path is None or not isinstance(x, Node):
        return None
    bias = _weight_ref(gm, b)
    if b is not None and bias is None:
        return None
    layout = "linear" if out_in else "conv1d"
    weight = path.weight
    out_features = weight.shape[0] if out_in else weight.shape[1]
    covered = [*path.nodes] + ([b] if isinstance(b, Node) else [])
    source = x
    out = node
    flattened = _token_flatten(x, node) if name == "linear" else None
    if flattened is not None:  # linear(h.reshape(-1, K)).view(*lead, N)
        source, out = flattened
        covered += [x, node, out]
    else:
        if name != "linear" and is_reshape(x) and len(x.users) == 1:  # x.view(-1, K)
            covered.append(x)
            source = x.args[0]
        covered.append(node)
        user = _only_user(node)
        if name != "linear" and user is not None and is_reshape(user):  # .view(*lead, N)
            out = user
            covered.append(user)
    if bias is None:
        out, bias = _absorb_bias(gm, out, out_features)
        if bias is not None:
            covered += [n for n in out.args if isinstance(n, Node) and n.op == "get_attr"]
            covered.append(out)
    return Projection(node, source, out, weight, bias, layout, tuple(covered))


def find_projections(gm: GraphModule) -> list[Projection]:
    """Every matmul against a parameter in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            p = _projection(gm, node)
            if p is not None:
                found.append(p)
    return found


