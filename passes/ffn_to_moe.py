"""FFN -> DeepSeekMoE: routed fine-grained experts + an always-on shared expert + a router.

Matches: every :class:`~rewriter.patterns.FFNMatch` (MLP and GLU, bias or not, fused gate_up,
GPT-2 Conv1D). Checks (all FFNs, before anything changes): the hidden width splits into the
configured experts, the weights are finite, calibration data exists where a strategy needs it.
Emits: one :class:`rewriter.models.moe.MoEFFN` per FFN, its weights sliced from the dense ones so
that with ``top_k == num_experts`` and hard gates it computes exactly the dense FFN; in graph mode a
``call_module`` node replaces the block's nodes, in module mode the block is swapped into a
copy of the user's model (see :mod:`rewriter.passes.module_swap`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from rewriter.models.moe import GATE_MODES, MoEFFN
from torch.fx import GraphModule, Node

from rewriter.errors import InputError
from rewriter.graph_ops import GROUP_META_KEY
from rewriter.pass_manager import PassResult
from rewriter.patterns import FFNMatch

from .allocation import ALLOCATIONS
from .calibration import NeuronStats
from .grouping import GROUPINGS, SHARED_SELECTIONS, group_neurons, select_shared
from .lower_fp8 import check_finite_weights
from .router_init import (
    ROUTER_INITS,
    centroid_router,
    expert_contributions,
    fit_router,
    topk_recall,
)

__all__ = [
    "MoEConfig",
    "ExpertPlan",
    "DenseFFNWeights",
    "plan_experts",
    "dense_weights",
    "build_moe_block",
    "check_finite",
    "FFNToMoE",
    "split_error",
]


@dataclass(frozen=True)
class MoEConfig:
    """How to cut each FFN into experts.

    ``num_experts`` routed experts and ``shared_experts`` shared units: d_ff is cut into
    num_experts + shared_experts equal slices and the shared slices form one always-on MLP. Or
    give ``shared_width`` in neurons (Qwen-MoE style) and the rest is split evenly.
    ``allocation``: ``"uniform"`` (every block routes to top_k) or ``"calibrated"`` (the
    blocks share the same budget of active neurons, each with its own top_k, chosen by a
    Fisher estimate of the loss; see :mod:`rewriter.passes.allocation`).
    ``router_bias``: the calibrated router fits a per-expert logit bias (True) or passes
    through the origin (False: Hugging Face's DeepSeek-V3 / Glm4Moe / Qwen2-MoE routers have
    no bias, so a model meant for ``rewriter.save(format="hf")`` needs False).
    ``calibration_samples``: calibration tokens kept per FFN (a uniform sample) to fit the
    router and the allocation; memory ~ samples x (2 d + d_ff) x 4 bytes per FFN. More fit
    better (bench/moe_quality.py: 4096 -> 16384 moved SmolLM2 at 75% active from +13.3% to
    +11.5% of dense perplexity) when the calibration data holds that many tokens.
    ``grouping``/``shared_selection``/``router_init``/``allocation`` default to ``"auto"``: the
    calibrated choices (coactivation / activation / calibrated / calibrated) when calibration
    data is given, else kmeans / contiguous / centroid / uniform.
    """

    num_experts: int
    top_k: int
    shared_experts: int = 0
    shared_width: int | None = None
    gate: str = "hard"
    renormalize: bool = True
    route_scale: float = 1.0
    grouping: str = "auto"
    shared_selection: str = "auto"
    router_init: str = "auto"
    allocation: str = "auto"
    aux_loss_coef: float = 0.0
    seed: int = 0
    kmeans_iters: int = 15
    calibration_samples: int = 4096
    router_bias: bool = True

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "shared_experts", "seed", "kmeans_iters",
                     "calibration_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(f"MoEConfig.{name} must be an int, got {value!r}")
        if self.num_experts < 1:
            raise InputError(f"MoEConfig.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise InputError(
                f"MoEConfig.top_k must be in [1, num_experts={self.num_experts}], "
                f"got {self.top_k}"
            )
        if self.shared_experts < 0:
            raise InputError(f"MoEConfig.shared_experts must be >= 0, got {self.shared_experts}")
        if self.calibration_samples < 2:
            raise InputError("MoEConfig.calibration_samples must be >= 2, got "
                             f"{self.calibration_samples}")
        if self.shared_width is not None:
            if not isinstance(self.shared_width, int) or self.shared_width < 0:
                raise InputError(
                    f"MoEConfig.shared_width must be an int >= 0, got {self.shared_width!r}"
                )
            if self.shared_experts:
                raise InputError(
                    "MoEConfig.shared_width and MoEConfig.shared_experts are exclusive: "
                    "give one of them"
                )
        choices = {
            "gate": GATE_MODES,
            "grouping": ("auto", *GROUPINGS),
            "shared_selection": ("auto", *SHARED_SELECTIONS),
            "router_init": ("auto", *ROUTER_INITS),
            "allocation": ("auto", *ALLOCATIONS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(
                    f"MoEConfig.{name} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        if not isinstance(self.router_bias, bool):
            raise InputError(f"MoEConfig.router_bias must be a bool, got {self.router_bias!r}")
        for name in ("route_scale", "aux_loss_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"MoEConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.route_scale == 0:
            raise InputError("MoEConfig.route_scale must be > 0")

    def resolved(self, calibrated: bool) -> MoEConfig:
        """The config with every "auto" replaced by the default for (un)calibrated use."""
        auto = {
            "grouping": "coactivation" if calibrated else "kmeans",
            "shared_selection": "activation" if calibrated else "contiguous",
            "router_init": "calibrated" if calibrated else "centroid",
            "allocation": "calibrated" if calibrated else "uniform",
        }
        changes = {k: v for k, v in auto.items() if getattr(self, k) == "auto"}
        return MoEConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


@dataclass(frozen=True)
class ExpertPlan:
    """Sizes of one FFN's experts."""

    d_ff: int
    num_experts: int
    expert_dim: int
    shared_dim: int


def _divisors_hint(d_ff: int, shared: int) -> str:
    counts = [n for n in range(2, 65) if d_ff % (n + shared) == 0]
    return ", ".join(map(str, counts[:12])) or "none up to 64"


def plan_experts(config: MoEConfig, d_ff: int, module: str) -> ExpertPlan:
    """Expert sizes for an FFN of width ``d_ff``, or InputError saying what would work."""
    where = f"FFN {module or '<root>'} (d_ff={d_ff})"
    if config.shared_width is not None:
        shared = config.shared_width
        if shared >= d_ff:
            raise InputError(f"MoEConfig.shared_width={shared} must be < d_ff of {where}")
        rest = d_ff - shared
        if rest % config.num_experts:
            ok = [n for n in range(2, 65) if rest % n == 0][:12]
            raise InputError(
                f"MoEConfig.num_experts={config.num_experts} does not divide the "
                f"{rest} routed neurons of {where} with shared_width={shared}; "
                f"num_experts that work: {', '.join(map(str, ok))}"
            )
        return ExpertPlan(d_ff, config.num_experts, rest // config.num_experts, shared)
    units = config.num_experts + config.shared_experts
    if d_ff % units:
        raise InputError(
            f"MoEConfig.num_experts={config.num_experts} + shared_experts="
            f"{config.shared_experts} = {units} slices do not divide {where}; with "
            f"shared_experts={config.shared_experts}, num_experts that work: "
            f"{_divisors_hint(d_ff, config.shared_experts)} (or give shared_width)"
        )
    unit = d_ff // units
    return ExpertPlan(d_ff, config.num_experts, unit, unit * config.shared_experts)


@dataclass(frozen=True)
class DenseFFNWeights:
    """A dense FFN's weights in nn.Linear layout: up/gate (d_ff, d), down (d, d_ff)."""

    up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    names: dict[str, str] = field(default_factory=dict)  # role -> parameter FQN

    @property
    def first_rows(self) -> torch.Tensor:
        """Rows describing each neuron's input: [gate | up] for GLUs, up for MLPs."""
        return self.up if self.gate is None else torch.cat([self.gate, self.up], dim=1)


def dense_weights(match: FFNMatch) -> DenseFFNWeights:
    """Detached linear-layout weights of an FFN, whatever its kind and layout."""

    def w(role: str) -> torch.Tensor:
        p = match.projections[role]
        t = p.weight.param.detach()
        return t if p.layout == "linear" else t.T

    def b(role: str) -> torch.Tensor | None:
        p = match.projections[role]
        return None if p.bias is None else p.bias.param.detach()

    names = {k: ref.fqn for k, ref in match.weights.items()}
    if match.kind == "glu_fused":
        fused, fused_b = w("gate_up"), b("gate_up")
        if match.fused_rows is None:
            raise ValueError(f"FFN {match.module or '<root>'}: a glu_fused match without "
                             "fused_rows (which rows of gate_up are the gate, which the up)")
        rows_gate, rows_up = (torch.tensor(r, dtype=torch.long) for r in match.fused_rows)
        gate, up = fused[rows_gate], fused[rows_up]  # (d_ff, d) each: halves or interleaved
        b_gate, b_up = (None, None) if fused_b is None else (fused_b[rows_gate], fused_b[rows_up])
        return DenseFFNWeights(up, w("down"), gate, b_up, b_gate, b("down"), names)
    gate = w("gate") if "gate" in match.projections else None
    b_gate = b("gate") if "gate" in match.projections else None
    return DenseFFNWeights(w("up"), w("down"), gate, b("up"), b_gate, b("down"), names)


def check_finite(weights: DenseFFNWeights, module: str) -> None:
    """InputError naming the first of the FFN's weights and biases with a NaN or an inf."""
    keys = {"up": "up.weight", "down": "down.weight", "gate": "gate.weight"}
    roles = ("up", "down", "gate", "b_up", "b_gate", "b_down")
    check_finite_weights(((weights.names.get(keys.get(r, ""), r), getattr(weights, r))
                          for r in roles if getattr(weights, r) is not None),
                         f"FFN {module or '<root>'}", why="")


def build_moe_block(
    match: FFNMatch,
    config: MoEConfig,
    plan: ExpertPlan,
    stats: NeuronStats | None = None,
) -> tuple[MoEFFN, dict[str, Any]]:
    """The MoE block replacing ``match`` and a report of the choices made."""
    weights = dense_weights(match)
    d_ff = match.d_ff
    mean_abs = stats.mean_abs if stats is not None else None
    shared = select_shared(config.shared_selection, d_ff, plan.shared_dim, mean_abs=mean_abs)
    is_shared = torch.zeros(d_ff, dtype=torch.bool)
    is_shared[shared] = True
    routed = torch.nonzero(~is_shared).flatten()
    groups = group_neurons(
        config.grouping, routed, plan.num_experts,
        first_rows=weights.first_rows,
        coactivation=stats.coactivation if stats is not None else None,
        seed=config.seed, iters=config.kmeans_iters,
    )
    calibrated_router = config.router_init == "calibrated"
    router_bias = calibrated_router and config.router_bias
    dtype = weights.up.dtype
    block = MoEFFN(
        match.d_model, plan.expert_dim, plan.num_experts, config.top_k,
        shared_dim=plan.shared_dim, activation=match.activation,
        glu=weights.gate is not None, bias=match.has_bias, gate=config.gate,
        renormalize=config.renormalize, route_scale=config.route_scale,
        router_bias=router_bias, aux_loss_coef=config.aux_loss_coef, dtype=dtype,
        # its own copy: learned scalars of the activation must not alias the source model's
        activation_fn=copy.deepcopy(match.activation_fn),
    )
    report: dict[str, Any] = {
        "module": match.module, "experts": plan.num_experts, "expert_dim": plan.expert_dim,
        "shared_dim": plan.shared_dim, "top_k": config.top_k, "grouping": config.grouping,
        "shared_selection": config.shared_selection, "router_init": config.router_init,
    }
    with torch.no_grad():
        block.w_up.copy_(torch.stack([weights.up[g] for g in groups]))
        block.w_down.copy_(torch.stack([weights.down[:, g] for g in groups]))
        if block.w_gate is not None:
            block.w_gate.copy_(torch.stack([weights.gate[g] for g in groups]))
        zeros = torch.zeros(d_ff, dtype=dtype)
        if block.b_up is not None:
            b_up = weights.b_up if weights.b_up is not None else zeros
            block.b_up.copy_(torch.stack([b_up[g] for g in groups]))
        if block.b_gate is not None:
            b_gate = weights.b_gate if weights.b_gate is not None else zeros
            block.b_gate.copy_(torch.stack([b_gate[g] for g in groups]))
        if block.b_out is not None:
            block.b_out.copy_(weights.b_down if weights.b_down is not None
                              else torch.zeros(match.d_model, dtype=dtype))
        if block.shared is not None:
            block.shared.up.weight.copy_(weights.up[shared])
            block.shared.down.weight.copy_(weights.down[:, shared])
            if block.shared.gate is not None:
                block.shared.gate.weight.copy_(weights.gate[shared])
            if block.shared.up.bias is not None:
                block.shared.up.bias.copy_((weights.b_up if weights.b_up is not None
                                            else zeros)[shared])
            if block.shared.gate is not None and block.shared.gate.bias is not None:
                block.shared.gate.bias.copy_((weights.b_gate if weights.b_gate is not None
                                              else zeros)[shared])
        gate_rows = weights.gate if weights.gate is not None else weights.up
        if calibrated_router:
            if stats is None or stats.sample_x is None:
                raise InputError("MoEConfig.router_init='calibrated' needs calibration data")
            contrib = expert_contributions(stats.sample_h, weights.down, groups)
            w, b = fit_router(stats.sample_x, contrib, top_k=config.top_k,  # measured winner
                              intercept=router_bias)
            block.router.weight.copy_(w)
            if router_bias:
                block.router.bias.copy_(b)
            scores = stats.sample_x.double() @ w.double().T + b.double()
            report["router_recall"] = topk_recall(scores, contrib, config.top_k)
        else:
            block.router.weight.copy_(centroid_router(gate_rows, groups))
            if stats is not None and stats.sample_x is not None:
                contrib = expert_contributions(stats.sample_h, weights.down, groups)
                scores = stats.sample_x.double() @ block.router.weight.double().T
                report["router_recall"] = topk_recall(scores, contrib, config.top_k)
    block.neuron_groups = [g.clone() for g in groups]  # for inspection: dense neuron ids
    block.shared_neurons = shared.clone()
    return block, report


# ----------------------------------------------------------------------------- graph mode


def _erase_block(gm: GraphModule, match: FFNMatch, replacement: Node) -> None:
    match.output.replace_all_uses_with(replacement)
    for node in reversed(match.nodes):
        if not node.users:
            gm.graph.erase_node(node)


def _new_module_name(gm: GraphModule, match: FFNMatch) -> str:
    base = f"{match.module}.moe" if match.module else f"moe_{match.index}"
    name, i = base, 1
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            return name
        name, i = f"{base}{i}", i + 1


class FFNToMoE:
    """Graph pass: replace the given FFN matches by MoE blocks (``call_module`` nodes).

    Built from a resolved config, the matches of the graph it will run on, and their plans and
    blocks (see :func:`rewriter.convert`), so every check has run before the graph changes.
    Matches of one FFN computed several times (a module called in a loop: same weights) may
    share a block: it is added once and called at each.
    """

    name = "ffn_to_moe"

    def __init__(self, matches: Sequence[FFNMatch], blocks: Sequence[MoEFFN],
                 reports: Sequence[dict[str, Any]]):
        self.matches, self.blocks, self.reports = list(matches), list(blocks), list(reports)

    def __call__(self, gm: GraphModule) -> PassResult:
        names: dict[int, str] = {}  # one submodule per block: an FFN computed twice (weights
        for match, block in zip(self.matches, self.blocks):  # shared) calls the same block
            target = names.get(id(block))
            if target is None:
                target = names[id(block)] = _new_module_name(gm, match)
                gm.add_submodule(target, block)
            with gm.graph.inserting_before(match.output):
                node = gm.graph.call_module(target, (match.input,))
            stack = dict(match.output.meta.get("nn_module_stack", {}))
            stack[target] = (target, f"{MoEFFN.__module__}.MoEFFN")
            node.meta.update(
                nn_module_stack=stack,
                **{k: match.output.meta[k] for k in ("val", "tensor_meta")
                   if k in match.output.meta},
            )
            cfg = block.config
            node.meta[GROUP_META_KEY] = (
                f"moe{match.index}",
                f"MoE {match.index} · {match.module or '<root>'} · {cfg.num_experts}×"
                f"{cfg.expert_dim} routed (top-{cfg.top_k}) + {cfg.shared_dim} shared",
                "moe",
            )
            _erase_block(gm, match, node)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return PassResult(gm, bool(self.matches), {"blocks": self.reports})



@torch.no_grad()
def split_error(block: MoEFFN, weights: DenseFFNWeights, *, tokens: int = 64,
                seed: int = 0) -> float:
    """Relative error, in float64 on seeded probes, of the block with every routed expert
    active (weight 1: the hard-gate split) against the dense FFN it came from. ~1e-16 when
    the experts and shared neurons partition the dense neurons exactly (for disjoint neuron
    sets S_i, ``W2 act(W1 x + b1) + b2 = sum_i W2[:, S_i] act(W1[S_i] x + b1[S_i]) + b2``);
    anything larger means weights were lost or duplicated."""
    def act(t: torch.Tensor) -> torch.Tensor:  # a captured activation may cast: stay float64
        return block.act(t).to(t.dtype)

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, block.d_model, generator=g, dtype=torch.float64)  # (T, d)

    def d(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().double()

    def ffn(up, down, gate=None, b_up=None, b_gate=None) -> torch.Tensor:  # (T, d)
        h = F.linear(x, up, b_up)
        h = act(F.linear(x, gate, b_gate)) * h if gate is not None else act(h)
        return F.linear(h, down)

    dense = ffn(d(weights.up), d(weights.down), d(weights.gate), d(weights.b_up),
                d(weights.b_gate))
    if weights.b_down is not None:
        dense = dense + d(weights.b_down)
    out = torch.zeros_like(dense)
    for e in range(block.num_experts):
        pick = (lambda t: None if t is None else d(t[e]))  # noqa: B023
        out += ffn(pick(block.w_up), pick(block.w_down), pick(block.w_gate), pick(block.b_up),
                   pick(block.b_gate))
    if block.shared is not None:
        s = block.shared
        out += ffn(d(s.up.weight), d(s.down.weight), d(s.gate.weight) if s.gate else None,
                   d(s.up.bias), d(s.gate.bias) if s.gate else None)
    if block.b_out is not None:
        out = out + d(block.b_out)
    return float((out - dense).norm() / dense.norm().clamp_min(1e-300))
