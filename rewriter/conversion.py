"""The one-call API: ``rewriter.convert(model, moe=MoEConfig(...), ...)``.

capture -> FFN matching -> filter -> every check (sizes, weights, calibration, module swaps)
-> calibration -> MoE blocks -> graph pass (graph mode) or swap into a copy of the model
(module mode). Nothing the user gave is changed unless ``inplace=True``; every error is raised
before any state changes.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from rewriter.passes.allocation import allocate_top_k, apply_top_k, dropped_loss_curve
from rewriter.passes.calibration import calibrate, stats_for
from rewriter.passes.ffn_to_moe import (
    FFNToMoE,
    MoEConfig,
    build_moe_block,
    check_finite,
    dense_weights,
    plan_experts,
    split_error,
)
from rewriter.passes.lower_fp8 import (
    FP8Config,
    apply_fp8,
    gptq_rounding,
    keep_sensitive,
    plan_fp8,
    uses_gptq,
)
from rewriter.passes.module_swap import ModuleSwap, apply_module_swaps, plan_module_swaps
from rewriter.passes.recovery import RecoveryConfig, recover

from .capture import (
    activation_quantization_bypassed,
    buffers_kept,
    capture,
    first_float_output,
    normalize_inputs,
    quantizes_activations,
    training_mode,
)
from .errors import InputError, NoFFNError
from .graph_ops import common_module, op_name, owning_module, param_name
from .inspection import CONVERSION_ATTR, _default_inputs
from .model_stats import model_stats
from .pass_manager import PassManager
from .patterns import FFNMatch, analyze_ffns
from .recipes import get_recipe

__all__ = ["convert", "conversion_info", "ConversionInfo", "CONVERSION_ATTR"]

MODES = ("module", "graph")


@dataclass(frozen=True)
class ConversionInfo:
    """What ``convert`` did: the config, the FFNs rewritten, per-block reports."""

    moe: Any
    mode: str
    modules: tuple[str, ...]
    blocks: tuple[dict[str, Any], ...] = field(repr=False)
    skipped: tuple[str, ...] = ()
    calibration_tokens: int = 0
    fp8: Any = None
    fp8_decisions: tuple[Any, ...] = field(default=(), repr=False)
    recipe: str | None = None
    source_stats: Any = None  # rewriter.model_stats.ModelStats of the model before conversion
    split_error: float | None = None  # max over blocks: all experts on vs dense, float64
    output_error: float | None = None  # converted vs source on the example inputs (relative)
    # W8A8 conversions are step functions of the input, so output_error is information about
    # quantization, not a check of the rewrite: the same comparison with activation
    # quantization bypassed (weights FP8, activations unquantized) is continuous and measures
    # what the rewrite and the weight format cost. None when nothing quantizes activations.
    output_error_bypassed: float | None = None
    # the recovery step's report (passes/recovery.RecoveryReport.to_dict()), or None
    recovery: dict[str, Any] | None = field(default=None, repr=False)


def _copy(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch.export leaves pytree specs whose copy warns
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(model)


def _select(model: nn.Module, matches: list[FFNMatch],
            filter_fn: Callable[[nn.Module, str], bool] | None) -> tuple[list, list]:
    if filter_fn is None:
        return matches, []
    keep, skipped = [], []
    for m in matches:
        try:
            module = model.get_submodule(m.module) if m.module else model
        except AttributeError:
            module = model
        (keep if filter_fn(module, m.module) else skipped).append(m)
    return keep, [m.module for m in skipped]


def _stacked_expert_weights(gm: GraphModule) -> list[str]:
    """3-D parameters that a matmul-like op reads (directly or through an index / transpose):
    experts already stacked (E, out, in), as in transformers' Mixtral / Qwen-MoE / DeepSeek."""
    found = []
    for node in gm.graph.nodes:
        name = param_name(gm, node)
        if name is None or gm.get_parameter(name).dim() != 3:
            continue
        readers = [*node.users, *(u2 for u in node.users for u2 in u.users)]
        if any(any(k in (op_name(u) or "") for k in ("mm", "matmul", "einsum", "linear"))
               for u in readers):
            found.append(name)
    return found


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _check_materialized(model: nn.Module) -> None:
    """InputError when a parameter or buffer holds no data (the meta device)."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_meta:
            raise InputError(
                f"{type(model).__name__}.{name} is on the meta device (no data: a model built "
                "under torch.device('meta') or init_empty_weights); load its weights first")


def _check_hooks(model: nn.Module, fqns: Iterable[str], what: str) -> None:
    """InputError naming the first module at or under ``fqns`` that holds a forward or
    backward hook: ``what`` replaces those modules, and the hook would be dropped silently."""
    for fqn in sorted(set(fqns)):
        try:
            top = model.get_submodule(fqn) if fqn else model
        except AttributeError:
            continue
        for name, module in top.named_modules(prefix=fqn):
            kinds = [k.strip("_").replace("_", " ") for k in _HOOKS if getattr(module, k, None)]
            if kinds:
                raise InputError(
                    f"module {name or '<root>'} ({type(module).__name__}) has {' and '.join(kinds)}"
                    f"; {what} replaces it or its forward, which would drop them silently. Remove "
                    "them before converting and register them on the converted model's modules")


def _ran_by(match: FFNMatch) -> set[str]:
    """The modules that ran the FFN's ops."""
    return {owning_module(n) for n in match.nodes if n.op == "call_function"}


def _below(fqns: Iterable[str], owner: str) -> list[str]:
    return [o for o in fqns if o != owner and (not owner or o.startswith(owner + "."))]


def _inside_ffns(matches: list[FFNMatch]) -> list[str]:
    """Modules that run an FFN's ops below the module owning the whole FFN (its linears and
    activation modules): every MoE rewrite replaces them."""
    return [o for m in matches for o in _below(_ran_by(m), common_module(sorted(_ran_by(m))))]


def _plan_swaps(model: nn.Module, gm: GraphModule, matches: list[FFNMatch],
                inputs: Any) -> list:
    """plan_module_swaps, after refusing hooks on what any rewrite replaces; a plan that fails
    on an FFN whose owner holds hooks (they ran in the recorded call) says so."""
    _check_hooks(model, _inside_ffns(matches), "the MoE rewrite")
    try:
        swaps = plan_module_swaps(model, gm, matches, inputs)
    except InputError as exc:
        owners = [common_module(sorted(_ran_by(m))) for m in matches]
        try:
            _check_hooks(model, [o for o in owners if o], "the MoE rewrite")
        except InputError as hooked:
            raise hooked from exc
        raise
    _check_hooks(model, _replaced_by_swaps(matches, swaps), "the MoE rewrite")
    return swaps


def _replaced_by_swaps(matches: list[FFNMatch], swaps: list) -> list[str]:
    """Module FQNs a module-mode MoE rewrite replaces: the swapped modules whole; for an inline
    rewrite, the modules that run the FFN's ops below the owner whose forward is rewritten."""
    out = []
    for m, swap in zip(matches, swaps):
        if isinstance(swap, ModuleSwap):
            out += [swap.block] + ([swap.identity] if swap.identity is not None else [])
            continue
        out += _below(_ran_by(m), swap.owner)
    return out


def _inherit_state(block: nn.Module, match: FFNMatch, training: bool) -> None:
    """A new MoE block takes the train/eval mode of the module it replaces, and is frozen when
    every weight of the dense FFN it is cut from is (``requires_grad=False``)."""
    block.train(training)
    if not any(ref.param.requires_grad for ref in match.weights.values()):
        block.requires_grad_(False)


def _distinct(matches: list[FFNMatch]) -> tuple[list[FFNMatch], list[FFNMatch], list[int]]:
    """(every match, the first match of each FFN, per match the index of its FFN's first): a
    module called several times in the forward (a recurrent or looped block) is one FFN, one
    set of weights and so one MoE block, found once per call in the graph."""
    first: dict[str, int] = {}
    distinct: list[FFNMatch] = []
    block_of = []
    for m in matches:
        key = m.projections["down"].weight.fqn
        if key not in first:
            first[key] = len(distinct)
            distinct.append(m)
        block_of.append(first[key])
    return matches, distinct, block_of


def convert(
    model: nn.Module,
    *,
    recipe: Any = None,
    moe: Any = None,
    fp8: Any = None,
    example_inputs: Any = None,
    calibration: Iterable[Any] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    mode: str = "module",
    inplace: bool = False,
    progress: bool | None = None,
    active: float | None = None,
    recovery: RecoveryConfig | bool | None = None,
) -> nn.Module:
    """Convert ``model``: feed-forward blocks to DeepSeekMoE blocks and/or matmuls to FP8.

    ``recipe``: a named recipe (``"deepseek-v3"``, ``"moe-only"``, ``"fp8-only"``: see
    :mod:`rewriter.recipes`) whose expert counts are fitted to the model's FFN widths; an
    explicit ``moe``/``fp8`` overrides its part. ``moe``: a :class:`MoEConfig`. ``fp8``: an
    :class:`FP8Config` (alone or with ``moe``; the lowering runs after the MoE rewrite, so
    experts are lowered too). ``example_inputs``: inputs
    to capture with (token ids are made up for language models when omitted).
    ``calibration``: an iterable of input batches for the calibrated strategies (grouping by
    co-activation, shared neurons by activation, fitted router) and for FP8's GPTQ weight
    rounding (``FP8Config.weight_rounding``, "auto": on when calibration is given and the FP8
    mode is inference). ``filter_fn(module, fqn)``:
    rewrite only the FFN blocks and linears it accepts. ``mode``: "module" returns a copy of
    the model with the new blocks swapped in (HF APIs keep working); "graph" returns the
    rewritten GraphModule. ``inplace``: modify ``model`` itself (module mode). ``active``:
    with a recipe, the fraction of each FFN's neurons active per token (the recipe picks the
    layout: :meth:`rewriter.recipes.Recipe.with_active`). ``recovery``: after the MoE rewrite
    (before FP8 lowering), train every MoE block to reproduce the dense FFN it was cut from
    on the ``calibration`` batches, then, with ``RecoveryConfig.logit_steps``, the model's
    logits those of ``model`` (:func:`rewriter.passes.recovery.recover`; ``True`` takes
    :class:`RecoveryConfig`'s defaults); its before/after errors are in
    ``conversion_info(result).recovery``.
    """

    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")

    if active is not None and recipe is None:
        raise InputError("active= picks a recipe's MoE layout: give recipe=... too (with "
                         "moe=MoEConfig(...), set top_k and shared_width yourself)")
    if recipe is not None:
        recipe = get_recipe(recipe)
        if active is not None:
            recipe = recipe.with_active(active)
    if moe is None and fp8 is None and recipe is None:
        raise InputError("nothing to do: give recipe=..., moe=MoEConfig(...) and/or "
                         "fp8=FP8Config(...)")
    if moe is not None and not isinstance(moe, MoEConfig):
        raise InputError(f"moe must be a MoEConfig, got {type(moe).__name__}")
    if fp8 is not None and not isinstance(fp8, FP8Config):
        raise InputError(f"fp8 must be an FP8Config, got {type(fp8).__name__}")
    if inplace and mode != "module":
        raise InputError("inplace=True only applies to mode='module'")
    if calibration is not None and not isinstance(calibration, (list, tuple)):
        calibration = list(calibration)  # iterate it more than once; fail early if broken
    if calibration is not None and len(calibration) == 0:
        raise InputError("calibration is empty: give at least one batch, or calibration=None")
    if recovery is True:
        recovery = RecoveryConfig()
    elif recovery is False:
        recovery = None
    if recovery is not None and not isinstance(recovery, RecoveryConfig):
        raise InputError(f"recovery must be a RecoveryConfig or a bool, got "
                         f"{type(recovery).__name__}")
    if recovery is not None and not calibration:
        raise InputError("recovery trains the MoE blocks on calibration text: give "
                         "calibration=batches")

    _check_materialized(model)
    inputs = example_inputs if example_inputs is not None else _default_inputs(model)
    gm = capture(model, inputs)
    source_stats = model_stats(model)
    analysis = analyze_ffns(gm) if moe is not None or recipe is not None else None
    if recipe is not None:
        recipe_moe, recipe_fp8 = recipe.configs([m.d_ff for m in analysis.matches])
        moe = moe if moe is not None else recipe_moe
        fp8 = fp8 if fp8 is not None else recipe_fp8
    base = ConversionInfo(moe=None, mode=mode, modules=(), blocks=(),
                          recipe=recipe.name if recipe is not None else None,
                          source_stats=source_stats)
    prior = conversion_info(model)
    if prior is not None and moe is None:  # FP8 on top of an earlier MoE conversion
        base = replace(prior, mode=mode, recipe=base.recipe or prior.recipe,
                       output_error=None, output_error_bypassed=None)
    if fp8 is not None and uses_gptq(fp8, bool(calibration)) and not calibration:
        raise InputError("FP8Config(weight_rounding='gptq') rounds the weights on calibration "
                         "inputs: give calibration=batches, or weight_rounding='nearest'")
    if moe is None and recovery is not None:
        raise InputError("recovery= trains MoE blocks: give moe=MoEConfig(...) or a recipe "
                         "that converts FFNs to MoE")
    if moe is None:
        return _lower_only(model, gm, inputs, fp8, filter_fn, mode, inplace, base,
                           calibration=calibration, progress=progress)
    config = moe.resolved(calibrated=bool(calibration))
    if not analysis.matches:
        experts = _stacked_expert_weights(gm)
        if experts:
            more = ", ..." if len(experts) > 2 else ""
            raise NoFFNError(
                f"{type(model).__name__} is already a mixture of experts: its experts are "
                f"stacked 3-D weights ({', '.join(experts[:2])}{more}) read by batched "
                "matmuls, not dense FFNs to split; convert it with fp8= only "
                "(its dense linears are lowered, the experts keep their dtype)")
        near = [r for r in analysis.rejections if r.near_miss] or list(analysis.rejections)
        detail = "; ".join(r.describe() for r in near[:4])
        train = any(m.training and isinstance(m, nn.Dropout) and m.p > 0
                    for m in model.modules())
        raise NoFFNError(
            f"{type(model).__name__} has no feed-forward block to convert"
            + (f" (rejected: {detail})" if detail else "")
            + ("; the model is in training mode and has active dropout, which the captured "
               "graph samples (not one function of the hidden units): call model.eval() "
               "before converting" if train else "")
        )
    matches, skipped = _select(model, list(analysis.matches), filter_fn)
    if not matches:
        raise NoFFNError(f"filter_fn rejected all {len(analysis.matches)} FFN blocks")
    every_match, matches, block_of = _distinct(matches)

    # every check, before anything changes
    plans = [plan_experts(config, m.d_ff, m.module) for m in matches]
    for m in matches:
        check_finite(dense_weights(m), m.module)
    needs_stats = (config.grouping == "coactivation" or config.router_init == "calibrated"
                   or config.allocation == "calibrated"
                   or (config.shared_selection == "activation"
                       and any(p.shared_dim for p in plans)))
    if needs_stats and not calibration:
        raise InputError(
            "MoEConfig asks for calibrated strategies (grouping="
            f"{config.grouping!r}, shared_selection={config.shared_selection!r}, router_init="
            f"{config.router_init!r}, allocation={config.allocation!r}) but calibration is "
            "empty: give calibration=batches"
        )
    graph_pass = mode == "graph" and fp8 is None
    swaps = [] if graph_pass else _plan_swaps(model, gm, matches, inputs)
    if fp8 is not None:  # lowered after the rewrite: its linears outside the FFNs are known now
        _check_hooks(model, [d.fqn for d in plan_fp8(model, gm, fp8, filter_fn) if d.lowered],
                     "FP8 lowering")

    sensitivity = config.allocation == "calibrated" and config.top_k < config.num_experts
    stats = (calibrate(gm, calibration, ffns=matches, sensitivity=sensitivity,
                       max_tokens=config.calibration_samples, progress=progress)
             if calibration else None)
    if stats is not None and config.router_init == "calibrated" and stats.tokens < 2:
        raise InputError(
            f"calibration holds {stats.tokens} real token(s) (positions the attention_mask "
            "marks as padding excluded); MoEConfig(router_init='calibrated') fits each router "
            "on at least 2: give more calibration text")
    built = [build_moe_block(m, config, p, stats_for(stats, m)) for m, p in zip(matches, plans)]
    blocks = [b for b, _ in built]
    for i, (block, m) in enumerate(zip(blocks, matches)):
        where = model if graph_pass else _replaced_module(model, swaps[i])
        _inherit_state(block, m, where.training)
    reports = tuple(r for _, r in built)
    if sensitivity:
        _allocate(blocks, [stats_for(stats, m) for m in matches], reports, config.top_k)
    split = max(split_error(b, dense_weights(m)) for b, m in zip(blocks, matches))
    info = replace(
        base, moe=config, modules=tuple(m.module for m in matches), blocks=reports,
        skipped=tuple(skipped), calibration_tokens=stats.tokens if stats else 0,
        split_error=split,
    )
    reference = _outputs(model, inputs)  # before any swap: inplace=True changes ``model``
    if graph_pass:
        result = PassManager([FFNToMoE(every_match, [blocks[i] for i in block_of],
                                       [reports[i] for i in block_of])]).run(gm)
        out = result.graph_module
        if recovery is not None:
            info = replace(info, recovery=recover(out, calibration, recovery, teacher=model,
                                                  progress=progress).to_dict())
        out.meta[CONVERSION_ATTR] = replace(info, **_errors(reference, out, inputs))
        return out
    # the logit phase of recovery distils from the model as given: keep it when inplace
    teacher = _copy(model) if inplace and recovery is not None and recovery.logit_steps \
        else model
    target = model if inplace else _copy(model)
    apply_module_swaps(target, swaps, blocks, reports)
    if recovery is not None:
        info = replace(info, recovery=recover(target, calibration, recovery, teacher=teacher,
                                              progress=progress).to_dict())
    if fp8 is not None:
        return _lower_only(target, capture(target, inputs), inputs, fp8, filter_fn, mode,
                           True, info, reference, calibration=calibration, progress=progress)
    setattr(target, CONVERSION_ATTR, replace(info, **_errors(reference, target, inputs)))
    return target


def _replaced_module(model: nn.Module, swap: Any) -> nn.Module:
    """The module a swap replaces (a whole swap) or rewrites (an inline rewrite's owner)."""
    fqn = swap.block if isinstance(swap, ModuleSwap) else swap.owner
    return model.get_submodule(fqn) if fqn else model


def _allocate(blocks: list, stats: list, reports: tuple[dict, ...], top_k: int) -> None:
    """MoEConfig.allocation="calibrated": give each block its own top_k (passes/allocation)."""

    curves = [dropped_loss_curve(b, s.sample_x, s.sample_g) for b, s in zip(blocks, stats)]
    ks = allocate_top_k(curves, [b.expert_dim for b in blocks], top_k)
    for block, report, k in zip(blocks, reports, ks):
        apply_top_k(block, k, top_k)
        report["top_k"] = k


def _call(model: nn.Module, inputs: Any) -> Any:
    args, kwargs = normalize_inputs(inputs)  # any Mapping (a tokenizer's BatchEncoding too)
    return model(*args, **kwargs)


@torch.no_grad()
def _outputs(model: nn.Module, inputs: Any) -> torch.Tensor | None:
    """The first floating tensor output (logits) of ``model`` on ``inputs``, or None."""
    # an exported graph has no train/eval switch
    modes = contextlib.nullcontext() if isinstance(model, GraphModule) else training_mode(
        model, False)
    with buffers_kept(model), modes:
        out = _call(model, inputs)
    leaf = first_float_output(out)
    return None if leaf is None else leaf.detach().clone()


def _rel_error(reference: torch.Tensor | None, model: nn.Module, inputs: Any) -> float | None:
    """max |converted - source| / max |source| on the example inputs."""
    got = _outputs(model, inputs)
    if reference is None or got is None or got.shape != reference.shape:
        return None
    diff = (got.double() - reference.double()).abs().max()
    return float(diff / reference.double().abs().max().clamp_min(1e-300))


def _errors(reference: torch.Tensor | None, model: nn.Module,
            inputs: Any) -> dict[str, float | None]:
    """output_error, and for a model that quantizes activations (W8A8: a step function of its
    input) output_error_bypassed, the same comparison with activation quantization
    bypassed (the source model has none, so only the converted side changes)."""
    out = {"output_error": _rel_error(reference, model, inputs), "output_error_bypassed": None}
    if quantizes_activations(model):
        with activation_quantization_bypassed():
            out["output_error_bypassed"] = _rel_error(reference, model, inputs)
    return out


def _lower_only(model: nn.Module, gm: GraphModule, inputs: Any, fp8: Any,
                filter_fn: Callable[[nn.Module, str], bool] | None, mode: str, inplace: bool,
                info: ConversionInfo, reference: torch.Tensor | None = None,
                calibration: list | tuple | None = None,
                progress: bool | None = None) -> nn.Module:
    """FP8 lowering of ``model`` (captured as ``gm``); graph mode re-captures the result.
    ``reference``: the source model's outputs on ``inputs`` (default: ``model``'s).
    ``calibration``: batches for GPTQ rounding (``FP8Config.weight_rounding``)."""

    decisions = plan_fp8(model, gm, fp8, filter_fn)
    if not any(d.lowered for d in decisions):
        raise InputError("FP8 lowering found nothing to lower (no projection passed the "
                         "filters): " + "; ".join(f"{d.fqn}: {d.reason}" for d in decisions[:4]))
    _check_hooks(model, [d.fqn for d in decisions if d.lowered], "FP8 lowering")
    modes = {d.fqn: model.get_submodule(d.fqn).training for d in decisions if d.lowered}
    if reference is None:
        reference = _outputs(model, inputs)
    quantized = None
    if uses_gptq(fp8, bool(calibration)):
        quantized, decisions = gptq_rounding(model, decisions, fp8, calibration,
                                             progress=progress)
        quantized, decisions = keep_sensitive(model, decisions, fp8, quantized, calibration,
                                              progress=progress)
    target = model if inplace else _copy(model)
    apply_fp8(target, decisions, fp8, quantized)
    for fqn, training in modes.items():  # a lowered module keeps the mode of the one it replaces
        target.get_submodule(fqn).train(training)
    info = replace(info, fp8=fp8, fp8_decisions=tuple(decisions),
                   **_errors(reference, target, inputs))
    if mode == "graph":
        out = capture(target, inputs)
        out.meta[CONVERSION_ATTR] = info
        return out
    setattr(target, CONVERSION_ATTR, info)
    return target


def conversion_info(obj: nn.Module) -> ConversionInfo | None:
    if isinstance(obj, GraphModule) and CONVERSION_ATTR in obj.meta:
        return obj.meta[CONVERSION_ATTR]
    return getattr(obj, CONVERSION_ATTR, None)

