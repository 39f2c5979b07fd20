"""Modules that run their matmuls in FP8: a drop-in ``nn.Linear`` and an FP8 MoE block.

``mode="training"``: the master weight stays a Parameter in its dtype (fp32/bf16) and every
forward/backward quantizes on the fly (all three GEMMs in FP8, ``rewriter::fp8_linear_hp``).
``mode="inference"``: the weight is quantized once and stored as FP8 + 128x128 scales (half the
bytes of bf16); activations are quantized per 1x128 (``activations="fp8"``, W8A8) or kept in
their precision (``"none"``, W8A16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.moe import MoEFFN

from . import fp8_ops  # noqa: F401  (registers torch.ops.rewriter.*)
from .fp8 import quantize_blockwise

__all__ = ["FP8Linear", "FP8MoEFFN", "MODES", "ACTIVATION_MODES"]

MODES = ("training", "inference")
ACTIVATION_MODES = ("fp8", "none")
_ops = torch.ops.rewriter


def _check_modes(mode: str, activations: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
    if mode == "training" and activations != "fp8":
        raise ValueError("training runs all three GEMMs in FP8: activations must be 'fp8'")


class FP8Linear(nn.Module):
    """``y = x @ W^T + b`` with FP8 GEMMs (DeepSeek-V3 1x128 / 128x128 scaling)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, mode: str = "training",
                 activations: str = "fp8", pow2: bool = False):
        super().__init__()
        _check_modes(mode, activations)
        self.out_features, self.in_features = weight.shape
        self.mode, self.activations, self.pow2 = mode, activations, pow2
        self.compute_dtype = weight.dtype
        if mode == "training":
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        else:
            q, s = quantize_blockwise(weight.detach(), pow2=pow2)
            self.register_buffer("weight_q", q)  # (N, K) float8_e4m3fn
            self.register_buffer("weight_scale", s)  # (N/128, K/128) fp32
        if bias is None:
            self.bias = None
        elif mode == "training":
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        else:
            self.register_buffer("bias", bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Module, *, transposed: bool = False, **kwargs) -> FP8Linear:
        """From an ``nn.Linear`` (or GPT-2's Conv1D with ``transposed=True``: W is (in, out)).
        Training mode shares the module's Parameters; inference mode copies them quantized."""
        weight = linear.weight
        if transposed:
            weight = nn.Parameter(weight.detach().t().contiguous())
        return cls(weight, linear.bias, **kwargs)

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N)
        if self.mode == "training":
            return _ops.fp8_linear_hp(x, self.weight, self.bias, self.pow2)
        if self.activations == "fp8":
            return _ops.fp8_linear(x, self.weight_q, self.weight_scale, self.bias, self.pow2)
        return _ops.fp8_weight_only_linear(x, self.weight_q, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}, activations="
                f"{self.activations}, pow2={self.pow2}")


class FP8MoEFFN(MoEFFN):
    """An :class:`MoEFFN` whose routed experts run FP8 GEMMs; router stays fp32.

    Training: per-expert ``fp8_linear_hp`` on the stacked master weights. Inference: the stacked
    expert weights are stored FP8 (E, N, K) with (E, N/128, K/128) scales, and the eager path
    runs each projection of all experts as one grouped GEMM over tokens sorted by expert
    (DeepGEMM's contiguous layout): three launches per block, whatever E.
    """

    def __init__(self, block: MoEFFN, *, mode: str = "training", activations: str = "fp8",
                 pow2: bool = False):
        nn.Module.__init__(self)
        _check_modes(mode, activations)
        self.__dict__.update({k: v for k, v in block.__dict__.items()
                              if k not in ("_parameters", "_buffers", "_modules")})
        self._parameters = dict(block._parameters)
        self._buffers = dict(block._buffers)
        self._modules = dict(block._modules)
        self.mode, self.activations, self.pow2 = mode, activations, pow2
        self._compute_dtype = block.w_up.dtype
        if mode == "inference":
            for name in ("w_up", "w_gate", "w_down"):
                w = self._parameters.pop(name, None)
                if w is None:
                    self.register_buffer(f"{name}_q", None)
                    self.register_buffer(f"{name}_scale", None)
                    object.__setattr__(self, name, None)
                    continue
                qs = [quantize_blockwise(we.detach(), pow2=pow2) for we in w.unbind(0)]
                self.register_buffer(f"{name}_q", torch.stack([q for q, _ in qs]))
                self.register_buffer(f"{name}_scale", torch.stack([s for _, s in qs]))
                self._buffers.pop(name, None)
                object.__setattr__(self, name, None)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    # per-expert params: (gate, up, down, b_gate, b_up) as the base class expects
    def _experts(self):
        if self.mode == "training":
            return super()._experts()
        E = self.config.num_experts

        def split(name):
            q = getattr(self, f"{name}_q")
            s = getattr(self, f"{name}_scale")
            return [None] * E if q is None else list(zip(q.unbind(0), s.unbind(0)))

        b_gate = self.b_gate.unbind(0) if self.b_gate is not None else [None] * E
        b_up = self.b_up.unbind(0) if self.b_up is not None else [None] * E
        return list(zip(split("w_gate"), split("w_up"), split("w_down"), b_gate, b_up))

    def _linear(self, x: Tensor, w, b: Tensor | None) -> Tensor:
        if self.mode == "training":
            return _ops.fp8_linear_hp(x, w, b, self.pow2)
        q, s = w
        if self.activations == "fp8":
            return _ops.fp8_linear(x, q, s, b, self.pow2)
        return _ops.fp8_weight_only_linear(x, q, s, b)

    def _expert(self, params, xe: Tensor, we: Tensor) -> Tensor:
        w_gate, w_up, w_down, b_gate, b_up = params
        up = self._linear(xe, w_up, b_up)  # (n, F)
        h = self.act(self._linear(xe, w_gate, b_gate)) * up if w_gate is not None else \
            self.act(up)
        return self._linear(h * we.unsqueeze(-1), w_down, None)  # (n, d)

    def _dispatch_sorted(self, x: Tensor, topk_idx: Tensor, weights: Tensor):
        if self.mode == "training" or self.activations != "fp8":
            return super()._dispatch_sorted(x, topk_idx, weights)
        K, E = self.config.top_k, self.config.num_experts
        flat = topk_idx.reshape(-1)  # (T*K,)
        order = torch.argsort(flat, stable=True)  # slots grouped by expert
        counts = torch.bincount(flat, minlength=E)  # (E,)
        offsets = F.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)  # (E+1,)
        token = torch.div(order, K, rounding_mode="floor")  # (T*K,)
        ws = weights.reshape(-1).index_select(0, order)  # (T*K,)
        expert_of_row = flat.index_select(0, order)  # (T*K,)
        xs = x.index_select(0, token)  # (T*K, d) contiguous per expert
        up = _ops.fp8_grouped_linear(xs, self.w_up_q, self.w_up_scale, offsets, self.pow2)
        if self.b_up is not None:
            up = up + self.b_up.index_select(0, expert_of_row)
        if self.w_gate_q is not None:
            gate = _ops.fp8_grouped_linear(xs, self.w_gate_q, self.w_gate_scale, offsets,
                                           self.pow2)
            if self.b_gate is not None:
                gate = gate + self.b_gate.index_select(0, expert_of_row)
            h = self.act(gate) * up  # (T*K, F)
        else:
            h = self.act(up)
        h = h * ws.unsqueeze(-1).to(h.dtype)
        y = _ops.fp8_grouped_linear(h, self.w_down_q, self.w_down_scale, offsets, self.pow2)
        out = x.new_zeros(x.shape).index_add_(0, token, y.to(x.dtype))  # (T, d)
        return out, counts
