"""Size and cost of a model: parameters (total / active per token), weight bytes, matmul FLOPs.

    stats = model_stats(model)    # ModelStats(params=..., active_params=..., ...)

Counted from the modules, not the graph, so a dense model and its converted copy are measured
the same way. Parameters include FP8-stored weights (a quantized weight is still a weight);
tied tensors count once. "Active per token" leaves out the routed experts a token does not use
(``num_experts - top_k`` per MoE block). Matmul FLOPs per token are ``2 x`` the weights a token
multiplies with: every linear (Linear, Conv1D, FP8Linear, the MoE router, shared and top-k
experts) including the output head; embedding lookups cost none; attention scores are left out
(they depend on the sequence length).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from rewriter.models.moe import MoEFFN
from rewriter.passes.lower_fp8 import weight_bytes
from rewriter.targets.fp8_linear import FP8Linear

__all__ = ["ModelStats", "model_stats"]


@dataclass(frozen=True)
class ModelStats:
    params: int  # every weight, once
    active_params: int  # per token
    weight_bytes: int  # parameters + persistent buffers, as a checkpoint stores them
    matmul_flops_per_token: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _is_linear(module: nn.Module) -> bool:

    if isinstance(module, (nn.Linear, FP8Linear)):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # GPT-2 / HF


def _linear_weights(module: nn.Module) -> int:
    if hasattr(module, "weight_q"):
        return module.weight_q.numel()
    return module.weight.numel()


def model_stats(model: nn.Module) -> ModelStats:

    seen, params = set(), 0
    named = [("", p) for p in model.parameters()] + list(model.named_buffers())
    for name, t in named:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        weight = (isinstance(t, nn.Parameter) or t.dtype.itemsize == 1  # FP8-stored weight
                  or name.endswith(".bias"))  # an inference FP8Linear's bias buffer
        if t.is_floating_point() and weight:
            params += t.numel()  # not scales, balancing biases or statistics
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
    return ModelStats(params=params, active_params=params - inactive,
                      weight_bytes=weight_bytes(model), matmul_flops_per_token=flops)
