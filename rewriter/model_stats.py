"""Size and cost of a model: parameters (total / active per token), weight bytes, matmul FLOPs.

    stats = model_stats(model)    # ModelStats(params=..., active_params=..., ...)
    stats = model_stats(gm)       # the same figures for its captured / converted graph

Parameters include FP8-stored weights (a quantized weight is still a weight); tied tensors count
once. "Active per token" leaves out the routed experts a token does not use (``num_experts -
top_k`` per MoE block). Matmul FLOPs per token are ``2 x`` the weights a token multiplies with:
every linear (Linear, Conv1D, FP8Linear, the FP8 tied head, the MoE router, shared and top-k
experts) including the output head; embedding lookups cost none; attention scores are left out
(they depend on the sequence length).

An eager model is counted from its modules. A ``GraphModule`` (``rewriter.capture``, graph-mode
``rewriter.convert``) is counted from what its graph computes: each matmul-like call
(``linear``, ``mm``, ``addmm``, ``matmul``, ``bmm``, the FP8 ops) whose weight operand reads a
stored tensor, each ``call_module`` by its module; a weight sliced out of a stacked ``(E, ...)``
expert tensor inside a block that routes with ``topk(k)`` counts ``k / E`` of the time. The two
ways agree on the same model (tests hold them equal).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from rewriter.models.moe import MoEFFN
from rewriter.targets.fp8_embedding import FP8TiedHead
from rewriter.targets.fp8_linear import FP8Linear

from .graph_ops import op_name, owning_module, weight_bytes

__all__ = ["ModelStats", "model_stats"]


@dataclass(frozen=True)
class ModelStats:
    params: int  # every weight, once
    active_params: int  # per token
    weight_bytes: int  # parameters + persistent buffers, as a checkpoint stores them
    matmul_flops_per_token: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def model_stats(model: nn.Module) -> ModelStats:
    """Parameters, active parameters per token, weight bytes and matmul FLOPs per token of
    ``model`` (an ``nn.Module`` or a ``GraphModule``; see the module docstring)."""
    seen, params = set(), 0
    named = [("", p) for p in model.parameters()] + list(model.named_buffers())
    for name, t in named:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if _is_weight(name, t):
            params += t.numel()
    costs = _graph_costs(model) if isinstance(model, GraphModule) else _module_costs(model)
    flops, inactive = costs
    return ModelStats(params=params, active_params=params - inactive,
                      weight_bytes=weight_bytes(model), matmul_flops_per_token=flops)


def _is_weight(name: str, t: torch.Tensor) -> bool:
    """A tensor counted as a parameter: floating and a Parameter, FP8-stored (1 byte), or an
    inference FP8Linear's bias buffer; not scales, balancing biases or statistics."""
    return t.is_floating_point() and (isinstance(t, nn.Parameter) or t.dtype.itemsize == 1
                                      or name.endswith(".bias"))


# ----------------------------------------------------------------------------- modules


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, FP8Linear, FP8TiedHead)):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # GPT-2 / HF


def _linear_weights(module: nn.Module) -> int:
    if hasattr(module, "weight_q"):
        return module.weight_q.numel()
    return module.weight.numel()


def _module_costs(model: nn.Module) -> tuple[int, int]:
    """(matmul FLOPs per token, inactive params per token) from the modules of ``model``."""
    inactive, flops, inside_moe = 0, 0, set()
    for module in model.modules():
        if isinstance(module, MoEFFN):
            c = module.config
            inactive += (c.num_experts - c.top_k) * module._expert_params()
            mats = 3 if c.glu else 2  # weight matrices per expert / shared expert
            per_token = (c.d_model * c.num_experts  # router
                         + mats * c.d_model * (c.shared_dim + c.top_k * c.expert_dim))
            flops += 2 * per_token
            inside_moe.update(id(m) for m in module.modules())
        elif _is_linear(module) and id(module) not in inside_moe:
            flops += 2 * _linear_weights(module)
    return flops, inactive


# ----------------------------------------------------------------------------- graphs

# canonical op name -> position of its weight operand (the other operand is the activation)
_WEIGHT_ARG = {
    "linear": 1, "mm": 1, "matmul": 1, "bmm": 1, "addmm": 2,
    "fp8_linear": 1, "fp8_weight_only_linear": 1, "fp8_linear_hp": 1,
    "fp8_embedding_linear": 1, "fp8_grouped_linear": 1,
}
# canonical op name -> position of its bias operand (a routed expert's bias is inactive too)
_BIAS_ARG = {"linear": 2, "addmm": 0, "fp8_linear": 3, "fp8_weight_only_linear": 3,
             "fp8_linear_hp": 2}
# ops between a stored weight and its matmul that keep every element
_SAME_ELEMENTS = frozenset({"t", "transpose", "permute", "view", "reshape", "_unsafe_view",
                            "to", "_to_copy", "detach", "contiguous", "clone", "alias", "float",
                            "half", "bfloat16", "type_as", "expand"})
# ops that take one expert's slice out of a stacked (E, ...) tensor
_EXPERT_SLICES = frozenset({"unbind", "select"})


def _stored(gm: GraphModule, target: str) -> torch.Tensor | None:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def _weight_source(gm: GraphModule, arg: object) -> tuple[str, torch.Tensor, bool] | None:
    """(name, stored tensor, sliced) behind a matmul operand: ``sliced`` when the operand is one
    expert's slice of a stacked tensor (``unbind``/``select``/``w[e]``); None for activations."""
    sliced = False
    while isinstance(arg, Node):
        if arg.op == "get_attr":
            t = _stored(gm, str(arg.target))
            return None if t is None else (str(arg.target), t, sliced)
        if arg.op != "call_function" or not arg.args:
            return None
        name = op_name(arg)
        if name in _EXPERT_SLICES:
            sliced = True
        elif name == "getitem":
            src = arg.args[0]
            if isinstance(src, Node) and op_name(src) != "unbind":
                if not isinstance(arg.args[1], int):
                    return None  # a gather of rows, not one expert
                sliced = True  # w[e] of symbolic_trace
        elif name not in _SAME_ELEMENTS:
            return None  # computed from activations
        arg = arg.args[0]
    return None


def _topk_per_module(gm: GraphModule) -> dict[str, int]:
    """FQN of each module that routes -> the k of its ``topk``."""
    out = {}
    for node in gm.graph.nodes:
        if op_name(node) == "topk" and len(node.args) > 1 and isinstance(node.args[1], int):
            out[owning_module(node)] = node.args[1]
    return out


def _routed_k(fqn: str, topk: dict[str, int]) -> int | None:
    """The k of the innermost routing module at or above ``fqn``."""
    parts = fqn.split(".") if fqn else []
    for i in range(len(parts), -1, -1):
        k = topk.get(".".join(parts[:i]))
        if k is not None:
            return k
    return None


def _graph_costs(gm: GraphModule) -> tuple[int, int]:
    """(matmul FLOPs per token, inactive params per token) from what ``gm``'s graph computes."""
    topk = _topk_per_module(gm)
    flops, inactive = 0.0, 0.0
    seen_modules, routed = set(), {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            f, i = _module_costs(module)
            flops += f
            if id(module) not in seen_modules:
                seen_modules.add(id(module))
                inactive += i
            continue
        pos = _WEIGHT_ARG.get(op_name(node)) if node.op == "call_function" else None
        if pos is None or len(node.args) <= pos:
            continue
        source = _weight_source(gm, node.args[pos])
        if source is None and op_name(node) in ("mm", "matmul"):
            source = _weight_source(gm, node.args[0])  # weight @ x
        if source is None:
            continue
        name, t, sliced = source
        experts = t.shape[0] if sliced else 1
        k = _routed_k(owning_module(node), topk) if sliced else None
        share = min(k, experts) / experts if k is not None else 1.0  # tokens that use it
        flops += 2 * t.numel() / experts * share
        if k is not None:
            routed[id(t)] = (name, t, share)
            bias_pos = _BIAS_ARG.get(op_name(node))
            bias = (_weight_source(gm, node.args[bias_pos])
                    if bias_pos is not None and len(node.args) > bias_pos else None)
            if bias is not None and bias[2]:
                routed[id(bias[1])] = (bias[0], bias[1], share)
    for name, t, share in routed.values():  # every routed weight of every expert, once
        if _is_weight(name, t):
            inactive += t.numel() * (1 - share)
    return round(flops), round(inactive)
