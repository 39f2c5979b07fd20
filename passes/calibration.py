"""Calibration: per-neuron statistics of every FFN, collected on real batches.

Runs a copy of the captured graph with recorder modules after each FFN's input ``x`` (B, T, d)
and hidden activation ``h`` (B, T, d_ff) (the down projection's input), so it works for any
model the matcher understands, whatever its module structure. Memory is bounded whatever the
number of batches: running sums, one (d_ff, d_ff) co-activation matrix per FFN, and a uniform
reservoir of at most ``max_tokens`` (4096) token samples per FFN (for router fitting and oracles).

With ``sensitivity=True`` each batch also runs backward: a probe adds a zero tensor to every
FFN's output, and ``torch.autograd.grad`` of a Fisher loss (the cross-entropy of the model's
output read as logits against labels sampled from its own softmax, :func:`fisher_loss`) gives
``g = dL/d(FFN output)`` per token, kept beside x and h in the reservoir (``sample_g``). No
parameter's ``.grad`` is touched. ``(g . r)^2`` then estimates how much a change ``r`` of that
FFN's output moves the model's output distribution (passes/allocation.py).
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule
from tqdm.auto import tqdm

from rewriter.capture import (
    capture_info,
    conform_inputs,
    first_float_output,
    normalize_inputs,
)
from rewriter.errors import InputError
from rewriter.patterns import FFNMatch, find_ffns

__all__ = [
    "NeuronStats",
    "CalibrationStats",
    "calibrate",
    "fisher_loss",
    "stats_for",
    "COACTIVE_FRACTION",
    "real_token_rows",
]

# A neuron counts as "active" for a token when its |h| is in the token's top 25%.
COACTIVE_FRACTION = 0.25


@dataclass
class NeuronStats:
    """Statistics of one FFN's hidden neurons over the calibration tokens."""

    d_model: int
    d_ff: int
    tokens: int = 0
    abs_sum: torch.Tensor = field(default=None, repr=False)  # (d_ff,) float64
    coact: torch.Tensor = field(default=None, repr=False)  # (d_ff, d_ff) float32
    sample_x: torch.Tensor = field(default=None, repr=False)  # (N, d) float32
    sample_h: torch.Tensor = field(default=None, repr=False)  # (N, d_ff) float32
    sample_g: torch.Tensor | None = field(default=None, repr=False)  # (N, d) dL/d(output)
    _priority: torch.Tensor = field(default=None, repr=False)  # (N,) reservoir keys

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |h| per neuron (d_ff,): CMoE's criterion for the shared expert."""
        return self.abs_sum / max(self.tokens, 1)

    @property
    def coactivation(self) -> torch.Tensor:
        """P(both neurons active) (d_ff, d_ff)."""
        return self.coact / max(self.tokens, 1)


@dataclass
class CalibrationStats:
    """FFN module FQN -> :class:`NeuronStats`; ``tokens`` seen in all."""

    per_ffn: dict[str, NeuronStats]
    tokens: int
    batches: int

    def __getitem__(self, module: str) -> NeuronStats:
        return self.per_ffn[module]

    def __contains__(self, module: object) -> bool:
        return module in self.per_ffn


class _Recorder(nn.Module):
    """Identity module that hands what flows through it to a callback."""

    def __init__(self, callback):
        super().__init__()
        self.callback = callback

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self.callback(t)
        return t


class _GradProbe(nn.Module):
    """Adds a fresh zero leaf to what flows through it (when grad is enabled); the leaf's
    gradient is then dL/d(value), per token."""

    def __init__(self):
        super().__init__()
        self.leaf: torch.Tensor | None = None

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return t
        self.leaf = torch.zeros_like(t, requires_grad=True)
        return t + self.leaf


def fisher_loss(output: Any, generator: torch.Generator,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of the first floating tensor of ``output`` (read as logits over its
    last dim) against labels sampled from its own softmax: its gradients are samples of the
    Fisher information, so ``E[(g . r)^2]`` ~ the KL a small output change ``r`` causes.
    Positions where ``attention_mask`` (one entry per logits row, e.g. (B, T)) is 0 are
    padding: they take no part in the loss and draw no label."""
    logits = first_float_output(output)
    if logits is None or logits.dim() < 1 or logits.shape[-1] < 2:
        raise InputError("sensitivity calibration (MoEConfig.allocation='calibrated') needs a "
                         "model output of logits (a floating tensor (..., classes >= 2)); got "
                         f"{type(output).__name__}: use MoEConfig(allocation='uniform')")
    flat = logits.float().reshape(-1, logits.shape[-1])  # (N, V)
    if attention_mask is not None:
        flat = flat[real_token_rows(attention_mask, flat.shape[0], "the model's logits")]
    with torch.no_grad():
        labels = torch.multinomial(flat.softmax(-1), 1, generator=generator).squeeze(1)  # (N,)
    return torch.nn.functional.cross_entropy(flat, labels, reduction="sum")


def real_token_rows(attention_mask: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    """(rows,) bool: the real (not padded) positions of ``attention_mask`` laid over ``rows``
    token rows (the model's (B, T) positions, flattened)."""
    if attention_mask.numel() != rows:
        raise InputError(f"attention_mask has {attention_mask.numel()} positions "
                         f"{tuple(attention_mask.shape)} but {what} has {rows} token rows: "
                         "give a (batch, sequence) mask of the batch's input_ids")
    return attention_mask.reshape(-1) != 0


class _Accumulator:
    def __init__(self, stats: NeuronStats, max_tokens: int, generator: torch.Generator,
                 with_grad: bool = False):
        self.stats = stats
        self.max_tokens = max_tokens
        self.generator = generator
        self.with_grad = with_grad
        self.mask: torch.Tensor | None = None  # this batch's attention_mask: 0 = padding
        self.pending_x: torch.Tensor | None = None
        self.pending_h: torch.Tensor | None = None

    def _real(self, t: torch.Tensor) -> torch.Tensor:
        """(N, ...) rows of ``t`` -> the rows of real (not padded) positions."""
        if self.mask is None:
            return t
        return t[real_token_rows(self.mask, t.shape[0], f"the FFN input ({self.stats.d_model})")]

    def on_x(self, x: torch.Tensor) -> None:
        self.pending_x = self._real(x.detach().reshape(-1, x.shape[-1]).float())

    def on_h(self, h: torch.Tensor) -> None:
        s = self.stats
        h = self._real(h.detach().reshape(-1, h.shape[-1]).float())  # (T, d_ff) real tokens
        a = h.abs()
        s.tokens += h.shape[0]
        s.abs_sum += a.sum(0, dtype=torch.float64)
        k = max(1, int(round(COACTIVE_FRACTION * s.d_ff)))
        thresh = a.topk(k, dim=-1).values[:, -1:]  # (T, 1)
        active = (a >= thresh).float()  # (T, d_ff)
        s.coact += active.T @ active
        self.pending_h = h
        if not self.with_grad:
            self.commit(None)

    def commit(self, g: torch.Tensor | None) -> None:
        """Offer this batch's tokens (x, h and, with sensitivity, g (T, d)) to the reservoir."""
        s, x, h = self.stats, self.pending_x, self.pending_h
        self.pending_x = self.pending_h = None
        if x is None or h is None or x.shape[0] != h.shape[0]:
            return
        keys = torch.rand(h.shape[0], generator=self.generator)
        new = {"sample_x": x, "sample_h": h, "_priority": keys}
        if g is not None:
            new["sample_g"] = self._real(g.detach().reshape(-1, g.shape[-1]).float())
        merged = {k: torch.cat([getattr(s, k), v]) if getattr(s, k) is not None else v
                  for k, v in new.items()}
        if merged["_priority"].numel() > self.max_tokens:
            keep = merged["_priority"].topk(self.max_tokens).indices
            merged = {k: v[keep] for k, v in merged.items()}
        for k, v in merged.items():
            setattr(s, k, v)


def _instrumented(gm: GraphModule, ffns: list[FFNMatch], accs: list[_Accumulator],
                  probes: list[_GradProbe] | None = None) -> GraphModule:
    """A copy of ``gm`` (parameters shared) with recorders after each FFN's x and h, and with
    ``probes`` on each FFN's output."""
    graph = Graph()
    env: dict = {}
    graph.output(graph.graph_copy(gm.graph, env))
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # keeps torch.export's pytree calling
    runner = GraphModule(gm, graph)
    recorders = nn.Module()
    runner.add_module("_rewriter_recorders", recorders)
    for i, (m, acc) in enumerate(zip(ffns, accs)):
        h_node = m.projections["down"].input
        for tag, node, callback in (("x", m.input, acc.on_x), ("h", h_node, acc.on_h)):
            name = f"ffn{i}_{tag}"
            recorders.add_module(name, _Recorder(callback))
            with graph.inserting_after(env[node]):  # observes; users still read the value
                graph.call_module(f"_rewriter_recorders.{name}", (env[node],))
        if probes is not None:
            out = env[m.output]
            recorders.add_module(f"ffn{i}_probe", probes[i])
            with graph.inserting_after(out):
                probed = graph.call_module(f"_rewriter_recorders.ffn{i}_probe", (out,))
            out.replace_all_uses_with(probed, delete_user_cb=lambda user, p=probed: user is not p)
    runner.recompile()
    return runner


def _progress(iterable: Iterable[Any], total: int | None, desc: str, show: bool | None):
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="batch")


def calibrate(
    gm: GraphModule,
    batches: Iterable[Any],
    *,
    ffns: list[FFNMatch] | None = None,
    max_tokens: int = 4096,
    seed: int = 0,
    sensitivity: bool = False,
    progress: bool | None = None,
) -> CalibrationStats:
    """Collect per-neuron statistics of every FFN of a captured graph on ``batches``.
    ``sensitivity``: also keep each reservoir token's Fisher gradient at the FFN's output
    (``NeuronStats.sample_g``; one backward per batch, see the module doc).

    ``batches``: an iterable of model inputs (a tensor, a tuple or a dict, like the example
    inputs given to :func:`rewriter.capture`). A dict batch may hold an ``attention_mask``
    (batch, sequence): positions where it is 0 are padding and count nowhere (tokens, means,
    co-activation, samples, the Fisher loss); the model must then have been captured with an
    attention_mask too. Raises :class:`InputError` naming the batch when one is malformed, and
    when there are none. A progress bar is shown on a terminal.
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    ffns = find_ffns(gm) if ffns is None else ffns
    generator = torch.Generator().manual_seed(seed)
    per_ffn: dict[str, NeuronStats] = {}
    accs = []
    for m in ffns:
        stats = NeuronStats(
            m.d_model, m.d_ff,
            abs_sum=torch.zeros(m.d_ff, dtype=torch.float64),
            coact=torch.zeros(m.d_ff, m.d_ff),
        )
        per_ffn[_key(m)] = stats
        accs.append(_Accumulator(stats, max_tokens, generator, with_grad=sensitivity))
    probes = [_GradProbe() for _ in ffns] if sensitivity else None
    with warnings.catch_warnings():  # copying torch.export's codegen: torch's own deprecation
        warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated",
                                category=FutureWarning)
        runner = _instrumented(gm, ffns, accs, probes)
    info = capture_info(gm)
    captured_mask = info is None or "attention_mask" in info.example_kwargs
    label_generator = torch.Generator().manual_seed(seed + 1)
    total = len(batches) if hasattr(batches, "__len__") else None
    n = 0
    for i, batch in enumerate(_progress(batches, total, "calibrating", progress)):
        try:
            args, kwargs = normalize_inputs(batch)
        except InputError as exc:
            raise InputError(f"calibration batch {i}: {exc}") from exc
        args, kwargs = conform_inputs(gm, args, kwargs, f"calibration batch {i}")
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise InputError(f"calibration batch {i}: attention_mask must be a (batch, "
                                 f"sequence) tensor, got {getattr(mask, 'shape', type(mask))}")
            if not captured_mask:
                raise InputError(
                    f"calibration batch {i} has an attention_mask but the model was captured "
                    "without one: give example_inputs with an attention_mask (e.g. the first "
                    "calibration batch)")
        for acc in accs:
            acc.mask = mask
        try:
            with torch.set_grad_enabled(sensitivity):
                output = runner(*args, **kwargs)
        except Exception as exc:
            raise InputError(
                f"calibration batch {i} cannot run through the model: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        if probes is not None:
            leaves = [p.leaf for p in probes]
            grads = torch.autograd.grad(fisher_loss(output, label_generator, mask), leaves,
                                        allow_unused=True)
            for acc, leaf, g in zip(accs, leaves, grads):
                acc.commit(torch.zeros_like(leaf) if g is None else g)
        n += 1
    if n == 0:
        raise InputError("calibration is empty: give at least one batch")
    tokens = next(iter(per_ffn.values())).tokens if per_ffn else 0
    return CalibrationStats(per_ffn, tokens, n)


def _key(m: FFNMatch) -> str:
    return m.module or f"ffn{m.index}"


def stats_for(stats: CalibrationStats | None, m: FFNMatch) -> NeuronStats | None:
    return None if stats is None else stats.per_ffn.get(_key(m))

