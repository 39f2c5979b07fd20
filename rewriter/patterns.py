"""FFN pattern matching over a captured graph, as declared rules.

What a feed-forward block is, for the matcher:

* **Projections** are matmuls of an activation against a 2-D parameter, however they are
  spelled (:mod:`rewriter.projections` normalises them); a matmul of two activations is not.
* A **block** is a down projection whose input is an *elementwise* function (activations,
  products, casts, scalar arithmetic, plus chunk/split/slice of the last dim) of one or two
  projections that read the same input ``x``; nothing else enters the block and no
  intermediate leaves it.
* A **rule** (:data:`FFN_RULES`) says how many projections feed the block, whether their output
  is split, and a reference function of the activation, e.g. ``act(gate) * up``. The rule
  matches when the block's elementwise subgraph equals the reference on seeded probe values for
  one activation of :data:`ACTIVATIONS` — so ``aten.gelu``, GPT-2's tanh chain and
  ``0.5*x*(1+erf(x/sqrt2))`` written out all match "gelu"/"gelu_tanh" without a rule per form.
* An activation no entry of :data:`ACTIVATIONS` names (a learned one like Apertus' xIELU, a
  clipped GELU, Mish) still makes an FFN when the subgraph is **per neuron**: its value on a
  subset of the hidden units, in any order, is the same subset of its value (so splitting the
  neurons into experts is exact), and for two projections it is linear in the second
  (``f(g, u) = f(g, 1) * u``). The block then keeps its own elementwise graph as the experts'
  activation (:data:`CAPTURED_ACTIVATION`, :attr:`FFNMatch.activation_fn`).

Every down-projection candidate that fails gets a :class:`Rejection` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node

from .errors import NoFFNError
from .graph_ops import (
    attach,
    common_module,
    fetch_attr,
    is_elementwise,
    is_split,
    op_name,
    target_str,
)
from .projections import Projection, WeightRef, find_projections

__all__ = [
    "Activation",
    "ACTIVATIONS",
    "CAPTURED_ACTIVATION",
    "FFNRule",
    "FFN_RULES",
    "FFNMatch",
    "Rejection",
    "FFNAnalysis",
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


CAPTURED_ACTIVATION = "captured"  # the block's own per-neuron elementwise graph


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
    # activation == CAPTURED_ACTIVATION: the block's elementwise graph as a module of the gate
    # (or up, for "mlp") projection's output, (..., d_ff) -> (..., d_ff); else None
    activation_fn: nn.Module | None = None

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
    # an external computed from a projection output through a non-elementwise op (a norm over
    # the hidden units, a reduction): the units are not independent
    mixing: Node | None = None


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
    # every tensor entering from outside is computed from the block's own projections (a
    # norm of the hidden): the block mixes its units; any other input means it is not a block
    outputs = {p.output for p in sources}
    mixing = externals[0] if sources and externals and all(
        _computed_from(e, outputs) for e in externals) else None
    return _Region(region, sources, externals, mixing)


def _computed_from(node: Node, outputs: set[Node]) -> bool:
    """True when ``node`` is computed (within _MAX_REGION ops) from one of ``outputs``."""
    seen: set[Node] = set()
    stack = list(node.all_input_nodes)
    while stack and len(seen) <= _MAX_REGION:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in outputs:
            return True
        if n.op not in ("placeholder", "get_attr"):
            stack.extend(n.all_input_nodes)
    return False


def _region_module(gm: GraphModule, region: _Region, sink: Node,
                   ones: frozenset[int] = frozenset()) -> GraphModule:
    """The region as a module of its source projections' outputs (placeholders ``src<i>`` in
    source order); a source whose index is in ``ones`` reads ``torch.ones_like`` of the first
    other source instead of a placeholder. Parameters it reads are ``gm``'s own objects."""
    graph = Graph()
    env: dict[Node, Node] = {}
    for i, src in enumerate(region.sources):
        if i not in ones:
            env[src.output] = graph.placeholder(f"src{i}")
    first = next(env[s.output] for s in region.sources if s.output in env)
    for i, src in enumerate(region.sources):
        if i in ones:
            env[src.output] = graph.call_function(torch.ones_like, (first,))
    members = set(region.nodes)
    root = nn.Module()  # what the region reads, under flat names (alpha_p, not a.b.c.alpha_p)
    for node in gm.graph.nodes:  # graph order is a topological order
        if node in members:
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node.op in ("get_attr", "call_module"):  # a leaf module (fx's nn.Dropout)
                name = str(node.target).replace(".", "_")
                attach(root, name, fetch_attr(gm, str(node.target)))
                env[node].target = name
    graph.output(env[sink])
    return GraphModule(root, graph)


def _region_function(
    gm: GraphModule, region: _Region, sink: Node
) -> Callable[..., torch.Tensor]:
    """The region as a callable of its source projections' outputs."""
    return _region_module(gm, region, sink).forward


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


def _per_neuron(fn: Callable[..., torch.Tensor], width: int, n_inputs: int) -> bool:
    """True when ``fn`` of ``n_inputs`` (..., width) tensors acts on each hidden unit alone:
    on a shuffled subset of the columns it gives the same subset of its full output."""
    probes = [_probe(width, seed=31 + i) for i in range(n_inputs)]
    g = torch.Generator().manual_seed(5)
    cols = torch.randperm(width, generator=g)[: max(1, (width + 1) // 2)]
    try:
        with torch.no_grad():
            full = fn(*probes)
            part = fn(*[p[:, cols] for p in probes])
    except Exception:
        return False
    return (isinstance(full, torch.Tensor) and full.shape == probes[0].shape
            and _same(part, full[:, cols]))


def _captured_activation(
    gm: GraphModule, region: _Region, sink: Node
) -> tuple[FFNRule, nn.Module] | None:
    """(rule, activation module) when the region is a per-neuron function no named activation
    matches: ``act(up)`` for one projection, ``act(gate) * up`` for two (either order)."""
    sources = list(region.sources)
    if any(is_split(n) for n in region.nodes) or len(sources) not in (1, 2):
        return None
    width = sources[0].out_features
    if any(p.out_features != width for p in sources):
        return None
    if len(sources) == 1:
        act = _region_module(gm, region, sink)
        return (FFN_RULES[0], act) if _per_neuron(act, width, 1) else None
    full = _region_function(gm, region, sink)
    u = _probe(width, seed=41)
    for gate_i in (0, 1):
        up_i = 1 - gate_i
        region.sources = sources
        act = _region_module(gm, region, sink, ones=frozenset({up_i}))
        g = _probe(width, seed=43)
        args = [None, None]
        args[gate_i], args[up_i] = g, u
        try:
            with torch.no_grad():
                linear_in_up = _same(full(*args), act(g) * u)
        except Exception:
            continue
        if linear_in_up and _per_neuron(act, width, 1):
            region.sources = [sources[gate_i], sources[up_i]]
            return FFN_RULES[1], act
    region.sources = sources
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
) -> tuple[FFNRule, str, nn.Module | None] | str:
    """The matching (rule, activation name, captured activation module or None), or the
    reason there is none."""
    if not region.sources:
        origin = region.externals[0] if region.externals else down.input
        return (
            f"input is not computed from another projection (it comes from "
            f"{target_str(origin)} {origin.name!r})"
        )
    if len(region.nodes) > _MAX_REGION:
        return f"more than {_MAX_REGION} elementwise ops between projections"
    if region.mixing is not None:
        ext = region.mixing
        return (
            f"the hidden units are not independent: {target_str(ext)} {ext.name!r} (e.g. a "
            "norm or reduction over the hidden units) sits between the projections, so "
            "splitting the units into experts would not compute the same function"
        )
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
                return rule, act, None
    captured = _captured_activation(gm, region, down.input)
    if captured is not None:
        return captured[0], CAPTURED_ACTIVATION, captured[1]
    names = "/".join(a.name for a in ACTIVATIONS)
    return (
        f"the elementwise function of {len(region.sources)} projection(s) matches no rule "
        f"({', '.join(r.name for r in FFN_RULES)}) with a known activation ({names}), and it "
        "is not one function applied to every hidden unit alike either (a per-unit parameter?)"
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
            near = (bool(region.sources) and not region.externals) or region.mixing is not None
            rejections.append(Rejection(down.node, down.module, verdict, near_miss=near))
            continue
        rule, act, act_fn = verdict
        match = _build_match(len(matches), rule, act, region, down, act_fn)
        if isinstance(match, str):
            rejections.append(Rejection(down.node, down.module, match, near_miss=True))
            continue
        matches.append(match)
        claimed.update(match.nodes)
    # an up/gate projection is first seen as a down candidate; once claimed it is no miss
    rejections = [r for r in rejections if r.node not in claimed]
    return FFNAnalysis(tuple(matches), tuple(rejections))


def _build_match(
    index: int, rule: FFNRule, act: str, region: _Region, down: Projection,
    act_fn: nn.Module | None = None,
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
        activation_fn=act_fn,
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

