"""Real English text that ships with CPython, for calibration, evaluation and training.

``pydoc_data.topics`` is Python's language reference (a dict of topic -> text). The corpus is
its values joined in sorted-key order; token ids come from a tokenizer (the model's own) or, for
the byte-level reference models (vocab 256), from the UTF-8 bytes. Splits are disjoint:
calibration/training from the start of the text, evaluation from its end.
"""

from __future__ import annotations

import math
from pydoc_data.topics import topics
from typing import Any

import torch
import torch.nn.functional as F

from rewriter.capture import first_float_output
from rewriter.errors import InputError

__all__ = ["pydoc_text", "token_ids", "split_ids", "model_batches", "perplexity"]


def pydoc_text() -> str:
    """Python's language reference as one string (topics in sorted-key order)."""
    return "\n\n".join(topics[k] for k in sorted(topics))


def token_ids(tokenizer: Any = None) -> torch.Tensor:
    """(n,) int64 ids of the corpus: the tokenizer's, or UTF-8 bytes when it is None."""
    text = pydoc_text()
    if tokenizer is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def split_ids(ids: torch.Tensor, seq_len: int, head_seqs: int,
              eval_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(head (head_seqs, seq_len) from the start, eval (eval_tokens // seq_len, seq_len) from
    the end). Raises :class:`InputError` (a ValueError) when the text is too short for both
    or a count is not a non-negative int (``seq_len`` positive)."""
    for name, value, low in (("seq_len", seq_len, 1), ("head_seqs", head_seqs, 0),
                             ("eval_tokens", eval_tokens, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"split_ids: {name} must be an int >= {low}, got {value!r}")
    n_eval = eval_tokens // seq_len
    need = (head_seqs + n_eval) * seq_len
    if need > ids.numel():
        raise InputError(f"need {need} tokens ({head_seqs} + {n_eval} sequences of {seq_len}),"
                         f" the text has {ids.numel()}")
    head = ids[: head_seqs * seq_len].view(head_seqs, seq_len)
    tail = ids[ids.numel() - n_eval * seq_len:].view(n_eval, seq_len)
    return head, tail


def model_batches(ids: torch.Tensor, batch: int = 4, *, hf: bool) -> list[Any]:
    """Rows of ``ids`` (n, L) in batches of ``batch`` sequences, as model inputs:
    ``{"input_ids": (b, L)}`` for HF models (``hf``), else ``((b, L),)``."""
    rows = [ids[i:i + batch] for i in range(0, ids.shape[0], batch)]
    return [{"input_ids": r} if hf else (r,) for r in rows]


@torch.no_grad()
def perplexity(model: torch.nn.Module, eval_ids: torch.Tensor, batch: int = 8,
               hf: bool | None = None) -> float:
    """exp(mean next-token NLL) over every position but the first of each sequence."""
    if hf is None:
        hf = hasattr(model, "config") and hasattr(model.config, "model_type")
    nll, count = 0.0, 0
    for i in range(0, eval_ids.shape[0], batch):
        ids = eval_ids[i:i + batch]
        out = model(input_ids=ids) if hf else model(ids)
        logits = first_float_output(out)  # (B, T, V): a tensor or an HF output's .logits
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                     ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
