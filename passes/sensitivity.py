"""Which lowered linears lose the most to FP8 rounding, and which to keep in high precision.

Score of a linear with weight W (N, K) rounded to W' (its FP8 codes dequantized):

    s = sum over calibration sequences of  sum_ij (dL_seq / dW_ij)^2 * (W'_ij - W_ij)^2

the diagonal empirical-Fisher estimate of how much the loss grows when this linear alone is
rounded (the second-order sensitivity of HAWQ-V2, Dong et al. 2020, and SqueezeLLM, Kim et al.
2023). ``L_seq``: the next-token loss of the sequence when the model's first float output is
language-model logits (B, T, V) over the batch's token ids (``input_ids``, or the first
positional integer tensor); otherwise a seeded Rademacher projection of that output (a
Hutchinson estimate of the Gauss-Newton diagonal), so every model gets a score without labels.
Padded positions (``attention_mask`` 0) count in neither, as in every calibration statistic.

:func:`choose_high_precision` keeps the largest scores first (above the mean only), within a
budget of the scored linears' weight parameters (the rest stay FP8). The model is left as it
was: weights, ``requires_grad`` flags, ``.grad`` and train/eval modes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from rewriter.capture import (
    first_float_output,
    is_token_logits,
    normalize_inputs,
    real_positions,
    sequence_rows,
    token_ids,
)
from rewriter.errors import InputError

__all__ = ["fisher_sensitivity", "choose_high_precision", "ranking", "sequence_loss"]


def sequence_loss(output: Any, input_ids: Tensor | None, generator: torch.Generator,
                  attention_mask: Tensor | None = None) -> Tensor:
    """The scalar whose gradient measures sensitivity for one sequence's ``output``:
    next-token cross-entropy when the output is logits (1, T, V) over ``input_ids`` (1, T),
    else ``<v, output>`` for a Rademacher ``v`` drawn from ``generator``. Positions where
    ``attention_mask`` (1, T) is 0 (padding) count in neither: not as targets, not as outputs.
    Raises :class:`InputError` when the output has no float tensor."""
    y = first_float_output(output)
    if y is None:
        raise InputError("FP8 sensitivity: the model's output has no float tensor to measure")
    real = real_positions(attention_mask, y)  # (1, T, 1...) or None
    if is_token_logits(y, input_ids) and input_ids.shape[1] > 1:
        targets = input_ids[:, 1:]
        if real is not None:  # a target counts when it and the position predicting it are real
            real_t = real.reshape(real.shape[:2])  # (1, T)
            targets = targets.masked_fill(~(real_t[:, 1:] & real_t[:, :-1]), -100)
        if not (targets != -100).any():
            return y.sum() * 0.0  # nothing real to predict: no gradient
        return F.cross_entropy(y[:, :-1].flatten(0, 1).float(), targets.flatten(),
                               ignore_index=-100)
    v = torch.randint(0, 2, y.shape, generator=generator).to(y) * 2 - 1
    if real is not None:
        v = v * real.to(v)
    return (v * y).sum()


def fisher_sensitivity(model: nn.Module, rounded: Mapping[str, Tensor], batches: Iterable[Any],
                       *, seed: int = 0, progress: bool | None = None) -> dict[str, float]:
    """FQN -> score (see the module doc) for every linear named in ``rounded`` (FQN -> its
    rounded weight, dequantized, the shape of the module's ``weight``). One backward pass per
    calibration sequence. Raises :class:`InputError` naming a batch that cannot run."""
    params = {fqn: model.get_submodule(fqn).weight for fqn in rounded}
    fisher = {fqn: torch.zeros_like(p, dtype=torch.float32) for fqn, p in params.items()}
    flags = {fqn: p.requires_grad for fqn, p in params.items()}
    modes = [(m, m.training) for m in model.modules()]
    generator = torch.Generator().manual_seed(seed)
    sequences = [row for b in batches for row in sequence_rows(*normalize_inputs(b))]
    show = sys.stderr.isatty() if progress is None else progress
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        for i, seq in enumerate(tqdm(sequences, desc="FP8 sensitivity", unit="seq",
                                     disable=not show)):
            args, kwargs = seq
            try:
                with torch.enable_grad():
                    loss = sequence_loss(model(*args, **kwargs), token_ids(args, kwargs),
                                         generator, kwargs.get("attention_mask"))
                    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"calibration sequence {i} cannot run forward and backward "
                                 f"for FP8 sensitivity: {type(exc).__name__}: {exc}") from exc
            for fqn, g in zip(params, grads):
                if g is not None:
                    fisher[fqn] += g.detach().float() ** 2
    finally:
        for fqn, p in params.items():
            p.requires_grad_(flags[fqn])
        for m, was_training in modes:
            m.train(was_training)
    with torch.no_grad():
        return {fqn: float((fisher[fqn] * (rounded[fqn].float() - params[fqn].float()) ** 2)
                           .sum()) for fqn in params}


def ranking(scores: Mapping[str, float]) -> list[str]:
    """The FQNs of ``scores``, largest score first; ties in name order."""
    return sorted(scores, key=lambda f: (-scores[f], f))


def choose_high_precision(scores: Mapping[str, float], sizes: Mapping[str, int],
                          budget: float) -> list[str]:
    """The FQNs to keep in high precision: largest score first, each taken while the kept
    parameters stay within ``budget`` (a fraction) of ``sum(sizes)`` (one that does not fit is
    skipped, smaller ones after it may be taken); ties in name order. Only linears scoring
    above the mean are candidates: a below-average one would cost memory for less error than
    an average linear carries."""
    total = sum(sizes.values())
    mean = sum(scores.values()) / max(len(scores), 1)
    kept, used = [], 0
    for fqn in ranking(scores):
        if not scores[fqn] > mean:
            break
        if used + sizes[fqn] <= budget * total:
            kept.append(fqn)
            used += sizes[fqn]
    return kept
