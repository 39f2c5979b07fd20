"""Error-compensating FP8 weight rounding (GPTQ) for the linears the FP8 lowering swaps.

Rounding each weight to its nearest E4M3 value (3 mantissa bits) leaves an error that is
independent per weight; GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, Algorithm 1) rounds the columns of W (N, K)
one at a time and moves each column's rounding error onto the columns not yet rounded,
weighted by the inverse of the layer's input Hessian ``H = X^T X / T`` (X: (T, K) calibration
inputs), so that ``X W^T`` rather than W itself stays close. The result keeps DeepSeek-V3's
format exactly: E4M3 codes (N, K) and one fp32 scale per 128 x 128 block, the scales those of
nearest rounding (``max |W| / 448`` per block); only which code each weight takes changes.

Two choices of ours, measured on SmolLM2-135M (calibrated on Python's documentation, perplexity
on licence texts and release notes, bench/quality_domains.py; BENCHMARKS.md):

* ``dampening`` (added to H's diagonal, as a fraction of its mean) defaults to 1.0, not the
  paper's 0.01: a Hessian of a few thousand tokens of one domain over-fits that domain; a
  heavier ridge keeps most of the in-domain gain and more of it off the domain.
* columns are rounded in order of decreasing ``diag(H)`` ("act-order").

Columns that calibration never activated keep their weights (the paper zeroes them: text of
another domain may well activate them). Linears whose module does not take the activation as
its first positional input, and MoE experts, keep nearest rounding (reported by the caller).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from rewriter.targets.fp8 import BLOCK, E4M3_MAX, FP8_DTYPE, quantize_blockwise
from torch import Tensor, nn
from tqdm.auto import tqdm

from rewriter.capture import normalize_inputs
from rewriter.errors import InputError

from .calibration import real_token_rows

__all__ = ["DEFAULT_DAMPENING", "InputHessian", "collect_input_hessians",
           "gptq_quantize_blockwise"]

DEFAULT_DAMPENING = 1.0


class InputHessian:
    """``X^T X`` (K, K) float64 over the real (not padded) calibration tokens of one input,
    and their count ``tokens``; :meth:`mean` is ``H = X^T X / tokens``."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.xtx = torch.zeros(k, k, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: Tensor) -> None:  # x (T, K)
        x = x.detach().to(torch.float64)
        self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def mean(self) -> Tensor:
        return self.xtx / max(self.tokens, 1)


def _activation(args: tuple, k: int) -> Tensor | None:
    x = args[0] if args else None
    if isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 1 and x.shape[-1] == k:
        return x
    return None


@torch.no_grad()
def collect_input_hessians(model: nn.Module, in_features: Mapping[str, int],
                           batches: Iterable[Any], *, progress: bool | None = None
                           ) -> dict[str, InputHessian]:
    """Run ``batches`` through ``model`` (eval mode, no grad) and accumulate, for each module
    named in ``in_features`` (FQN -> K), ``X^T X`` of its first positional input (..., K).

    Modules called one after another on the same tensor object (attention's q/k/v, a GLU's
    gate/up) share one :class:`InputHessian` (8 K^2 bytes: float64). A dict batch's
    ``attention_mask`` (batch, sequence) leaves padded positions out. Modules whose first
    input is not a (..., K) float tensor get none (the caller rounds them to nearest).
    Raises :class:`InputError` naming the batch that cannot run, or the module whose inputs
    are not finite.
    """
    found: dict[str, InputHessian] = {}
    state: dict[str, Any] = {"mask": None, "last": None}

    def hook(name: str, k: int):
        def pre(module, args):
            x = _activation(args, k)
            if x is None:
                return
            last = state["last"]  # (tensor, version, Hessian) of the previous reader
            if last is not None and last[0] is x and last[1] == x._version:
                found.setdefault(name, last[2])  # a sibling read this very tensor: share
                return
            rows = x.detach().reshape(-1, k)
            mask = state["mask"]
            if mask is not None and rows.shape[0] == mask.numel():
                rows = rows[real_token_rows(mask, rows.shape[0], f"the input of {name}")]
            if not torch.isfinite(rows).all():
                raise InputError(f"{name}: its calibration inputs are not finite; GPTQ "
                                 "rounding needs finite activations (FP8Config(weight_rounding"
                                 "='nearest') skips it)")
            h = found.setdefault(name, InputHessian(k))
            h.add(rows)
            state["last"] = (x, x._version, h)
        return pre

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name, k))
               for name, k in in_features.items()]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        show = sys.stderr.isatty() if progress is None else progress
        for i, batch in enumerate(tqdm(batches, desc="GPTQ inputs", unit="batch",
                                       disable=not show)):
            args, kwargs = normalize_inputs(batch)
            mask = kwargs.get("attention_mask")
            state["mask"] = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
            state["last"] = None
            try:
                model(*args, **kwargs)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"calibration batch {i} cannot run through the model for "
                                 f"GPTQ rounding: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        for m, was_training in modes:
            m.training = was_training
    return found


def _scales_per_element(scale: Tensor, n: int, k: int) -> Tensor:
    """(N/128, K/128) block scales -> (N, K), float64."""
    return (scale.double().repeat_interleave(BLOCK, 0)[:n]
            .repeat_interleave(BLOCK, 1)[:, :k])


def _round_e4m3(x: Tensor) -> Tensor:
    """Nearest E4M3 value of ``x`` (float64, in units of the scale), saturating at +-448."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float32).to(FP8_DTYPE).to(torch.float64)


@torch.no_grad()
def gptq_quantize_blockwise(weight: Tensor, hessian: Tensor, *,
                            dampening: float = DEFAULT_DAMPENING, pow2: bool = False,
                            block_columns: int = BLOCK) -> tuple[Tensor, Tensor]:
    """GPTQ-round ``weight`` (N, K) to E4M3 with 128 x 128 block scales.

    ``hessian``: (K, K) ``X^T X / T`` of the layer's inputs. ``dampening``: added to the
    diagonal, as a fraction of its mean (> 0). Returns ``(q, s)`` in
    :func:`rewriter.targets.fp8.quantize_blockwise`'s format: q (N, K) float8_e4m3fn, s
    (ceil(N/128), ceil(K/128)) fp32, ``s`` equal to nearest rounding's scales. A zero Hessian
    (inputs never active) gives nearest rounding. Arithmetic in float64.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight must be (N, K) and hessian (K, K), got "
                         f"{tuple(weight.shape)} and {tuple(hessian.shape)}")
    if not dampening > 0:
        raise ValueError(f"dampening must be > 0, got {dampening!r}")
    n, k = weight.shape
    _, scale = quantize_blockwise(weight.detach(), pow2=pow2)
    h = hessian.detach().to(torch.float64).clone()
    diag = torch.diagonal(h)
    mean = float(diag.mean())
    if not mean > 0:  # never active: no correlation to exploit
        h = torch.eye(k, dtype=torch.float64)
        mean = 1.0
    diag.add_(dampening * mean)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    # rows of wt are W's columns, in rounding order: (K, N), each column contiguous
    wt = weight.detach().to(torch.float64).T[order].contiguous()
    st = _scales_per_element(scale, n, k).T[order].contiguous()  # (K, N)
    h = h[order][:, order]
    # upper Cholesky factor of H^-1: row i holds the weights that spread column i's error
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty_like(wt)  # (K, N) E4M3 values, in units of the scale
    for c0 in range(0, k, block_columns):
        c1 = min(c0 + block_columns, k)
        wb, ub = wt[c0:c1], u[c0:c1, c0:c1]  # (B, N) view, (B, B)
        err = torch.empty_like(wb)
        for i in range(c1 - c0):
            codes[c0 + i] = _round_e4m3(wb[i] / st[c0 + i])
            e = (wb[i] - codes[c0 + i] * st[c0 + i]) / ub[i, i]  # (N,)
            wb[i:].sub_(ub[i, i:, None] * e[None, :])
            err[i] = e
        wt[c1:].sub_(u[c0:c1, c1:].T @ err)
    q = codes[torch.argsort(order)].T.to(torch.float32).to(FP8_DTYPE)  # (N, K)
    return q.contiguous(), scale
