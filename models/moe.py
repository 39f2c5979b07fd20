"""The DeepSeekMoE-style block a graph pass emits in place of a dense FFN.

    moe = MoEFFN(d_model=576, expert_dim=96, num_experts=14, top_k=3, shared_dim=192)
    y = moe(x)                       # x (..., d) -> y (..., d), same dtype as x

Layout (a pass fills these by name; E experts, F = expert_dim, d = d_model)::

    router       nn.Linear(d, E)        always float32 (routing stays high precision)
    expert_bias  buffer (E,) float32    aux-loss-free balancing bias, selection only
    w_gate       (E, F, d) or None      GLU gate rows of each routed expert
    w_up         (E, F, d)              up rows
    w_down       (E, d, F)              down columns
    b_gate/b_up  (E, F) or None         biases of the dense FFN's first linear(s)
    shared       SharedExpert or None   the always-on shared experts as one MLP of width S
    b_out        (d,) or None           the dense FFN's output bias, added once

Routing (router logits in fp32, or fp64 when x is fp64)::

    hard     select top-k of softmax(logits) + expert_bias; weight exactly 1.0 forward,
             straight-through 1 + (p - p.detach()) backward (top_k = E == the dense FFN);
             renormalize and route_scale do not apply
    softmax  p = softmax(logits); select top-k of p + expert_bias; weight p (renormalised
             over the selected when ``renormalize``) * route_scale
    sigmoid  s = sigmoid(logits); select top-k of s + expert_bias; weight s / sum(selected s)
             (when ``renormalize``) * route_scale                             (DeepSeek-V3)

Top-k ties: the lowest expert index wins (ONNX TopK's rule), in eager, exported and ONNX graphs
and in ``selection_order`` (:func:`select_topk`; ``torch.topk`` leaves ties unspecified). Every
renormalisation of selected scores divides by ``sum + RENORM_EPS`` (1e-20, as Hugging Face's
DeepSeek-V3 router): a token whose selected sigmoid scores all underflow to 0 gets routed
weights 0 (the shared experts still apply), never 0/0 = NaN, in the output or the gradients.

Pinned precision: ``router``, ``expert_bias`` and ``last_load`` (token counts: bf16 holds
integers exactly only up to 256) keep float32 under ``.to(dtype)``, ``.half()``,
``.bfloat16()``, ``.double()`` of the block or of a model holding it (they still move between
devices; see :func:`apply_pinned`): a bf16 bias cannot take 1e-3 balancing steps at O(1).

Dispatch is dropless. Eager: token slots are sorted by expert once (contiguous per expert, the
layout a grouped GEMM wants), one matmul chain per non-empty expert, ``index_add_`` back; a
no-grad CPU call runs consecutive experts with few slots as one ``torch._grouped_mm`` per
projection (``grouped_run_slots``; the same function, the GEMM kernel's rounding). Under
``torch.export`` (strict or not) and ``torch.compile`` (``torch.compiler.is_compiling()``) the
per-expert counts are data dependent, so each expert instead finds its tokens with
``torch.where(topk_idx == e)`` (ONNX: TopK, Equal, NonZero, GatherND, ScatterND); both paths give
the same result. ``last_load`` and ``aux_loss`` are not recorded inside an exported program
(``torch.compiler.is_exporting()``), so its graph mutates no buffer. ``torch.fx.symbolic_trace``
cannot trace the routing: treat MoEFFN as a leaf module there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from rewriter.patterns import ACTIVATIONS, CAPTURED_ACTIVATION

__all__ = [
    "GATE_MODES",
    "GROUPED_RUN_SLOTS",
    "MOE_ACTIVATIONS",
    "RENORM_EPS",
    "MoEFFN",
    "MoEFFNConfig",
    "SharedExpert",
    "apply_pinned",
    "keep_dtype",
    "select_topk",
    "selection_order",
]

# one table of FFN nonlinearities: the one the pattern matcher recognises (rewriter.patterns)
MOE_ACTIVATIONS: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = MappingProxyType(
    {a.name: a.fn for a in ACTIVATIONS}
)

RENORM_EPS = 1e-20  # added to every sum that renormalises selected scores (HF DeepSeek-V3)


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(..., E) -> (..., k) int64 indices of the k largest scores, in increasing index order;
    among equal scores the lowest index wins (ONNX TopK's rule; ``torch.topk`` leaves the
    order of ties unspecified, vllm-project/vllm#54403). The k-th largest value does not depend
    on how ties are ordered; every score above it is taken, then the lowest-index scores equal
    to it fill the rest; a last ``topk`` over distinct keys returns the indices. Traces to
    TopK, Greater, Equal, CumSum, Where (ONNX) with no data-dependent shape."""
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (..., 1)
    above = scores > kth  # (..., E)
    tied = scores == kth  # (..., E)
    room = k - above.sum(dim=-1, keepdim=True)  # (..., 1) ties to take
    take = tied & (torch.cumsum(tied.to(torch.int64), dim=-1) <= room)  # lowest indices
    e = scores.shape[-1]
    key = torch.arange(e, 0, -1, device=scores.device).to(scores.dtype)  # (E,) E..1, distinct
    return torch.topk(torch.where(above | take, key, 0.0), k, dim=-1).indices  # (..., k)


def selection_order(scores: torch.Tensor) -> torch.Tensor:
    """(..., E) -> (..., E) every index, largest score first, ties lowest index first (a
    stable descending sort): its first k are :func:`select_topk`'s k, for any k."""
    return torch.argsort(scores, dim=-1, descending=True, stable=True)


def keep_dtype(fn: Callable[[torch.Tensor], torch.Tensor]
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (what ``nn.Module._apply`` maps over tensors: ``.to``, ``.half``, ``.cuda``,
    ``share_memory``...) without its dtype change: a probe tells what fn does to an empty
    tensor of t's dtype and device; fn runs as is when it keeps the dtype, otherwise t only
    moves to fn's device (never through a narrower dtype and back: no bits lost)."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        if not isinstance(probe, torch.Tensor) or probe.dtype == t.dtype:
            return fn(t)
        return t.to(device=probe.device)

    return apply


def apply_pinned(module: nn.Module, fn, recurse: bool, apply_rest: Callable,
                 buffers: Iterable[str] = (), children: Iterable[str] = ()) -> nn.Module:
    """``module._apply(fn)`` with its buffers ``buffers`` and its child modules ``children``
    pinned to their dtype (:func:`keep_dtype`); everything else gets ``fn`` through
    ``apply_rest(fn, recurse)`` (the base class's ``_apply``). Keys keep their order."""
    held_b = {n: module._buffers[n] for n in buffers if module._buffers.get(n) is not None}
    held_m = {n: module._modules[n] for n in children
              if recurse and module._modules.get(n) is not None}
    for n in held_b:
        module._buffers[n] = None
    for n in held_m:
        module._modules[n] = None
    try:
        apply_rest(fn, recurse)
    finally:
        keep = keep_dtype(fn)
        for n, b in held_b.items():
            module._buffers[n] = keep(b)
        for n, m in held_m.items():
            module._modules[n] = m._apply(keep, recurse)
    return module

GATE_MODES: tuple[str, ...] = ("hard", "softmax", "sigmoid")


@dataclass(frozen=True)
class MoEFFNConfig:
    """Validated shape and routing of one MoEFFN (``MoEFFN.config``)."""

    d_model: int
    expert_dim: int
    num_experts: int
    top_k: int
    shared_dim: int = 0
    activation: str = "silu"
    glu: bool = True
    bias: bool = False
    gate: str = "hard"
    renormalize: bool = True
    route_scale: float = 1.0
    router_bias: bool = False
    aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("d_model", "expert_dim", "num_experts", "top_k", "shared_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"MoEFFN.{name} must be an int, got {value!r}")
        for name in ("d_model", "expert_dim", "num_experts"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEFFN.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoEFFN.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k!r}"
            )
        if self.shared_dim < 0:
            raise ValueError(f"MoEFFN.shared_dim must be >= 0, got {self.shared_dim!r}")
        if self.activation not in (*MOE_ACTIVATIONS, CAPTURED_ACTIVATION):
            raise ValueError(
                f"MoEFFN.activation must be one of {', '.join(MOE_ACTIVATIONS)} or "
                f"{CAPTURED_ACTIVATION!r} (with activation_fn), got {self.activation!r}"
            )
        if self.gate not in GATE_MODES:
            raise ValueError(
                f"MoEFFN.gate must be one of {', '.join(GATE_MODES)}, got {self.gate!r}"
            )
        if not (isinstance(self.route_scale, (int, float)) and math.isfinite(self.route_scale)
                and self.route_scale > 0):
            raise ValueError(
                f"MoEFFN.route_scale must be a finite number > 0, got {self.route_scale!r}"
            )
        if not (isinstance(self.aux_loss_coef, (int, float))
                and math.isfinite(self.aux_loss_coef) and self.aux_loss_coef >= 0):
            raise ValueError(
                f"MoEFFN.aux_loss_coef must be a finite number >= 0, got {self.aux_loss_coef!r}"
            )
        for name in ("glu", "bias", "renormalize", "router_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEFFN.{name} must be a bool, got {getattr(self, name)!r}")


def _uniform_(t: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init
    nn.init.uniform_(t, -bound, bound)


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in dtype, without a no-op cast node in traced graphs."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _activation_fn(owner: str, activation: str,
                   activation_fn: nn.Module | None) -> nn.Module | None:
    """The module a "captured" activation runs (checked); None for a named activation."""
    if activation == CAPTURED_ACTIVATION:
        if not isinstance(activation_fn, nn.Module):
            raise ValueError(f"{owner}: activation={CAPTURED_ACTIVATION!r} needs activation_fn, "
                             f"a module (..., F) -> (..., F), got {activation_fn!r}")
        return activation_fn
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"{owner}.activation must be one of {', '.join(MOE_ACTIVATIONS)} or "
                         f"{CAPTURED_ACTIVATION!r}, got {activation!r}")
    if activation_fn is not None:
        raise ValueError(f"{owner}: activation_fn is only for activation="
                         f"{CAPTURED_ACTIVATION!r}, got activation={activation!r}")
    return None


_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # its CPU kernel takes these
GROUPED_RUN_SLOTS = 256  # slots one grouped GEMM call gathers before the next run starts


def _runs(sizes: list[int], max_slots: int) -> list[tuple[int, int, int, int]]:
    """Consecutive runs of non-empty experts: (e0, e1, s0, s1) with experts e0..e1-1 holding
    sorted slots s0..s1-1, each run below ``max_slots`` slots unless it is one expert."""
    runs, e0, s0, n = [], 0, 0, 0
    for e, size in enumerate(sizes):
        if n and n + size > max_slots:
            runs.append((e0, e, s0, s0 + n))
            e0, s0, n = e, s0 + n, 0
        if n == 0 and size == 0:
            e0 = e + 1  # a run starts at its first non-empty expert
            continue
        n += size
    if n:
        runs.append((e0, len(sizes), s0, s0 + n))
    return runs


def _grouped_linear(
    x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, b: torch.Tensor | None,
    run: list[int], e0: int,
) -> torch.Tensor:
    """x (n, d) sorted by expert, w (G, F, d) the run's stacked rows, offs (G,) int32 ends,
    b (E, F) or None -> (n, F)."""
    y = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)  # (n, F)
    if b is not None:
        bias = b[e0:e0 + len(run)].repeat_interleave(
            torch.tensor(run, device=b.device), dim=0, output_size=x.shape[0])  # (n, F)
        y = y + bias
    return y


def _count(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, K) expert ids -> (E,) float32 slot counts, with a static output shape."""
    flat = topk_idx.reshape(-1)  # (T*K,)
    ones = torch.ones_like(flat, dtype=torch.float32)
    return torch.zeros(num_experts, dtype=torch.float32, device=flat.device).scatter_add_(
        0, flat, ones
    )


class SharedExpert(nn.Module):
    """The always-on shared experts fused into one dense MLP of width ``shared_dim``.

    ``activation``: a name of :data:`MOE_ACTIVATIONS`, or ``"captured"`` with
    ``activation_fn``, a per-neuron module (..., F) -> (..., F) (the dense FFN's own
    elementwise graph when no named activation matches it; shared with the routed experts)."""

    def __init__(
        self,
        d_model: int,
        shared_dim: int,
        *,
        activation: str = "silu",
        glu: bool = True,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        activation_fn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.activation_fn = _activation_fn("SharedExpert", activation, activation_fn)
        self.activation = activation
        self.up = nn.Linear(d_model, shared_dim, bias=bias, dtype=dtype)
        self.gate = nn.Linear(d_model, shared_dim, bias=bias, dtype=dtype) if glu else None
        self.down = nn.Linear(shared_dim, d_model, bias=False, dtype=dtype)

    @property
    def act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.activation_fn is not None:
            return self.activation_fn
        return MOE_ACTIVATIONS[self.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, d) -> (T, d)
        if self.gate is not None:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}, glu={self.gate is not None}"


class MoEFFN(nn.Module):
    """Fine-grained routed experts + optional shared experts + top-k router (see module doc)."""

    def __init__(
        self,
        d_model: int,
        expert_dim: int,
        num_experts: int,
        top_k: int,
        *,
        shared_dim: int = 0,
        activation: str = "silu",
        glu: bool = True,
        bias: bool = False,
        gate: str = "hard",
        renormalize: bool = True,
        route_scale: float = 1.0,
        router_bias: bool = False,
        aux_loss_coef: float = 0.0,
        dtype: torch.dtype = torch.float32,
        activation_fn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        cfg = MoEFFNConfig(
            d_model=d_model, expert_dim=expert_dim, num_experts=num_experts, top_k=top_k,
            shared_dim=shared_dim, activation=activation, glu=glu, bias=bias, gate=gate,
            renormalize=renormalize, route_scale=float(route_scale), router_bias=router_bias,
            aux_loss_coef=float(aux_loss_coef),
        )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"MoEFFN.dtype must be a floating torch.dtype, got {dtype!r}")
        self.config = cfg
        self.activation_fn = _activation_fn("MoEFFN", activation, activation_fn)
        E, Fd, d = num_experts, expert_dim, d_model

        self.router = nn.Linear(d, E, bias=router_bias, dtype=torch.float32)
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        self.w_up = nn.Parameter(torch.empty(E, Fd, d, dtype=dtype))
        self.w_gate = nn.Parameter(torch.empty(E, Fd, d, dtype=dtype)) if glu else None
        self.w_down = nn.Parameter(torch.empty(E, d, Fd, dtype=dtype))
        self.b_up = nn.Parameter(torch.empty(E, Fd, dtype=dtype)) if bias else None
        self.b_gate = nn.Parameter(torch.empty(E, Fd, dtype=dtype)) if bias and glu else None
        self.shared = (
            SharedExpert(d, shared_dim, activation=activation, glu=glu, bias=bias, dtype=dtype,
                         activation_fn=activation_fn)
            if shared_dim > 0 else None
        )
        self.b_out = nn.Parameter(torch.zeros(d, dtype=dtype)) if bias else None
        self.register_buffer("last_load", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self._has_load = False
        # no-grad eager CPU dispatch: experts with fewer sorted slots than this run together
        # as one grouped GEMM (``_dispatch_runs``); 0 runs one matmul chain per expert
        self.grouped_run_slots = GROUPED_RUN_SLOTS
        self.reset_parameters()

    # ------------------------------------------------------------------ properties

    d_model = property(lambda self: self.config.d_model)
    expert_dim = property(lambda self: self.config.expert_dim)
    num_experts = property(lambda self: self.config.num_experts)
    top_k = property(lambda self: self.config.top_k)
    shared_dim = property(lambda self: self.config.shared_dim)
    gate = property(lambda self: self.config.gate)
    glu = property(lambda self: self.config.glu)

    @property
    def act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The experts' nonlinearity: ``MOE_ACTIVATIONS[config.activation]``, or the
        ``activation_fn`` module of a "captured" activation."""
        if self.activation_fn is not None:
            return self.activation_fn
        return MOE_ACTIVATIONS[self.config.activation]

    def _apply(self, fn, recurse=True):
        """``.to()``/``.half()``/...: the router, ``expert_bias`` and ``last_load`` keep
        float32 (they still move between devices); the experts follow."""
        return apply_pinned(self, fn, recurse, super()._apply, buffers=("expert_bias", "last_load"),
                            children=("router",))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d, Fd = self.config.d_model, self.config.expert_dim
        for w, fan_in in ((self.w_up, d), (self.w_gate, d), (self.w_down, Fd),
                          (self.b_up, d), (self.b_gate, d)):
            if w is not None:
                _uniform_(w, fan_in)
        if self.b_out is not None:
            _uniform_(self.b_out, Fd * self.config.num_experts + self.config.shared_dim)

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype the experts compute in (their weights' dtype)."""
        return self.w_up.dtype

    # ------------------------------------------------------------------ routing

    def _scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, d) -> (gate scores (T, E), the biased scores selection ranks (T, E))."""
        rdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        w, b = _as(self.router.weight, rdtype), _as(self.router.bias, rdtype)
        logits = F.linear(_as(x, rdtype), w, b)  # (T, E)
        if self.config.gate == "sigmoid":
            scores = torch.sigmoid(logits)  # (T, E)
        else:
            scores = torch.softmax(logits, dim=-1)  # (T, E)
        return scores, scores + _as(self.expert_bias, rdtype)  # bias: selection only

    @torch.no_grad()
    def selection_order(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, d) -> (T, E) expert ids in the order routing prefers them: the first top_k
        are the selected experts, for any top_k (ties: lowest index first, as routing)."""
        return selection_order(self._scores(x.reshape(-1, self.config.d_model))[1])

    def expert_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Every routed expert's hidden activation for every token (dense, for analysis):
        x (T, d) -> (T, E, F). Expert e's output is ``h[:, e] @ w_down[e].T``."""
        x = _as(x, self.compute_dtype)
        up = torch.einsum("td,efd->tef", x, self.w_up)  # (T, E, F)
        if self.b_up is not None:
            up = up + self.b_up
        if self.w_gate is None:
            return self.act(up)
        gate = torch.einsum("td,efd->tef", x, self.w_gate)  # (T, E, F)
        if self.b_gate is not None:
            gate = gate + self.b_gate
        return self.act(gate) * up

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, d) -> topk_idx (T, K) int64, weights (T, K), scores (T, E) normalised.

        Routing runs in float32 (float64 when x is float64), whatever the experts' dtype."""
        cfg = self.config
        scores, biased = self._scores(x)  # (T, E), (T, E)
        topk_idx = select_topk(biased, cfg.top_k)  # (T, K), ties: lowest index
        picked = scores.gather(1, topk_idx)  # (T, K)
        if cfg.gate == "hard":
            weights = 1.0 + (picked - picked.detach())  # exactly 1.0 forward
        else:
            weights = picked
            if cfg.renormalize:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
            if cfg.route_scale != 1.0:
                weights = weights * cfg.route_scale
        if cfg.gate == "sigmoid":
            scores = scores / (scores.sum(dim=-1, keepdim=True) + RENORM_EPS)  # rows sum to 1
        return topk_idx, weights, scores

    # ------------------------------------------------------------------ experts

    def _experts(self) -> list[tuple[torch.Tensor | None, ...]]:
        """Per expert (w_gate, w_up, w_down, b_gate, b_up), split with one ``unbind`` per
        stacked tensor: backward then stacks the E gradients once, where ``w[e]`` would build
        and sum E zero-padded (E, ...) gradients."""
        E = self.config.num_experts
        stacked = (self.w_gate, self.w_up, self.w_down, self.b_gate, self.b_up)
        return list(zip(*(t.unbind(0) if t is not None else (None,) * E for t in stacked)))

    def _expert(
        self, params: tuple[torch.Tensor | None, ...], xe: torch.Tensor, we: torch.Tensor
    ) -> torch.Tensor:
        """One expert (``params`` from ``_experts()``) on its tokens xe (n, d) with routing
        weights we (n,) -> (n, d)."""
        w_gate, w_up, w_down, b_gate, b_up = params
        up = F.linear(xe, w_up, b_up)  # (n, F)
        if w_gate is not None:
            h = self.act(F.linear(xe, w_gate, b_gate)) * up  # (n, F)
        else:
            h = self.act(up)  # (n, F)
        # weighted after down_proj, as HF's DeepSeek-V3 / Glm4Moe / Qwen2-MoE experts do: the
        # same function, and the same rounding as the checkpoints we save for them (weighting
        # h first measured 1.8e-5 rel on SmolLM2's logits vs vanilla Glm4Moe)
        return F.linear(h, w_down) * we.unsqueeze(-1)  # (n, d)

    def _dispatch_sorted(
        self, x: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor,
        experts: list[tuple] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager path: sort slots by expert once; contiguous groups. -> out (T, d), load (E,).
        ``experts``: per-expert params for ``_expert`` (default ``_experts()``)."""
        K, E = self.config.top_k, self.config.num_experts
        flat = topk_idx.reshape(-1)  # (T*K,)
        order = torch.argsort(flat, stable=True)  # (T*K,) slots grouped by expert
        counts = torch.bincount(flat, minlength=E)  # (E,)
        token = torch.div(order, K, rounding_mode="floor")  # (T*K,) token of each sorted slot
        ws = weights.reshape(-1).index_select(0, order)  # (T*K,)
        sizes = counts.tolist()  # the one host sync of the eager path
        grad = torch.is_grad_enabled() and (x.requires_grad or ws.requires_grad)
        if experts is None and not grad and self._runs_grouped(x):
            return self._dispatch_runs(x, token, ws, sizes), counts
        tokens, ws = token.split(sizes), ws.split(sizes)  # per expert: (n,), (n,)
        if torch.is_grad_enabled() and x.requires_grad:
            # one gather, split views: backward is one cat + one index_add into (T, d)
            xs = x.index_select(0, token).split(sizes)  # per expert: (n, d)
        else:
            # gather per group: rows stay in cache and the buffers are small enough for the
            # allocator to reuse instead of page-faulting a fresh (T*K, d) block each call
            xs = None
        experts = self._experts() if experts is None else experts
        out = x.new_zeros(x.shape)  # (T, d)
        for e, n in enumerate(sizes):
            if n == 0:
                continue  # empty experts cost nothing
            xe = xs[e] if xs is not None else x.index_select(0, tokens[e])  # (n, d)
            out.index_add_(0, tokens[e], self._expert(experts[e], xe, ws[e]))
        return out, counts

    def _runs_grouped(self, x: torch.Tensor) -> bool:
        """Whether ``_dispatch_runs`` may serve this no-grad eager call: a CPU tensor of a
        dtype ``torch._grouped_mm`` takes there, this class's own expert function (the FP8
        blocks define theirs), contiguous weights, and 16-byte aligned rows and strides (the
        CPU kernel's rule: d and F times the element size multiples of 16)."""
        if type(self)._expert is not MoEFFN._expert or not self.grouped_run_slots:
            return False
        if not _HAS_GROUPED_MM or x.device.type != "cpu" or x.dtype not in _GROUPED_DTYPES:
            return False
        size = x.element_size()  # rows of d and of F elements must be 16-byte strides
        if (self.config.d_model * size) % 16 or (self.config.expert_dim * size) % 16:
            return False
        stacked = (self.w_gate, self.w_up, self.w_down, self.b_gate, self.b_up)
        return all(t is None or (t.dtype == x.dtype and t.is_contiguous()
                                 and t.data_ptr() % 16 == 0) for t in stacked)

    def _dispatch_runs(
        self, x: torch.Tensor, token: torch.Tensor, ws: torch.Tensor, sizes: list[int]
    ) -> torch.Tensor:
        """No-grad eager dispatch: consecutive experts with few tokens run as one grouped GEMM
        per projection (``torch._grouped_mm`` over their contiguous sorted slots); an expert
        with ``grouped_run_slots`` (default ``GROUPED_RUN_SLOTS``) or more slots runs alone.
        The same function as the per-expert chain and the same ``index_add_`` order into out;
        only the GEMM kernel differs (rounding, ~1 ulp).

        x (T, d); token, ws (T*K,) the sorted slots' token and routing weight; sizes (E,)
        slots per expert -> out (T, d). At 128 tokens (16 experts of SmolLM2's converted FFN)
        one block is ~1.4x faster than one chain per expert: the per-expert gather, scatter
        and elementwise ops dominate small experts; at ~256 slots per expert the two are level
        (``bench/e2e_cpu.py --dispatch``)."""
        out = x.new_zeros(x.shape)  # (T, d)
        w_gate, w_up, w_down = self.w_gate, self.w_up, self.w_down
        b_gate, b_up = self.b_gate, self.b_up
        for e0, e1, s0, s1 in _runs(sizes, self.grouped_run_slots):
            run = sizes[e0:e1]
            offs = torch.tensor(run, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # (e1-e0,)
            rows = token[s0:s1]  # (n,)
            xe = x.index_select(0, rows)  # (n, d)
            up = _grouped_linear(xe, w_up[e0:e1], offs, b_up, run, e0)  # (n, F)
            if w_gate is not None:
                h = self.act(_grouped_linear(xe, w_gate[e0:e1], offs, b_gate, run, e0)) * up
            else:
                h = self.act(up)  # (n, F)
            y = torch._grouped_mm(h, w_down[e0:e1].transpose(1, 2), offs=offs)  # (n, d)
            out.index_add_(0, rows, y * ws[s0:s1].unsqueeze(-1))
        return out

    def _dispatch_masked(
        self, x: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Export / compile path: no host sync, data-dependent sizes stay symbolic."""
        out = x.new_zeros(x.shape)  # (T, d)
        for e, params in enumerate(self._experts()):
            token, slot = torch.where(topk_idx == e)  # (n,), (n,)
            y = self._expert(params, x[token], weights[token, slot])  # (n, d)
            out = out.index_add(0, token, y)
        return out

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        cfg = self.config
        if x.shape[-1] != cfg.d_model:
            raise ValueError(
                f"MoEFFN expects inputs (..., d_model={cfg.d_model}), got {tuple(x.shape)}"
            )
        shape, in_dtype = x.shape, x.dtype
        xt = x.reshape(-1, cfg.d_model)  # (T, d)
        topk_idx, weights, scores = self._route(xt)  # (T, K), (T, K), (T, E)
        cdtype = self.compute_dtype
        xc = _as(xt, cdtype)  # (T, d) expert compute in the weights' dtype
        wc = _as(weights, cdtype)  # (T, K)

        exporting = torch.compiler.is_exporting()
        if exporting or torch.compiler.is_compiling():
            out = self._dispatch_masked(xc, topk_idx, wc)  # (T, d)
            counts = None if exporting else _count(topk_idx, cfg.num_experts)  # (E,)
        else:
            out, counts = self._dispatch_sorted(xc, topk_idx, wc)  # (T, d), (E,)
        if counts is not None:
            with torch.no_grad():
                self.last_load.copy_(counts)
            self._has_load = True

        if self.shared is not None:
            out = out + self.shared(xc)
        if self.b_out is not None:
            out = out + self.b_out
        if self.training and cfg.aux_loss_coef > 0 and not exporting:
            self.aux_loss = self._sequence_aux_loss(shape, topk_idx, scores)
        else:
            self.aux_loss = None
        return _as(out, in_dtype).reshape(shape)

    def _sequence_aux_loss(
        self, shape: torch.Size, topk_idx: torch.Tensor, scores: torch.Tensor
    ) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss (eq. 17-20). Leading dims but the last two
        of x are sequences; a (T, d) input is one sequence."""
        cfg = self.config
        E, K = cfg.num_experts, cfg.top_k
        T = shape[-2] if len(shape) >= 2 else 1
        if scores.shape[0] == 0:
            return scores.sum() * 0.0  # no tokens: zero, still attached to the router
        B = scores.shape[0] // T
        idx = topk_idx.reshape(B, T * K)  # (B, T*K)
        counts = torch.zeros(B, E, dtype=scores.dtype, device=scores.device)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=scores.dtype))  # (B, E)
        f = counts * (E / (K * T))  # (B, E)
        P = scores.reshape(B, T, E).mean(dim=1)  # (B, E)
        return cfg.aux_loss_coef * (f * P).sum(dim=-1).mean()

    # ------------------------------------------------------------------ balancing and stats

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Aux-loss-free balancing: expert_bias += rate * sign(mean_load - last_load)."""
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate >= 0):
            raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
        if not self._has_load:
            raise RuntimeError("MoEFFN.update_bias needs the load of a forward; none has run")
        load = self.last_load.float()
        self.expert_bias += rate * torch.sign(load.mean() - load).to(self.expert_bias.dtype)

    def load_stats(self) -> dict:
        """{"load": (E,) tokens per expert in the last forward, "max_over_mean": float}."""
        if not self._has_load:
            raise RuntimeError("MoEFFN.load_stats needs a forward; none has run")
        load = self.last_load.detach().float().clone()
        mean = load.mean().item()
        return {"load": load, "max_over_mean": load.max().item() / mean if mean > 0 else 0.0}

    def _expert_params(self) -> int:
        c = self.config
        n = 2 * c.expert_dim * c.d_model  # up + down
        if c.glu:
            n += c.expert_dim * c.d_model
        if c.bias:
            n += c.expert_dim * (2 if c.glu else 1)
        return n

    def _always_params(self) -> int:
        n = sum(p.numel() for p in self.router.parameters())
        if self.shared is not None:
            n += sum(p.numel() for p in self.shared.parameters())
        if self.b_out is not None:
            n += self.b_out.numel()
        return n

    def active_params_per_token(self) -> int:
        """Router + shared + b_out + top_k routed experts."""
        return self._always_params() + self.config.top_k * self._expert_params()

    def total_params(self) -> int:
        """Router + shared + b_out + every routed expert."""
        return self._always_params() + self.config.num_experts * self._expert_params()

    def extra_repr(self) -> str:
        c = self.config
        s = (f"d_model={c.d_model}, expert_dim={c.expert_dim}, num_experts={c.num_experts}, "
             f"top_k={c.top_k}, shared_dim={c.shared_dim}, activation={c.activation}, "
             f"glu={c.glu}, bias={c.bias}, gate={c.gate}")
        if c.gate != "hard":
            s += f", renormalize={c.renormalize}, route_scale={c.route_scale}"
        if c.aux_loss_coef > 0:
            s += f", aux_loss_coef={c.aux_loss_coef}"
        return s + f", dtype={self.compute_dtype}"
