"""Router initialisation for an FFN cut into experts.

* ``centroid`` (MoEfication's similarity router): expert e's router row is the mean normalised
  first-projection row of its neurons, so a token is sent where its input aligns with the
  neurons' input weights.
* ``calibrated``: a linear router (with bias) fitted by ridge regression on calibration tokens
  to predict, per token, the log-norm of each expert's true output contribution
  ``||W_down[:, S_e] h_{S_e}||`` centred over experts: it learns which experts *matter* for a
  token, which is what top-k selection needs (MoEfication's learned router, small and fast).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "ROUTER_INITS",
    "centroid_router",
    "expert_contributions",
    "fit_router",
    "topk_recall",
]

ROUTER_INITS = ("centroid", "calibrated")


def centroid_router(first_rows: torch.Tensor, groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """(E, d) router weight: mean normalised first-projection row per expert."""
    rows = first_rows.double()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (d_ff, d)
    w = torch.stack([rows[g].mean(0) for g in groups])  # (E, d)
    return w.float()


def expert_contributions(
    h: torch.Tensor, w_down: torch.Tensor, groups: Sequence[torch.Tensor]
) -> torch.Tensor:
    """(N, E) norm of each expert's output contribution for calibration tokens h (N, d_ff);
    w_down is (d, d_ff)."""
    h = h.double()
    w = w_down.double()
    cols = [(h[:, g] @ w[:, g].T).norm(dim=1) for g in groups]  # E x (N,)
    return torch.stack(cols, 1)


def fit_router(
    x: torch.Tensor, contributions: torch.Tensor, *, ridge: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression x (N, d) -> centred log contributions (N, E). Returns (weight (E, d),
    bias (E,)) in float32."""
    n, d = x.shape
    if n < 2:
        raise ValueError("fitting a router needs at least 2 calibration tokens")
    target = contributions.double().clamp_min(1e-12).log()
    target = target - target.mean(1, keepdim=True)  # only the ranking across experts matters
    xd = x.double()
    mean = xd.mean(0)
    xc = xd - mean
    gram = xc.T @ xc  # (d, d)
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype), xc.T @ target)  # (d, E)
    bias = target.mean(0) - mean @ w  # (E,)
    return w.T.float().contiguous(), bias.float()


def topk_recall(scores: torch.Tensor, contributions: torch.Tensor, k: int) -> float:
    """Fraction of the oracle's top-k experts (by true contribution) that ``scores`` selects."""
    chosen = scores.topk(k, dim=1).indices
    oracle = contributions.topk(k, dim=1).indices
    hits = (chosen[:, :, None] == oracle[:, None, :]).any(-1).float()
    return float(hits.mean())
