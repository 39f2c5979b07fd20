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

Every down-projection candidate that fails gets a :class:`Rejection` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from .errors import NoFFNError
from .graph_ops import (
    common_module,
    is_elementwise,
    is_split,
    op_name,
    target_str,
)
from .projections import Projection, WeightRef, find_projections

__all__ = [
    "Activation",
    "ACTIVATIONS",
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

