"""Lower matmuls to FP8 (E4M3, DeepSeek-V3 1x128 / 128x128 scaling, FP32 accumulation).

Matches: every projection of the captured graph (``linear``, GPT-2's ``addmm`` Conv1D) whose
owning module computes exactly that projection, and every MoE block's routed experts.
Checks: every weight to be stored or quantized in FP8 is finite (a NaN or inf makes its
128x128 block's scale, hence the whole block, NaN: an :class:`InputError` names it before
anything changes; :func:`check_finite_weights`). DeepSeek-V3's high-precision list is kept
by default: the output head (a projection with no projection downstream whose result
reaches the output through single-input ops only), the MoE router, embeddings, norms and
attention's softmax path (not projections, never touched);
plus the user's ``filter_fn(module, fqn)``; plus, where GPTQ rounds on calibration batches,
the linears whose rounding costs the most (:func:`keep_sensitive`,
``FP8Config.high_precision_budget``). Emits:
:class:`rewriter.targets.fp8_linear.FP8Linear` / :class:`~rewriter.targets.fp8_linear.FP8MoEFFN`
swapped into the model, and a report of what was lowered and what was skipped, with the reason.
Opt-in (``embeddings="fp8"``, deployment): embedding tables ->
:class:`rewriter.targets.fp8_embedding.FP8Embedding`, a head tied to one ->
:class:`~rewriter.targets.fp8_embedding.FP8TiedHead` on the same FP8 table.
"""

from __future__ import annotations

import inspect
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import torch
from rewriter.models.moe import MoEFFN
from rewriter.targets.fp8 import dequantize_blockwise
from rewriter.targets.fp8_embedding import FP8Embedding, FP8TiedHead
from rewriter.targets.fp8_linear import (
    ACTIVATION_MODES,
    MODES,
    ActivationMemo,
    FP8Linear,
    FP8MoEFFN,
    scope_activation_memos,
)
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from rewriter.errors import InputError
from rewriter.graph_ops import is_elementwise, is_reshape, module_stack, op_name
from rewriter.projections import find_projections

from .cleanup import is_identity_op
from .gptq import DEFAULT_DAMPENING, collect_input_hessians, gptq_quantize_blockwise
from .sensitivity import choose_high_precision, fisher_sensitivity, ranking

__all__ = [
    "FP8Config",
    "LoweringDecision",
    "plan_fp8",
    "apply_fp8",
    "check_finite_weights",
    "find_output_heads",
    "find_routers",
    "gptq_rounding",
    "keep_sensitive",
    "uses_gptq",
    "WEIGHT_ROUNDINGS",
]


EMBEDDING_MODES = ("keep", "fp8")
WEIGHT_ROUNDINGS = ("auto", "nearest", "gptq")


@dataclass(frozen=True)
class FP8Config:
    """``mode``: "inference" stores weights FP8 once; "training" keeps master weights and runs
    Fprop, Dgrad and Wgrad in FP8. ``activations``: "fp8" (W8A8) or "none" (weight-only,
    inference). ``pow2_scales``: round scales up to powers of two. ``keep_output_head``:
    leave the LM head in high precision (DeepSeek-V3). ``embeddings``: "keep" (high
    precision, DeepSeek-V3) or "fp8" (inference, for deployment: tables stored E4M3 with one
    fp32 scale per row; a head tied to a table reads the same FP8 table, weight-only).
    ``cache_dequantized``: inference on the CPU keeps each lowered weight's dequantized fp32
    copy (built on first eager forward, never saved, rebuilt when the FP8 weights change; same
    bits as dequantizing per call, 4 bytes per weight of RAM) and lets projections reading the
    same input (q/k/v, gate/up) share its fake quantization; False recomputes both per call.
    ``weight_rounding``: how inference-mode weights take their E4M3 codes: "nearest", "gptq"
    (error-compensating, on the calibration batches given to ``convert``; see
    :mod:`rewriter.passes.gptq`; same format and scales) or "auto" (GPTQ when ``convert`` is
    given calibration batches and the mode is inference, nearest otherwise). GPTQ applies to
    the swapped linears; MoE experts and embeddings round to nearest. ``gptq_dampening``: the
    ridge added to the input Hessian's diagonal, as a fraction of its mean.
    ``high_precision_budget``: where GPTQ rounds, the linears whose rounding costs the most
    (diagonal-Fisher sensitivity on the calibration batches, :mod:`rewriter.passes.sensitivity`)
    stay in high precision, most sensitive first (above-mean scores only), up to this fraction
    of the GPTQ-rounded linears' weight parameters (0: none; every rounded linear's reason gives
    its rank and share; GPTQ rounds in inference mode, with calibration, unless
    ``weight_rounding="nearest"``: elsewhere the budget does nothing). The
    default 0.05 was chosen on text of other domains than the calibration text (BENCHMARKS.md).
    """

    mode: str = "inference"
    activations: str = "fp8"
    pow2_scales: bool = False
    keep_output_head: bool = True
    embeddings: str = "keep"
    cache_dequantized: bool = True
    weight_rounding: str = "auto"
    gptq_dampening: float = DEFAULT_DAMPENING
    high_precision_budget: float = 0.05

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"FP8Config.mode must be one of {', '.join(MODES)}, "
                             f"got {self.mode!r}")
        if self.activations not in ACTIVATION_MODES:
            raise InputError(f"FP8Config.activations must be one of "
                             f"{', '.join(ACTIVATION_MODES)}, got {self.activations!r}")
        if self.mode == "training" and self.activations != "fp8":
            raise InputError("FP8Config.activations must be 'fp8' in training mode (all three "
                             "GEMMs run in FP8)")
        for name in ("pow2_scales", "keep_output_head"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"FP8Config.{name} must be a bool")
        if not isinstance(self.cache_dequantized, bool):
            raise InputError(f"FP8Config.cache_dequantized must be a bool, got "
                             f"{self.cache_dequantized!r}")
        if self.embeddings not in EMBEDDING_MODES:
            raise InputError(f"FP8Config.embeddings must be one of "
                             f"{', '.join(EMBEDDING_MODES)}, got {self.embeddings!r}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise InputError(f"FP8Config.weight_rounding must be one of "
                             f"{', '.join(WEIGHT_ROUNDINGS)}, got {self.weight_rounding!r}")
        if self.weight_rounding == "gptq" and self.mode != "inference":
            raise InputError("FP8Config.weight_rounding='gptq' rounds stored FP8 weights once: "
                             "it needs mode='inference' (training re-quantizes every step)")
        if isinstance(self.gptq_dampening, bool) or \
                not isinstance(self.gptq_dampening, (int, float)) or \
                not 0 < self.gptq_dampening < float("inf"):
            raise InputError(f"FP8Config.gptq_dampening must be a positive number, got "
                             f"{self.gptq_dampening!r}")
        if isinstance(self.high_precision_budget, bool) or \
                not isinstance(self.high_precision_budget, numbers.Real) or \
                not 0 <= self.high_precision_budget < 1:
            raise InputError(f"FP8Config.high_precision_budget must be a fraction in [0, 1), "
                             f"got {self.high_precision_budget!r}")
        if self.embeddings == "fp8" and self.mode != "inference":
            raise InputError("FP8Config.embeddings='fp8' stores the tables FP8 for deployment: "
                             "it needs mode='inference'")


@dataclass(frozen=True)
class LoweringDecision:
    fqn: str
    kind: str  # "linear" | "conv1d" | "moe_experts" | "embedding" | "tied_head"
    lowered: bool
    reason: str
    params: int = 0


_PASS_THROUGH = ("view", "reshape", "slice", "getitem", "select", "to", "_to_copy", "float",
                 "contiguous", "clone", "alias", "_unsafe_view", "squeeze", "unsqueeze")


def _single_path_to_output(node: Node) -> bool:
    """True when ``node``'s value reaches the graph output only through single-input ops."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if user.op == "output":
                continue
            tensor_inputs = [a for a in user.all_input_nodes if a.op != "get_attr"
                             and "sym_size" not in str(user.target)]
            if op_name(user) not in _PASS_THROUGH and not is_reshape(user) \
                    and not is_identity_op(user) and len(tensor_inputs) > 1:
                return False
            stack.append(user)
    return True


def find_output_heads(gm: GraphModule) -> set[str]:
    """Module FQNs of output heads: projections with no projection downstream whose result
    flows to the output unmixed (no residual add)."""
    projections = find_projections(gm)
    proj_nodes = {p.node for p in projections}
    downstream: dict[Node, bool] = {}
    for node in reversed(list(gm.graph.nodes)):
        downstream[node] = any(u in proj_nodes or downstream.get(u, False) for u in node.users)
    return {p.module for p in projections
            if not downstream[p.output] and _single_path_to_output(p.output)}


_ROUTING = frozenset({"topk", "sort", "argsort", "max", "argmax"})


def find_routers(gm: GraphModule) -> set[str]:
    """Module FQNs of routers: projections whose scores pick experts (their output reaches a
    top-k / sort / argmax through elementwise ops and softmax), as in transformers' Mixtral,
    Qwen-MoE or DeepSeek gates."""
    found = set()
    for p in find_projections(gm):
        stack, seen = [p.output], set()
        while stack and len(seen) < 32:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            for user in node.users:
                name = op_name(user) or ""
                if name in _ROUTING:
                    found.add(p.module)
                    stack.clear()
                    break
                if is_elementwise(user) or is_identity_op(user) or is_reshape(user) or \
                        name in ("softmax", "_softmax", "log_softmax", "to", "_to_copy"):
                    stack.append(user)
    return found


def _nodes_of(gm: GraphModule, fqn: str) -> set[Node]:
    return {n for n in gm.graph.nodes if fqn in module_stack(n)
            and n.op not in ("get_attr", "placeholder", "output") and not is_identity_op(n)
            and "sym_size" not in str(n.target)}


def plan_fp8(model: nn.Module, gm: GraphModule, config: FP8Config,
             filter_fn: Callable[[nn.Module, str], bool] | None = None
             ) -> list[LoweringDecision]:
    """What to lower and what to keep, with reasons, before anything changes."""
    heads = find_output_heads(gm) if config.keep_output_head else set()
    projections = {p.module: p for p in find_projections(gm)}
    routers = {f"{name}.router" if name else "router"
               for name, m in model.named_modules() if isinstance(m, MoEFFN)}
    routers |= find_routers(gm)
    decisions: list[LoweringDecision] = []
    for name, module in model.named_modules():
        if isinstance(module, (FP8Linear, FP8MoEFFN)):
            decisions.append(LoweringDecision(name, "linear", False, "already FP8"))
            continue
        if isinstance(module, MoEFFN):
            n = sum(p.numel() for p in (module.w_up, module.w_gate, module.w_down)
                    if p is not None)
            ok = filter_fn is None or filter_fn(module, name)
            decisions.append(LoweringDecision(
                name, "moe_experts", ok, "routed experts -> FP8 grouped GEMMs; router stays fp32"
                if ok else "excluded by filter_fn", n))
            continue
        if isinstance(module, nn.Embedding):
            decisions.append(_embedding_decision(gm, module, name, config, filter_fn))
            continue
        proj = projections.get(name)
        if proj is None:
            if isinstance(module, nn.Linear):
                decisions.append(LoweringDecision(name, "linear", False,
                                                  "not called in the captured graph"))
            continue
        kind = "linear" if proj.layout == "linear" else "conv1d"
        params = proj.params
        if name in routers:
            reason = "MoE router: kept in fp32 (DeepSeek-V3 keeps gating in high precision)"
        elif name in heads:
            reason = "output head: kept in high precision (DeepSeek-V3)"
        elif filter_fn is not None and not filter_fn(module, name):
            reason = "excluded by filter_fn"
        elif not _nodes_of(gm, name):
            reason = (f"{type(module).__name__} is never called: another module's forward "
                      "multiplies by its weight (NeoMME's x @ unembedding.weight), not swappable")
        elif not ((isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward)
                  or _nodes_of(gm, name) == {n for n in proj.nodes if n.op != "get_attr"}):
            reason = f"matmul inside {type(module).__name__}.forward with other ops: not swappable"
        elif len(inspect.signature(module.forward).parameters) > 1:
            reason = (f"{type(module).__name__}.forward takes more than its input (I-BERT's "
                      "scaling factors): FP8Linear would drop the rest, not swappable")
        else:
            decisions.append(LoweringDecision(name, kind, True, f"{kind} -> FP8Linear", params))
            continue
        decisions.append(LoweringDecision(name, kind, False, reason, params))
    decisions = _tie_heads(model, decisions)
    check_finite_weights(_lowered_weights(model, decisions), "FP8 lowering",
                         "or keep the module in high precision with filter_fn")
    return decisions


def _lowered_weights(model: nn.Module, decisions: list[LoweringDecision]
                     ) -> Iterable[tuple[str, Tensor]]:
    """(FQN, tensor) of every weight the planned lowering quantizes to FP8 (a tied head
    reads its embedding's table, checked as the embedding's weight)."""
    for d in decisions:
        if not d.lowered or d.kind == "tied_head":
            continue
        module = model.get_submodule(d.fqn) if d.fqn else model
        names = ("w_up", "w_gate", "w_down") if d.kind == "moe_experts" else ("weight",)
        for name in names:
            w = getattr(module, name, None)
            if isinstance(w, Tensor):
                yield (f"{d.fqn}.{name}" if d.fqn else name), w


FP8_NON_FINITE = " (its FP8 block scale would be non-finite and every value of the block NaN)"


def check_finite_weights(weights: Iterable[tuple[str, Tensor]], what: str,
                         remedy: str = "", why: str = FP8_NON_FINITE) -> None:
    """InputError naming the first of ``weights`` (``(fqn, tensor)`` pairs) that holds a NaN
    or an inf: FP8 scales come from each block's amax, so one non-finite value makes its whole
    128x128 block (1x128 tile, table row) NaN. Tensors without data (meta) are skipped."""
    for fqn, w in weights:
        if w.is_meta:
            continue
        with torch.no_grad():
            finite = bool(torch.isfinite(w.detach()).all())
        if not finite:
            raise InputError(
                f"{what}: parameter {fqn} has NaN or Inf values{why}: fix the weights"
                + (f", {remedy}" if remedy else ""))


def _embedding_decision(gm: GraphModule, module: nn.Embedding, name: str, config: FP8Config,
                        filter_fn: Callable[[nn.Module, str], bool] | None
                        ) -> LoweringDecision:
    params = module.weight.numel()
    if config.embeddings == "keep":
        reason = ("embedding: kept in high precision (DeepSeek-V3); FP8Config.embeddings='fp8' "
                  "stores it FP8")
    elif not _nodes_of(gm, name):
        reason = "not called in the captured graph"
    elif type(module).forward is not nn.Embedding.forward:
        reason = f"{type(module).__name__}.forward does more than a lookup: not swappable"
    elif module.max_norm is not None:
        reason = "max_norm renormalizes rows in forward: kept"
    elif filter_fn is not None and not filter_fn(module, name):
        reason = "excluded by filter_fn"
    else:
        return LoweringDecision(name, "embedding", True, "embedding -> FP8Embedding (E4M3, one "
                                "fp32 scale per row; gathered rows dequantized)", params)
    return LoweringDecision(name, "embedding", False, reason, params)


def _tie_heads(model: nn.Module, decisions: list[LoweringDecision]) -> list[LoweringDecision]:
    """A linear whose weight is a lowered embedding's table (tied head) reads the FP8 table:
    one table, whatever ``keep_output_head`` says (an fp32 copy would untie it)."""
    tables = {id(model.get_submodule(d.fqn).weight): d.fqn for d in decisions
              if d.lowered and d.kind == "embedding"}
    if not tables:
        return decisions
    out = []
    for d in decisions:
        module = model.get_submodule(d.fqn) if d.fqn else model
        table = tables.get(id(getattr(module, "weight", None)))
        if d.kind == "linear" and isinstance(module, nn.Linear) and table is not None:
            d = LoweringDecision(d.fqn, "tied_head", True, f"head tied to {table}: reads its FP8 "
                                 "table (weight-only, fp32 matmul)", 0)
        out.append(d)
    return out


def uses_gptq(config: FP8Config, calibrated: bool) -> bool:
    """Whether ``config.weight_rounding`` asks for GPTQ given calibration (or not)."""
    if config.weight_rounding == "auto":
        return calibrated and config.mode == "inference"
    return config.weight_rounding == "gptq"


def _weight_nk(module: nn.Module, kind: str) -> Tensor:
    weight = module.weight.detach()
    return weight.t() if kind == "conv1d" else weight  # (N, K)


def gptq_rounding(model: nn.Module, decisions: list[LoweringDecision], config: FP8Config,
                  batches: list, *, progress: bool | None = None
                  ) -> tuple[dict[str, tuple[Tensor, Tensor]], list[LoweringDecision]]:
    """GPTQ codes and scales for every planned linear of ``model`` (unchanged), from its
    inputs on ``batches``; and the decisions with their reasons saying how each was rounded.
    Returns ``({fqn: (q, scale)}, decisions)``."""
    linears = {d.fqn for d in decisions if d.lowered and d.kind in ("linear", "conv1d")}
    weights = {d.fqn: _weight_nk(model.get_submodule(d.fqn), d.kind) for d in decisions
               if d.fqn in linears}  # (N, K) views, no copies
    hessians = collect_input_hessians(model, {f: w.shape[1] for f, w in weights.items()},
                                      batches, progress=progress)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    show = sys.stderr.isatty() if progress is None else progress
    for fqn, h in tqdm(hessians.items(), desc="GPTQ rounding", unit="linear",
                       disable=not show):
        out[fqn] = gptq_quantize_blockwise(weights[fqn], h.mean(),
                                           dampening=config.gptq_dampening,
                                           pow2=config.pow2_scales)
    tokens = max((h.tokens for h in hessians.values()), default=0)
    noted = []
    for d in decisions:
        if d.fqn in out:
            d = replace(d, reason=f"{d.reason} (GPTQ rounding, {tokens} calibration tokens)")
        elif d.fqn in linears:
            d = replace(d, reason=f"{d.reason} (nearest rounding: its module's first input is "
                        "not the activation, so GPTQ saw no inputs)")
        elif d.lowered and d.kind == "moe_experts":
            d = replace(d, reason=f"{d.reason} (nearest rounding: GPTQ covers linears only)")
        noted.append(d)
    return out, noted


def keep_sensitive(model: nn.Module, decisions: list[LoweringDecision], config: FP8Config,
                   quantized: Mapping[str, tuple[Tensor, Tensor]], batches: list, *,
                   progress: bool | None = None
                   ) -> tuple[dict[str, tuple[Tensor, Tensor]], list[LoweringDecision]]:
    """Keep the GPTQ-rounded linears whose rounding costs the most in high precision, within
    ``config.high_precision_budget`` of their parameters (see :mod:`.sensitivity`); ``model``
    unchanged. Returns ``(quantized without them, decisions with them not lowered)``."""
    if config.high_precision_budget <= 0 or not quantized:
        return dict(quantized), decisions
    kinds = {d.fqn: d.kind for d in decisions}
    rounded = {}
    for fqn, (q, s) in quantized.items():
        w = dequantize_blockwise(q, s).to(model.get_submodule(fqn).weight.dtype)  # (N, K)
        rounded[fqn] = w.t() if kinds[fqn] == "conv1d" else w  # the module's weight layout
    scores = fisher_sensitivity(model, rounded, batches, progress=progress)
    sizes = {fqn: w.numel() for fqn, w in rounded.items()}
    kept = choose_high_precision(scores, sizes, config.high_precision_budget)
    total = sum(scores.values()) or 1.0
    rank = {fqn: i + 1 for i, fqn in enumerate(ranking(scores))}
    noted = []
    for d in decisions:
        if d.fqn in kept:
            d = replace(d, lowered=False, reason=(
                f"kept in high precision: FP8 rounding sensitivity rank {rank[d.fqn]} of "
                f"{len(scores)} ({scores[d.fqn] / total:.1%} of the Fisher-weighted rounding "
                f"error; FP8Config.high_precision_budget={config.high_precision_budget})"))
        elif d.fqn in scores and d.reason.endswith(")"):  # rounded: its rank, why not kept
            why = ("below the mean" if scores[d.fqn] <= total / len(scores) else
                   "over the budget")
            d = replace(d, reason=f"{d.reason[:-1]}; sensitivity rank {rank[d.fqn]} of "
                        f"{len(scores)}, {scores[d.fqn] / total:.1%}, {why})")
        noted.append(d)
    return {f: v for f, v in quantized.items() if f not in kept}, noted


def apply_fp8(model: nn.Module, decisions: list[LoweringDecision], config: FP8Config,
              quantized: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> int:
    """Swap the planned modules (in place). ``quantized``: FP8 codes and scales by linear FQN
    (from :func:`gptq_rounding`) to store instead of nearest rounding. Returns the number of
    modules lowered."""
    kwargs = dict(mode=config.mode, activations=config.activations, pow2=config.pow2_scales)
    kwargs["cache_dequantized"] = config.cache_dequantized
    kwargs["activation_memo"] = ActivationMemo()  # one per model: q/k/v, gate/up share x's
    count = _apply_embeddings(model, decisions, config)
    for d in decisions:
        if not d.lowered or d.kind in ("embedding", "tied_head"):
            continue
        module = model.get_submodule(d.fqn) if d.fqn else model
        if d.kind == "moe_experts":
            new = FP8MoEFFN(module, **kwargs)
        else:
            new = FP8Linear.from_linear(module, transposed=d.kind == "conv1d",
                                        quantized=(quantized or {}).get(d.fqn), **kwargs)
        if d.fqn:
            model.set_submodule(d.fqn, new)
        else:
            raise InputError("the model itself is a single projection: nothing to swap it into")
        count += 1
    scope_activation_memos(model)  # sharing lives for one forward call of the model
    return count


def _apply_embeddings(model: nn.Module, decisions: list[LoweringDecision],
                      config: FP8Config) -> int:
    """Swap the planned embeddings for FP8Embedding, then their tied heads for FP8TiedHead."""
    tables, count = {}, 0
    for d in decisions:
        if d.lowered and d.kind == "embedding":
            if not d.fqn:
                raise InputError("the model itself is an embedding: nothing to swap it into")
            module = model.get_submodule(d.fqn)
            new = FP8Embedding.from_embedding(module, pow2=config.pow2_scales)
            tables[id(module.weight)] = new
            model.set_submodule(d.fqn, new)
            count += 1
    for d in decisions:
        if d.lowered and d.kind == "tied_head":
            module = model.get_submodule(d.fqn)
            model.set_submodule(d.fqn, FP8TiedHead(tables[id(module.weight)], module.bias))
            count += 1
    return count

