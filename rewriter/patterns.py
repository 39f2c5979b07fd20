"""FFN pattern matching over a captured graph, as declared rules.

What a feed-forward block is, for the matcher:

* **Projections** are matmuls of an activation against a 2-D parameter, however they are
  spelled (:mod:`rewriter.projections` normalises them); a matmul of two activations is not.
* A **block** is a down projection whose input is an *elementwise* function (activations,
  products, casts, scalar arithmetic, plus chunk/split/slice/narrow/glu of the last dim) of one
  or two projections that read the same input ``x``; nothing else enters the block and no
  intermediate leaves it.
* A fused gate_up's output is **cut** by what its cutting ops compute (run at the recorded
  rank, so ``dim=2`` of a 3-D tensor is ``dim=-1``): each part is a set of rows of the fused
  weight. Two disjoint halves make it a two-input block matched exactly like separate gate/up
  projections (named or captured activation); the rule names the row layout (halves either
  way, or interleaved as gpt-oss), and the expert split takes those rows.
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
    last_dim,
    op_name,
    target_str,
    tensor_meta,
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
    (fused gate_up); ``reference(act, *inputs)``: what the elementwise part must compute;
    ``rows(width)``: for a split rule, the (gate, up) rows of the fused weight, as slices.

    A split rule matches like "glu" does (named or captured activation) once its output is cut
    into the two row sets its graph reads; ``rows`` then names the layout.
    """

    name: str
    kind: str  # "mlp" | "glu" | "glu_fused"
    roles: tuple[str, ...]
    split: bool
    reference: Callable[..., torch.Tensor]
    why: str
    rows: Callable[[int], tuple[slice, slice]] | None = None


def _fused_rule(name: str, rows: Callable[[int], tuple[slice, slice]], why: str) -> FFNRule:
    def reference(act, gu, _rows=rows):
        gate, up = _rows(gu.shape[-1])
        return act(gu[..., gate]) * gu[..., up]

    return FFNRule(name, "glu_fused", ("gate_up",), True, reference, why, rows)


FFN_RULES: tuple[FFNRule, ...] = (
    FFNRule("mlp", "mlp", ("up",), False, lambda act, u: act(u),
            "linear -> act -> linear (GPT, BERT, GPT-2 Conv1D)"),
    FFNRule("glu", "glu", ("gate", "up"), False, lambda act, g, u: act(g) * u,
            "act(gate(x)) * up(x) -> down (LLaMA, Mistral, Qwen2: SwiGLU/GeGLU)"),
    _fused_rule("glu_fused_gate_first", lambda w: (slice(0, w // 2), slice(w // 2, w)),
                "gate_up(x).chunk(2) -> act(gate) * up -> down (Phi-3)"),
    _fused_rule("glu_fused_up_first", lambda w: (slice(w // 2, w), slice(0, w // 2)),
                "gate_up(x).chunk(2) -> up * act(gate), up half first (F.glu)"),
    _fused_rule("glu_fused_interleaved", lambda w: (slice(0, w, 2), slice(1, w, 2)),
                "gate_up(x)[..., ::2] is the gate, [..., 1::2] the up (gpt-oss)"),
    _fused_rule("glu_fused_interleaved_up_first", lambda w: (slice(1, w, 2), slice(0, w, 2)),
                "gate_up(x)[..., ::2] is the up, [..., 1::2] the gate"),
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
    # kind == "glu_fused": (gate rows, up rows) of the fused gate_up weight; else None
    fused_rows: tuple[tuple[int, ...], tuple[int, ...]] | None = None

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


@dataclass(frozen=True)
class _Cut:
    """A fused projection's output cut into the row sets its elementwise graph reads: input
    ``i`` of the graph is rows ``rows[i]`` of the fused weight."""

    rows: tuple[tuple[int, ...], ...]
    feeds: Mapping[Node, int]  # node whose value is input i (a chunk part, a slice ...)
    glus: Mapping[Node, tuple[int, int]]  # glu node -> inputs of (first half, second half)
    chain: frozenset[Node]  # the cutting nodes, replaced by the inputs


def _cut(gm: GraphModule, region: _Region) -> _Cut | str:
    """Cut the single source's output into the row sets the region reads, or why not. Reads
    what the cutting ops (chunk, split, narrow, slice, getitem, glu, in any spelling and
    positive or negative dim) compute: they run on a probe of the output's recorded rank whose
    value is the row index, so each part shows which rows it holds."""
    (src,) = region.sources
    out, width = src.output, src.out_features
    members = set(region.nodes)
    known: set[Node] = {out}
    chain: list[Node] = []
    glus: list[Node] = []
    for node in gm.graph.nodes:  # graph order: a cut's inputs come before it
        if node not in members or not is_split(node):
            continue
        if not node.all_input_nodes or not all(a in known for a in node.all_input_nodes):
            continue
        if op_name(node) == "glu":
            glus.append(node)
        else:
            chain.append(node)
            known.add(node)
    consumers = members - set(chain) - set(glus)
    feeds = [n for n in [out, *chain] if any(u in consumers for u in n.users)]
    if out in feeds:
        return ("the fused projection's whole output enters the activation next to its parts; "
                "a fused gate_up is read only as two halves of its rows")
    for g in glus:
        dim = g.args[1] if len(g.args) > 1 else g.kwargs.get("dim", -1)
        if not last_dim(g.args[0], dim):
            return (f"{g.name!r} ({target_str(g)}) halves dim {dim} of its input, not the "
                    "last (the hidden units)")
    meta = tensor_meta(out)
    lead = (3,) * (len(meta[0]) - 1 if meta is not None else 1)
    graph = Graph()
    env = {out: graph.placeholder("fused")}
    for node in chain:
        env[node] = graph.node_copy(node, lambda n: env[n])
    probed = [*feeds, *(g.args[0] for g in glus)]
    graph.output(tuple(env[n] for n in probed))
    index = torch.arange(width, dtype=torch.float64).expand(*lead, width).contiguous()
    try:
        with torch.no_grad():
            values = GraphModule(nn.Module(), graph)(index)
    except Exception as exc:
        known_rank = "" if meta is not None else (
            f" (no shape is recorded on {out.name!r}, so a dim >= 0 is read as of a 2-D "
            "tensor: capture with example inputs)")
        return (f"cutting the fused projection's output fails on a probe{known_rank}: "
                f"{type(exc).__name__}: {str(exc)[:120]}")
    rows: dict[Node, tuple[int, ...]] = {}
    for node, v in zip(probed, values):
        if not isinstance(v, torch.Tensor) or tuple(v.shape[:-1]) != lead or \
                not bool((v == v[(0,) * len(lead)]).all()):
            return (f"{node.name!r} ({target_str(node)}) cuts the fused projection's output "
                    "along a dim other than the last (the hidden units)")
        rows[node] = tuple(int(i) for i in v[(0,) * len(lead)].tolist())
    parts = [rows[n] for n in feeds]
    for g in glus:
        whole = rows[g.args[0]]
        parts += [whole[: len(whole) // 2], whole[len(whole) // 2:]]
    sets = sorted(set(parts), key=lambda r: (min(r, default=-1), r))
    if len(sets) != 2 or len(sets[0]) != len(sets[1]) or \
            sorted(sets[0] + sets[1]) != list(range(width)):
        return (f"the fused projection's {width} outputs are cut into parts of "
                f"{sorted(len(r) for r in sets)} rows, not two disjoint halves of its rows")
    at = {r: i for i, r in enumerate(sets)}
    halves = {}
    for g in glus:
        whole = rows[g.args[0]]
        halves[g] = (at[whole[: len(whole) // 2]], at[whole[len(whole) // 2:]])
    return _Cut(tuple(sets), MappingProxyType({n: at[rows[n]] for n in feeds}),
                MappingProxyType(halves), frozenset(chain))


def _region_module(gm: GraphModule, region: _Region, sink: Node,
                   ones: frozenset[int] = frozenset(), cut: _Cut | None = None) -> GraphModule:
    """The region as a module of its inputs (placeholders ``src<i>`` in order): the source
    projections' outputs, or the parts of a ``cut`` fused output. An input whose index is in
    ``ones`` reads ``torch.ones_like`` of the first other input instead of a placeholder.
    Parameters it reads are ``gm``'s own objects."""
    if cut is None:
        inputs = [[s.output] for s in region.sources]
    else:
        inputs = [[n for n, i in cut.feeds.items() if i == k] for k in range(len(cut.rows))]
    graph = Graph()
    held = {i: graph.placeholder(f"src{i}") for i in range(len(inputs)) if i not in ones}
    first = next(iter(held.values()))
    for i in sorted(ones):
        held[i] = graph.call_function(torch.ones_like, (first,))
    env: dict[Node, Node] = {n: held[i] for i, nodes in enumerate(inputs) for n in nodes}
    if cut is not None:  # glu(h) = first half * sigmoid(second half)
        for g, (a, b) in cut.glus.items():
            env[g] = graph.call_function(
                torch.mul, (held[a], graph.call_function(torch.sigmoid, (held[b],))))
    skip = cut.chain if cut is not None else frozenset()
    members = set(region.nodes)
    root = nn.Module()  # what the region reads, under flat names (alpha_p, not a.b.c.alpha_p)
    for node in gm.graph.nodes:  # graph order is a topological order
        if node in members and node not in env and node not in skip:
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node.op in ("get_attr", "call_module"):  # a leaf module (fx's nn.Dropout)
                name = str(node.target).replace(".", "_")
                attach(root, name, fetch_attr(gm, str(node.target)))
                env[node].target = name
    graph.output(env[sink])
    return GraphModule(root, graph)


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
    gm: GraphModule, region: _Region, sink: Node, widths: tuple[int, ...], cut: _Cut | None
) -> tuple[FFNRule, nn.Module, tuple[int, ...]] | None:
    """(rule, activation module, input order) when the region is a per-neuron function no
    named activation matches: ``act(up)`` for one input, ``act(gate) * up`` for two (either
    order; the order gives the inputs in the rule's roles)."""
    if len(widths) not in (1, 2) or len(set(widths)) != 1:
        return None
    width = widths[0]
    if len(widths) == 1:
        act = _region_module(gm, region, sink, cut=cut)
        return (FFN_RULES[0], act, (0,)) if _per_neuron(act, width, 1) else None
    full = _region_module(gm, region, sink, cut=cut).forward
    u = _probe(width, seed=41)
    g = _probe(width, seed=43)
    for gate_i in (0, 1):
        up_i = 1 - gate_i
        act = _region_module(gm, region, sink, ones=frozenset({up_i}), cut=cut)
        args = [None, None]
        args[gate_i], args[up_i] = g, u
        try:
            with torch.no_grad():
                linear_in_up = _same(full(*args), act(g) * u)
        except Exception:
            continue
        if linear_in_up and _per_neuron(act, width, 1):
            return FFN_RULES[1], act, (gate_i, up_i)
    return None


def _classify(
    gm: GraphModule, region: _Region, sink: Node, cut: _Cut | None
) -> tuple[FFNRule, str, nn.Module | None, tuple[int, ...]] | None:
    """(rule, activation name, captured module or None, input order) of the region's
    elementwise function of its inputs (projection outputs, or the parts of a cut fused one):
    a named activation under an unsplit rule, else a captured per-neuron one."""
    widths = (tuple(len(r) for r in cut.rows) if cut is not None
              else tuple(p.out_features for p in region.sources))
    n = len(widths)
    fn = _region_module(gm, region, sink, cut=cut).forward
    for rule in FFN_RULES:
        if rule.split or len(rule.roles) != n:
            continue
        for perm in ((0,),) if n == 1 else ((0, 1), (1, 0)):

            def ordered(*xs, _perm=perm):  # xs in the rule's role order
                return fn(*[xs[_perm.index(i)] for i in range(len(xs))])

            act = _identify(ordered, rule, tuple(widths[i] for i in perm))
            if act is not None:
                return rule, act, None, perm
    captured = _captured_activation(gm, region, sink, widths, cut)
    if captured is not None:
        return captured[0], CAPTURED_ACTIVATION, captured[1], captured[2]
    return None


def _fused_rule_for(width: int, gate: tuple[int, ...], up: tuple[int, ...]) -> FFNRule | None:
    rows = tuple(range(width))
    for rule in FFN_RULES:
        if rule.rows is not None and tuple(rows[s] for s in rule.rows(width)) == (gate, up):
            return rule
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
    cut = None
    if any(is_split(n) for n in region.nodes):
        if len(region.sources) != 1:
            return (f"it cuts the outputs of {len(region.sources)} projections; only one fused "
                    "gate_up projection is read in parts")
        cut = _cut(gm, region)
        if isinstance(cut, str):
            return cut
    verdict = _classify(gm, region, down.input, cut)
    if verdict is None:
        names = "/".join(a.name for a in ACTIVATIONS)
        what = (f"{len(region.sources)} projection(s)" if cut is None else
                "the two halves of a fused gate_up projection")
        return (
            f"the elementwise function of {what} matches no rule "
            f"({', '.join(r.name for r in FFN_RULES)}) with a known activation ({names}), "
            "and it is not one function applied to every hidden unit alike either (a per-unit "
            "parameter?)"
        )
    rule, act, act_fn, perm = verdict
    if cut is None:
        region.sources = [region.sources[i] for i in perm]
        return rule, act, act_fn
    gate, up = (cut.rows[i] for i in perm)
    width = region.sources[0].out_features
    fused = _fused_rule_for(width, gate, up)
    if fused is None:
        return (f"the fused projection's gate rows {_span(gate)} and up rows {_span(up)} are "
                "laid out as no rule declares (halves, either first, or interleaved)")
    return fused, act, act_fn


def _span(rows: tuple[int, ...]) -> str:
    return f"[{', '.join(map(str, rows[:4]))}{', ...' if len(rows) > 4 else ''}]"


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
    fused_rows = None
    if rule.rows is not None:
        rows = tuple(range(2 * d_ff))
        gate, up = rule.rows(2 * d_ff)
        fused_rows = (rows[gate], rows[up])
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
        fused_rows=fused_rows,
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

