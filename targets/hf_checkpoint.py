"""Standard Hugging Face checkpoints of converted models (loadable by vanilla transformers).

    write_hf_checkpoint(model, "out/hf")            # config.json + safetensors shards
    # elsewhere, no code of ours: AutoModelForCausalLM.from_pretrained("out/hf")

Which architecture (every mapping below was read off transformers' modeling code):

==================  =========================================================================
Glm4MoeForCausalLM  LLaMA / Mistral / Qwen2 attention (q/k/v bias as Qwen2: attention_bias),
                    full rotary (partial_rotary_factor 1.0); MoE blocks with ``gate="sigmoid"``:
                    fp32 sigmoid router, ``expert_bias`` -> ``e_score_correction_bias``
                    (selection only), ``renormalize`` -> ``norm_topk_prob``, ``route_scale`` ->
                    ``routed_scaling_factor``, the shared experts -> ``shared_experts`` of
                    ``n_shared_experts x moe_intermediate_size`` (zero neurons pad the shared
                    width to a multiple of the expert width: exact, they add nothing); dense
                    layers first (``first_k_dense_replace``)
Qwen2MoeForCausalLM MoE blocks with ``gate="softmax"``, no selection bias, ``route_scale`` 1:
                    softmax router, ``norm_topk_prob``; the shared MLP -> ``shared_expert``
                    with a zero ``shared_expert_gate`` (sigmoid(0) = 1/2) and its down
                    projection doubled (exact in binary floating point); any dense layers
                    (``mlp_only_layers``)
the source class    no MoE block (FP8 lowering only)
==================  =========================================================================

Experts are written per expert (``mlp.experts.{e}.gate_proj.weight``, the layout of the
published GLM-4.5 / Qwen1.5-MoE checkpoints, which transformers fuses on load and vLLM /
SGLang read). FP8 projections (FP8Linear, FP8MoEFFN, either mode: training mode writes the
blockwise quantization its forward uses) are written as ``weight`` float8_e4m3fn plus
``weight_scale_inv`` (N/128, K/128) fp32, our scales bit for bit, with
``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128], "modules_to_not_convert": [...]}``. ``pad_to`` pads expert
widths (routed and shared) with zero neurons to a multiple (128 for vLLM's block-FP8 MoE);
without it they are padded to a multiple of ``KERNEL_ALIGN`` (8): transformers' default CPU
experts kernel (``grouped_mm``) refuses rows that are not 16-byte aligned ("strides should be
multiple of 16 bytes" for an expert of width 43). Zero neurons are exact: act(0) * 0 = 0 and
their down-projection columns are 0.

Anything that cannot be represented exactly raises :class:`CheckpointError` with the reason
and the config change that makes it representable; nothing approximate is ever written.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from rewriter.models.moe import MoEFFN
from safetensors.torch import save_file
from torch import Tensor, nn

from rewriter.capture import quantizes_activations
from rewriter.errors import CheckpointError

from .checkpoint import check_writable, dtype_name, transformers_module
from .fp8 import BLOCK, FP8_DTYPE, quantize_blockwise
from .fp8_embedding import FP8Embedding, FP8TiedHead
from .fp8_linear import FP8Linear, FP8MoEFFN

__all__ = ["write_hf_checkpoint", "hf_plan", "SOURCES", "ACT_NAMES", "KERNEL_ALIGN"]

SOURCES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# expert widths are padded to a multiple of this (8 x fp32/bf16 = 32/16 bytes): the row
# alignment transformers' grouped_mm experts kernel needs on the CPU
KERNEL_ALIGN = 8
# MoEFFN activation -> transformers ACT2FN name
ACT_NAMES = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
             "quick_gelu": "quick_gelu"}

_W = tuple  # (tensor, scale or None): a weight, FP8 with its 128x128 scales when scale is set


# ----------------------------------------------------------------------------- weights


def _linear_weight(module: nn.Module, fqn: str) -> tuple[_W, Tensor | None]:
    """((weight, scale | None), bias) of a projection module."""
    if isinstance(module, FP8Linear):
        if module.mode == "inference":
            w = (module.weight_q, module.weight_scale)
        else:
            w = quantize_blockwise(module.weight.detach(), pow2=module.pow2)
        return w, module.bias
    if type(module) is nn.Linear:
        return (module.weight.detach(), None), module.bias
    raise CheckpointError(f"{fqn} is a {type(module).__name__}: only nn.Linear and FP8Linear "
                          "projections map to a Hugging Face checkpoint")


def _expert_weights(block: MoEFFN, name: str) -> list[_W]:
    """Per routed expert (weight, scale | None) of projection ``name`` (w_gate/w_up/w_down)."""
    if isinstance(block, FP8MoEFFN):
        if block.mode == "inference":
            q, s = getattr(block, f"{name}_q"), getattr(block, f"{name}_scale")
            return list(zip(q.unbind(0), s.unbind(0)))
        return [quantize_blockwise(w.detach(), pow2=block.pow2)
                for w in getattr(block, name).unbind(0)]
    return [(w.detach(), None) for w in getattr(block, name).unbind(0)]


def _pad(w: _W, dim: int, size: int) -> _W:
    """Zero-pad weight ``w`` along ``dim`` (0: output rows, 1: input columns) to ``size``:
    padded neurons are exact (zero rows/columns). FP8 scales gain blocks of scale 1."""
    t, s = w
    extra = size - t.shape[dim]
    if extra <= 0:
        return w
    shape = list(t.shape)
    shape[dim] = extra
    t = torch.cat([t, torch.zeros(shape, dtype=t.dtype, device=t.device)], dim)
    if s is not None:
        blocks = math.ceil(size / BLOCK) - s.shape[dim]
        if blocks > 0:
            sshape = list(s.shape)
            sshape[dim] = blocks
            s = torch.cat([s, torch.ones(sshape, dtype=s.dtype, device=s.device)], dim)
    return t, s


def _scaled(w: _W, factor: float) -> _W:
    """``factor`` (a power of two) times the weight: exact (for FP8, on the scales)."""
    t, s = w
    return (t, s * factor) if s is not None else (t * factor, s)


# ----------------------------------------------------------------------------- plan


def _blocks(model: nn.Module) -> list[nn.Module]:
    try:
        layers = model.model.layers
    except AttributeError as exc:
        raise CheckpointError(f"{type(model).__name__} has no model.layers") from exc
    return [layer.mlp for layer in layers]


def _refuse(reason: str, fix: str) -> CheckpointError:
    return CheckpointError(f"not representable as a Hugging Face checkpoint: {reason}; {fix}")


def hf_plan(model: nn.Module) -> dict[str, Any]:
    """What ``write_hf_checkpoint`` would write: {"architecture", "moe_layers", "block"} or a
    CheckpointError with the reason and the fix. Checks only; writes nothing."""
    name = type(model).__name__
    if not type(model).__module__.startswith("transformers.") or name not in SOURCES:
        raise _refuse(f"the source model is a {name}", "format='hf' supports "
                      f"{', '.join(SOURCES)} sources; use the own format (format='rewriter')")
    cfg = model.config
    if any(isinstance(m, (FP8Embedding, FP8TiedHead)) for m in model.modules()):
        raise _refuse("FP8 embedding tables have no Hugging Face format",
                      "convert with FP8Config(embeddings='keep')")
    if getattr(cfg, "attention_bias", False):
        raise _refuse(f"{name} has an o_proj bias (attention_bias=True), which Glm4Moe and "
                      "Qwen2-MoE attention lack", "use the own format")
    if getattr(cfg, "mlp_bias", False):
        raise _refuse("the FFNs have biases (mlp_bias=True)", "use the own format")
    if getattr(cfg, "sliding_window", None) and (name == "MistralForCausalLM" or getattr(
            cfg, "use_sliding_window", False)):
        raise _refuse("sliding-window attention", "use the own format")
    blocks = _blocks(model)
    moe = [i for i, b in enumerate(blocks) if isinstance(b, MoEFFN)]
    plan: dict[str, Any] = {"moe_layers": moe, "source": name}
    if not moe:
        plan.update(architecture=name, block=None)
        return plan
    first = blocks[moe[0]].config
    for i in moe:
        c = blocks[i].config
        if c.top_k != first.top_k:
            raise _refuse(f"per-block top_k (layer {moe[0]}: {first.top_k}, layer {i}: "
                          f"{c.top_k}) from MoEConfig(allocation='calibrated')",
                          "convert with MoEConfig(allocation='uniform') (recipe "
                          "'deepseek-v3-hf')")
        for field in ("num_experts", "expert_dim", "shared_dim", "gate", "renormalize",
                      "route_scale", "activation", "glu", "bias", "router_bias"):
            if getattr(c, field) != getattr(first, field):
                raise _refuse(f"MoE blocks differ in {field} (layer {moe[0]}: "
                              f"{getattr(first, field)!r}, layer {i}: {getattr(c, field)!r})",
                              "convert every FFN with one MoEConfig")
    if first.gate == "hard":
        raise _refuse("hard gates (every selected expert weighs exactly 1.0) exist in no "
                      "published MoE architecture", "convert with gate='sigmoid' (recipe "
                      "'deepseek-v3-hf': Glm4Moe) or gate='softmax' (Qwen2-MoE)")
    if first.router_bias:
        raise _refuse("the routers have a bias (a calibrated router fits one by default); "
                      "Hugging Face's MoE routers have none",
                      "convert with MoEConfig(router_bias=False) (recipe 'deepseek-v3-hf' "
                      "does), or use the own format")
    if not first.glu or first.bias:
        raise _refuse("experts without GLU, or with biases", "use the own format")
    if ACT_NAMES.get(first.activation) != cfg.hidden_act:
        raise _refuse(f"expert activation {first.activation!r} differs from the dense "
                      f"layers' {cfg.hidden_act!r}", "use the own format")
    if first.gate == "sigmoid":
        if moe != list(range(moe[0], len(blocks))):
            raise _refuse(f"Glm4Moe puts dense layers first and MoE layers after; the MoE "
                          f"layers are {moe}", "convert a suffix of the layers (filter_fn)")
        plan.update(architecture="Glm4MoeForCausalLM", block=first)
        return plan
    # softmax -> Qwen2-MoE
    if first.route_scale != 1.0:
        raise _refuse(f"route_scale={first.route_scale} (Qwen2-MoE has no routed scaling)",
                      "convert with route_scale=1.0, or gate='sigmoid' for Glm4Moe")
    for i in moe:
        if torch.count_nonzero(blocks[i].expert_bias).item():
            raise _refuse(f"layer {i} has a non-zero expert_bias (bias balancing), which "
                          "Qwen2-MoE's softmax router has no place for",
                          "train without bias balancing (balance_rate=0), or use "
                          "gate='sigmoid' (Glm4Moe has e_score_correction_bias)")
    plan.update(architecture="Qwen2MoeForCausalLM", block=first)
    return plan


# ----------------------------------------------------------------------------- config


def _common_config(cfg) -> dict[str, Any]:
    out = {k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
        "rms_norm_eps", "tie_word_embeddings", "attention_dropout", "bos_token_id",
        "eos_token_id", "pad_token_id", "initializer_range")}
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim and head_dim != cfg.hidden_size // cfg.num_attention_heads:
        out["head_dim"] = head_dim
    rope = getattr(cfg, "rope_parameters", None)
    out["rope_parameters"] = dict(rope) if rope else None
    return out


def _target_config(model: nn.Module, plan: dict[str, Any], expert_dim: int, shared: int,
                   dtype: torch.dtype):
    transformers = transformers_module("format='hf'")
    src, block, arch = model.config, plan["block"], plan["architecture"]
    kwargs = _common_config(src)
    qkv_bias = model.config.model_type == "qwen2"
    if arch == "Glm4MoeForCausalLM":
        rope = dict(kwargs.pop("rope_parameters") or {"rope_type": "default"})
        rope["partial_rotary_factor"] = 1.0
        kwargs.update(
            rope_parameters=rope, attention_bias=qkv_bias, use_qk_norm=False,
            moe_intermediate_size=expert_dim, n_routed_experts=block.num_experts,
            num_experts_per_tok=block.top_k, n_shared_experts=shared // expert_dim,
            routed_scaling_factor=float(block.route_scale), n_group=1, topk_group=1,
            first_k_dense_replace=plan["moe_layers"][0], norm_topk_prob=block.renormalize,
            num_nextn_predict_layers=0)
        config = transformers.Glm4MoeConfig(**kwargs)
    else:
        moe = set(plan["moe_layers"])
        kwargs.update(
            qkv_bias=qkv_bias, use_sliding_window=False, decoder_sparse_step=1,
            moe_intermediate_size=expert_dim, shared_expert_intermediate_size=shared,
            num_experts=block.num_experts, num_experts_per_tok=block.top_k,
            norm_topk_prob=block.renormalize,
            mlp_only_layers=[i for i in range(src.num_hidden_layers) if i not in moe])
        config = transformers.Qwen2MoeConfig(**kwargs)
    config.architectures = [arch]
    config.dtype = dtype
    config.use_cache = True
    return config


# ----------------------------------------------------------------------------- tensors


def _moe_tensors(block: MoEFFN, prefix: str, arch: str, expert_dim: int, shared: int,
                 fqn: str) -> dict[str, _W]:
    out: dict[str, _W] = {}
    out[f"{prefix}.gate.weight"] = (block.router.weight.detach().float(), None)
    if arch == "Glm4MoeForCausalLM":
        out[f"{prefix}.gate.e_score_correction_bias"] = (block.expert_bias.detach().float(),
                                                        None)
    gates, ups, downs = (_expert_weights(block, n) for n in ("w_gate", "w_up", "w_down"))
    for e, (g, u, d) in enumerate(zip(gates, ups, downs)):
        out[f"{prefix}.experts.{e}.gate_proj.weight"] = _pad(g, 0, expert_dim)
        out[f"{prefix}.experts.{e}.up_proj.weight"] = _pad(u, 0, expert_dim)
        out[f"{prefix}.experts.{e}.down_proj.weight"] = _pad(d, 1, expert_dim)
    sname = "shared_experts" if arch == "Glm4MoeForCausalLM" else "shared_expert"
    if block.shared is not None:
        for proj, dim in (("gate", 0), ("up", 0), ("down", 1)):
            w, _ = _linear_weight(getattr(block.shared, proj), f"{fqn}.shared.{proj}")
            w = _pad(w, dim, shared)
            if proj == "down" and arch == "Qwen2MoeForCausalLM":
                w = _scaled(w, 2.0)  # undoes sigmoid(0) = 1/2 of the zero shared_expert_gate
            out[f"{prefix}.{sname}.{proj}_proj.weight"] = w
    elif shared:
        raise AssertionError("shared width without a shared expert")
    if arch == "Qwen2MoeForCausalLM":
        out[f"{prefix}.shared_expert_gate.weight"] = (
            torch.zeros(1, block.d_model, dtype=block.router.weight.dtype), None)
    return out


def _collect(model: nn.Module, plan: dict[str, Any], expert_dim: int, shared: int
             ) -> dict[str, _W]:
    """Target name -> weight of every tensor the checkpoint holds."""
    arch = plan["architecture"]
    moe_layers = set(plan["moe_layers"])
    out: dict[str, _W] = {}
    modules = dict(model.named_modules())
    skip = tuple(f"model.layers.{i}.mlp." for i in moe_layers)
    for fqn, module in modules.items():
        if fqn.startswith(skip) or any(fqn == s[:-1] for s in skip):
            continue
        if isinstance(module, FP8Linear):
            w, b = _linear_weight(module, fqn)
            out[f"{fqn}.weight"] = w
            if b is not None:
                out[f"{fqn}.bias"] = (b.detach(), None)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, p in model.state_dict(keep_vars=True).items():
        owner = name.rpartition(".")[0]
        if name.startswith(skip) or isinstance(modules.get(owner), FP8Linear):
            continue
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("inv_freq"):
            continue
        out[name] = (p.detach(), None)
    for i in sorted(moe_layers):
        fqn = f"model.layers.{i}.mlp"
        out.update(_moe_tensors(modules[fqn], fqn, arch, expert_dim, shared, fqn))
    return out


def _dense_names(tensors: dict[str, _W]) -> list[str]:
    """Modules written in high precision whose weight an FP8 loader would otherwise convert."""
    names = set()
    for name, (t, s) in tensors.items():
        if s is None and name.endswith(".weight") and t.dim() == 2 and "embed" not in name \
                and ".gate.weight" not in name and "norm" not in name:
            owner = name[: -len(".weight")]
            if ".experts." in owner:
                owner = owner.rsplit(".experts.", 1)[0] + ".experts"
            names.add(owner)
    return sorted(names)


def _shards(tensors: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(size).strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * units[unit])
    return int(s)


def write_hf_checkpoint(model: nn.Module, directory: str | Path, *, pad_to: int | None = None,
                        max_shard_size: str | int = "5GB") -> Path:
    """Write ``model`` as a standard Hugging Face checkpoint (see the module docstring)."""
    if pad_to is not None and (not isinstance(pad_to, int) or isinstance(pad_to, bool)
                               or pad_to < 1):
        raise CheckpointError(f"pad_to must be a positive int or None, got {pad_to!r}")
    directory = check_writable(directory, "directory")  # before any work, nothing written
    plan = hf_plan(model)
    block = plan["block"]
    expert_dim = shared = 0
    align = pad_to or KERNEL_ALIGN
    if block is not None:
        expert_dim = math.ceil(block.expert_dim / align) * align
        shared = math.ceil(block.shared_dim / expert_dim) * expert_dim \
            if plan["architecture"] == "Glm4MoeForCausalLM" else block.shared_dim
        if shared:
            shared = math.ceil(shared / align) * align
    dtype = model.get_input_embeddings().weight.dtype
    weights = _collect(model, plan, expert_dim, shared)
    tensors: dict[str, Tensor] = {}
    fp8 = False
    for name, (t, s) in weights.items():
        tensors[name] = t.detach().to("cpu").contiguous().clone()
        if s is not None:
            if t.dtype != FP8_DTYPE:
                raise AssertionError(name)
            fp8 = True
            tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = \
                s.detach().to("cpu", torch.float32).contiguous().clone()

    if plan["architecture"] in SOURCES:
        transformers = transformers_module("format='hf'")
        config = type(model.config).from_dict(model.config.to_dict())
        config.architectures = [plan["architecture"]]
        config.use_cache = True
        del transformers
    else:
        config = _target_config(model, plan, expert_dim, shared, dtype)
    if fp8 and not quantizes_activations(model):
        warnings.warn(
            "this model is W8A16 (FP8Config(activations='none')); the block-FP8 checkpoint format "
            "has no weight-only scheme (activation_scheme 'dynamic' or 'static'), so runtimes "
            "that quantize activations (vLLM, SGLang on FP8 GPUs) will run it as W8A8 with 1x128 "
            "dynamic activation scales, FP8Config()'s numerics; transformers on a CPU "
            "dequantizes the weights and runs it as W8A16", stacklevel=3)
    if fp8:
        config.quantization_config = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK],
            "modules_to_not_convert": sorted(set(_dense_names(weights)) | {"lm_head"})}
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("model*.safetensors*"):
        old.unlink()
    config.save_pretrained(str(directory))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(directory))
    shards = _shards(tensors, _parse_size(max_shard_size))
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in tensors.values())},
                 "weight_map": {}}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname), metadata={"format": "pt"})
            index["weight_map"].update({k: fname for k in shard})
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "rewriter_export.json").write_text(json.dumps({
        "architecture": plan["architecture"], "source": plan["source"],
        "moe_layers": plan["moe_layers"], "expert_dim": expert_dim, "shared_width": shared,
        "padded_from": None if block is None else [block.expert_dim, block.shared_dim],
        "fp8": fp8, "dtype": dtype_name(dtype)}, indent=1))
    return directory
