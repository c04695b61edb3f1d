"""Linear centred kernel alignment (CKA) between two sets of features of the same frames.

Kornblith, Norouzi, Lee, Hinton, "Similarity of Neural Network Representations Revisited", ICML 2019
(arXiv 1905.00414; docs/papers.md#linear-cka). With column-centred X (N x D1) and Y (N x D2):

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)

It lies in [0, 1], is invariant to orthogonal transforms and isotropic scaling of either side (not to
arbitrary invertible linear maps), and compares layers of different widths. Rows are frames (or
utterances): both inputs must hold the same N rows, in the same order.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class CKAError(ValueError):
    """Features that CKA cannot compare; the message says why."""


def _as_2d(name: str, x) -> Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise CKAError(f"CKA: {name} must be (frames, features), got shape {tuple(x.shape)}")
    return x.to(torch.float64)


def linear_cka(x, y) -> float:
    """Linear CKA of ``x`` (N, D1) and ``y`` (N, D2), N rows = the same frames on both sides.

    Raises :class:`CKAError` when the row counts differ, or when there are fewer frames than
    features on either side (N < D: the Gram matrices are rank-deficient and CKA is biased towards 1;
    pool more audio), or when a side is constant.
    """
    x, y = _as_2d("x", x), _as_2d("y", y)
    n = x.shape[0]
    if y.shape[0] != n:
        raise CKAError(f"CKA: x and y must have the same frames, got {n} and {y.shape[0]} rows")
    width = max(x.shape[1], y.shape[1])
    if n < width:
        raise CKAError(
            f"CKA over {n} frames of {x.shape[1]}- and {y.shape[1]}-dimensional features: fewer frames "
            f"than features ({width}) make the estimate meaningless; use at least {width} frames (more audio)"
        )
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    norm_x = torch.linalg.matrix_norm(x.T @ x)
    norm_y = torch.linalg.matrix_norm(y.T @ y)
    if norm_x == 0 or norm_y == 0:
        raise CKAError("CKA: a constant feature set (zero after centring) has no similarity to anything")
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / (norm_x * norm_y))


def cka_matrix(rows: Sequence, cols: Sequence) -> Tensor:
    """``out[i, j] = linear_cka(rows[i], cols[j])``; each entry a (N, D) tensor over the same N frames."""
    return torch.tensor([[linear_cka(r, c) for c in cols] for r in rows], dtype=torch.float64)


__all__ = ["CKAError", "cka_matrix", "linear_cka"]
