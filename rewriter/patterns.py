"""FFN pattern matching over a captured graph, as declared rules.

What a feed-forward block is, for the matcher:

* **Projections** are matmuls of an activation against a 2-D parameter, however they are
  spelled: ``linear(x, W, b)`` (nn.Linear, F.linear), ``view(addmm(b, view(x), W))`` (GPT-2's
  Conv1D), ``x @ W.T``, ``matmul``/``mm``/``bmm``/``einsum`` with the weight transposed
  (t, ``.T``, transpose, permute) or broadcast (expand) any number of times, plus a bias added
  right after. Each is normalised to one weight in "linear" (out, in) or "conv1d" (in, out)
  layout. A matmul of two activations (attention's q @ k^T, p @ v) is never a projection.
* A **block** is a down projection whose input is an *elementwise* function (activations,
  products, casts, scalar arithmetic, plus chunk/split/slice of the last dim) of one or two
  projections that read the same input ``x``; nothing else enters the block and no
  intermediate leaves it.
* A **rule** (:data:`FFN_RULES`) says how many projections feed the block, whether their output
  is split, and a reference function of the activation, e.g. ``act(gate) * up``. The rule
  matches when the block's elementwise subgraph equals the reference on seeded probe values for
  one activation of :data:`ACTIVATIONS` — so ``aten.gelu``, GPT-2's tanh chain and
  ``0.5*x*(1+erf(x/sqrt2))`` written out all match "gelu"/"gelu_tanh" without a rule per form.

Every down-projection candidate that fails gets a :class:`Rejection` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from .errors import NoFFNError
from .graph_ops import (
    common_module,
    is_elementwise,
    is_reshape,
    is_split,
    op_name,
    param_name,
    target_str,
    tensor_meta,
)

__all__ = [
    "Activation",
    "ACTIVATIONS",
    "FFNRule",
    "FFN_RULES",
    "Projection",
    "WeightRef",
    "FFNMatch",
    "Rejection",
    "FFNAnalysis",
    "find_projections",
    "analyze_ffns",
    "find_ffns",
    "require_ffns",
]

_MAX_REGION = 64  # elementwise nodes between two projections; beyond this it is not an FFN


# ----------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Activation:
    """A known FFN nonlinearity and its float64 reference."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]


ACTIVATIONS: tuple[Activation, ...] = (
    Activation("relu", F.relu),
    Activation("gelu", lambda x: F.gelu(x)),
    Activation("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    Activation("silu", F.silu),
    Activation("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
    Activation("relu_squared", lambda x: F.relu(x).square()),
)


@dataclass(frozen=True)
class FFNRule:
    """One declared FFN shape.

    ``roles``: names of the projections feeding the block, in the order ``reference`` takes
    them; ``split``: the single feeding projection's output is cut in two along the last dim
    (fused gate_up); ``reference(act, *inputs)``: what the elementwise part must compute.
    """

    name: str
    kind: str  # "mlp" | "glu" | "glu_fused"
    roles: tuple[str, ...]
    split: bool
    reference: Callable[..., torch.Tensor]
    why: str


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = t.shape[-1] // 2
    return t[..., :h], t[..., h:]


FFN_RULES: tuple[FFNRule, ...] = (
    FFNRule("mlp", "mlp", ("up",), False, lambda act, u: act(u),
            "linear -> act -> linear (GPT, BERT, GPT-2 Conv1D)"),
    FFNRule("glu", "glu", ("gate", "up"), False, lambda act, g, u: act(g) * u,
            "act(gate(x)) * up(x) -> down (LLaMA, Mistral, Qwen2: SwiGLU/GeGLU)"),
    FFNRule("glu_fused_gate_first", "glu_fused", ("gate_up",), True,
            lambda act, gu: act(_halves(gu)[0]) * _halves(gu)[1],
            "gate_up(x).chunk(2) -> act(gate) * up -> down (Phi-3)"),
    FFNRule("glu_fused_up_first", "glu_fused", ("gate_up",), True,
            lambda act, gu: act(_halves(gu)[1]) * _halves(gu)[0],
            "gate_up(x).chunk(2) -> up * act(gate), up half first"),
)


# ----------------------------------------------------------------------------- projections


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


def _module_projection(gm: GraphModule, node: Node) -> Projection | None:
    """A leaf nn.Linear call (plain torch.fx.symbolic_trace graphs)."""
    module = gm.get_submodule(str(node.target))
    if not isinstance(module, torch.nn.Linear) or not isinstance(node.args[0], Node):
        return None
    weight = WeightRef(f"{node.target}.weight", module.weight)
    bias = WeightRef(f"{node.target}.bias", module.bias) if module.bias is not None else None
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
    if name != "linear" and is_reshape(x) and len(x.users) == 1:  # x.view(-1, K): flatten
        covered.append(x)
        source = x.args[0]
    out = node
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


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class FFNMatch:
    """One feed-forward block found in the graph."""

    index: int
    module: str  # FQN of the module that owns the block (common parent of its projections)
    kind: str  # "mlp" | "glu" | "glu_fused"
    rule: str
    activation: str
    d_model: int
    d_ff: int
    has_bias: bool
    layout: str  # "linear" | "conv1d"
    projections: Mapping[str, Projection]  # role -> projection: up, down, gate, gate_up
    nodes: tuple[Node, ...]  # every node of the block, graph order
    input: Node
    output: Node

    @property
    def weights(self) -> Mapping[str, WeightRef]:
        """role.weight / role.bias -> parameter reference."""
        out = {}
        for role, p in self.projections.items():
            out[f"{role}.weight"] = p.weight
            if p.bias is not None:
                out[f"{role}.bias"] = p.bias
        return MappingProxyType(out)

    @property
    def params(self) -> int:
        return sum(p.params for p in self.projections.values())

    @property
    def flops_per_token(self) -> int:
        """Multiply-adds of the projections, times two (the activation is negligible)."""
        return sum(
            2 * p.in_features * p.out_features for p in self.projections.values()
        )

    def describe(self) -> str:
        return (
            f"FFN {self.index}: {self.module or '<root>'} {self.kind}/{self.activation} "
            f"{self.d_model}->{self.d_ff}->{self.d_model}{' +bias' if self.has_bias else ''}"
        )


@dataclass(frozen=True, eq=False)
class Rejection:
    """A down-projection candidate that is not an FFN, and why."""

    node: Node
    module: str
    reason: str
    near_miss: bool  # True when projections did feed it (an FFN-like shape that failed a check)

    def describe(self) -> str:
        return f"{self.module or self.node.name}: {self.reason}"


@dataclass(frozen=True, eq=False)
class FFNAnalysis:
    matches: tuple[FFNMatch, ...]
    rejections: tuple[Rejection, ...]


# ----------------------------------------------------------------------------- the matcher


@dataclass
class _Region:
    nodes: list[Node]  # elementwise / split nodes between the projections and the sink
    sources: list[Projection]
    externals: list[Node]  # tensors entering the region that are not projection outputs


def _grow_region(sink: Node, by_output: Mapping[Node, Projection]) -> _Region:
    region: list[Node] = []
    seen: set[Node] = set()
    sources: list[Projection] = []
    externals: list[Node] = []
    stack = [sink]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in by_output:
            sources.append(by_output[node])
            continue
        if node.op == "get_attr" or (is_elementwise(node) or is_split(node)):
            region.append(node)
            if len(region) > _MAX_REGION:
                break
            stack.extend(a for a in node.all_input_nodes if a not in seen)
            continue
        externals.append(node)
    rank = list(by_output)  # projections in graph order
    sources.sort(key=lambda p: rank.index(p.output))
    return _Region(region, sources, externals)


def _region_function(
    gm: GraphModule, region: _Region, sink: Node
) -> Callable[..., torch.Tensor]:
    """The region as a callable of its source projections' outputs."""
    graph = Graph()
    env: dict[Node, Node] = {}
    for i, src in enumerate(region.sources):
        env[src.output] = graph.placeholder(f"src{i}")
    members = set(region.nodes)
    for node in gm.graph.nodes:  # graph order is a topological order
        if node in members:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[sink])
    sub = GraphModule(gm, graph)
    return sub.forward


def _probe(width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-7.0, 7.0, width, dtype=torch.float64)
    noise = torch.randn(16, width, generator=g, dtype=torch.float64) * 2.5
    return torch.cat([grid[None], noise])  # (17, width)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    return bool(((a - b).abs() <= 1e-5 * (1 + b.abs())).all())


def _identify(
    fn: Callable[..., torch.Tensor], rule: FFNRule, widths: tuple[int, ...]
) -> str | None:
    """Name of the activation under which ``fn`` equals the rule's reference, else None."""
    probes = [_probe(w, seed=11 + i) for i, w in enumerate(widths)]
    try:
        with torch.no_grad():
            got = fn(*probes)
    except Exception:
        return None
    if not isinstance(got, torch.Tensor):
        return None
    for act in ACTIVATIONS:
        if _same(got, rule.reference(act.fn, *probes)):
            return act.name
    return None


_SIZE_QUERIES = frozenset({"size", "sym_size", "dim", "numel", "sym_numel",
                           "_assert_tensor_metadata", "_assert_scalar"})


def _is_size_query(node: Node) -> bool:
    """``h.shape`` / ``h.size(0)`` / ``h.dim()`` / torch.export's metadata asserts: reads
    metadata, not the values."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return node.args[1] in ("shape", "dtype", "device", "ndim")
    return op_name(node) in _SIZE_QUERIES


def _escapes(region: _Region, down: Projection) -> tuple[Node, Node] | None:
    """(node, outside user) for an intermediate or projection output used outside the block
    (a shape query is no use of the values: ``expand(h.shape[0], ...)`` of a bmm weight)."""
    inside = set(region.nodes) | set(down.nodes)
    for node in region.nodes:
        if node.op == "get_attr":
            continue
        for user in node.users:
            if user not in inside and not _is_size_query(user):
                return node, user
    for src in region.sources:
        for user in src.output.users:
            if user not in inside and not _is_size_query(user):
                return src.output, user
    return None


def _check_candidate(
    gm: GraphModule, down: Projection, region: _Region
) -> tuple[FFNRule, str] | str:
    """The matching (rule, activation), or the reason there is none."""
    if not region.sources:
        origin = region.externals[0] if region.externals else down.input
        return (
            f"input is not computed from another projection (it comes from "
            f"{target_str(origin)} {origin.name!r})"
        )
    if len(region.nodes) > _MAX_REGION:
        return f"more than {_MAX_REGION} elementwise ops between projections"
    if region.externals:
        ext = region.externals[0]
        return (
            f"reads tensor {ext.name!r} ({target_str(ext)}) that is not a projection output"
        )
    if not any(n.op != "get_attr" for n in region.nodes):
        return "no activation between the projections (linear -> linear)"
    escape = _escapes(region, down)
    if escape is not None:
        node, user = escape
        return f"intermediate {node.name!r} is also used by {user.name!r} outside the block"
    inputs = {p.input for p in region.sources}
    if len(inputs) != 1:
        return "its projections read different inputs: " + ", ".join(
            sorted(n.name for n in inputs)
        )
    split = any(is_split(n) for n in region.nodes)
    widths = tuple(p.out_features for p in region.sources)
    fn = _region_function(gm, region, down.input)
    for rule in FFN_RULES:
        if len(rule.roles) != len(region.sources) or rule.split != split:
            continue
        if rule.split and widths[0] % 2:
            continue
        orders = [region.sources] if len(region.sources) == 1 else [
            region.sources, region.sources[::-1]
        ]
        for order in orders:
            perm = [region.sources.index(p) for p in order]

            def ordered(*xs, _perm=perm):
                return fn(*[xs[_perm.index(i)] for i in range(len(xs))])

            act = _identify(ordered, rule, tuple(p.out_features for p in order))
            if act is not None:
                region.sources = list(order)
                return rule, act
    names = "/".join(a.name for a in ACTIVATIONS)
    return (
        f"the elementwise function of {len(region.sources)} projection(s) matches no rule "
        f"({', '.join(r.name for r in FFN_RULES)}) with a known activation ({names})"
    )


def analyze_ffns(gm: GraphModule) -> FFNAnalysis:
    """Find every FFN block in ``gm`` and every rejected candidate with its reason."""
    projections = find_projections(gm)
    by_output = {p.output: p for p in projections}
    matches: list[FFNMatch] = []
    rejections: list[Rejection] = []
    claimed: set[Node] = set()
    for down in projections:
        if down.node in claimed:
            continue
        region = _grow_region(down.input, by_output)
        verdict = _check_candidate(gm, down, region)
        if isinstance(verdict, str):
            near = bool(region.sources) and not region.externals
            rejections.append(Rejection(down.node, down.module, verdict, near_miss=near))
            continue
        rule, act = verdict
        match = _build_match(len(matches), rule, act, region, down)
        if isinstance(match, str):
            rejections.append(Rejection(down.node, down.module, match, near_miss=True))
            continue
        matches.append(match)
        claimed.update(match.nodes)
    # an up/gate projection is first seen as a down candidate; once claimed it is no miss
    rejections = [r for r in rejections if r.node not in claimed]
    return FFNAnalysis(tuple(matches), tuple(rejections))


def _build_match(
    index: int, rule: FFNRule, act: str, region: _Region, down: Projection
) -> FFNMatch | str:
    sources = region.sources
    roles = dict(zip(rule.roles, sources))
    widths = {p.out_features for p in sources}
    d_ff = down.in_features
    expected = 2 * d_ff if rule.split else d_ff
    if widths != {expected}:
        return f"hidden widths disagree: projections give {sorted(widths)}, down takes {d_ff}"
    d_model = sources[0].in_features
    if down.out_features != d_model:
        return (
            f"output width {down.out_features} != input width {d_model}: "
            "not a residual feed-forward block"
        )
    layouts = {p.layout for p in [*sources, down]}
    if len(layouts) != 1:
        return f"mixed weight layouts {sorted(layouts)}"
    projections = {**roles, "down": down}
    nodes = set(region.nodes) | set(down.nodes)
    for p in sources:
        nodes |= set(p.nodes)
    order = {n: i for i, n in enumerate(down.node.graph.nodes)}
    return FFNMatch(
        index=index,
        module=common_module([p.module for p in projections.values()]),
        kind=rule.kind,
        rule=rule.name,
        activation=act,
        d_model=d_model,
        d_ff=d_ff,
        has_bias=any(p.bias is not None for p in projections.values()),
        layout=layouts.pop(),
        projections=MappingProxyType(projections),
        nodes=tuple(sorted(nodes, key=order.__getitem__)),
        input=sources[0].input,
        output=down.output,
    )


def find_ffns(gm: GraphModule) -> list[FFNMatch]:
    """Every feed-forward block of a captured graph, in graph order (may be empty)."""
    return list(analyze_ffns(gm).matches)


def require_ffns(gm: GraphModule) -> list[FFNMatch]:
    """Like :func:`find_ffns`, but raise :class:`NoFFNError` (with the near misses) if none."""
    analysis = analyze_ffns(gm)
    if analysis.matches:
        return list(analysis.matches)
    near = [r for r in analysis.rejections if r.near_miss] or list(analysis.rejections)
    detail = "".join(f"\n  - {r.describe()}" for r in near[:8])
    raise NoFFNError(
        "no feed-forward block (linear -> activation -> linear, or a GLU) found in the graph"
        + (f"; candidates rejected:{detail}" if detail else "; it has no linear layers")
    )

