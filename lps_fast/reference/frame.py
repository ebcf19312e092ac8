"""Reference frame ops (O(3) / E(3) acting on 3-vector features, optionally with a permutation).

A frame sample ``R[b, j]`` is a 3 x 3 orthogonal matrix whose columns are the frame axes. Inputs
are moved into the frame with ``R^T (v - center)``; outputs go back with ``R v + center``. Point
features have shape ``(B, n, 3, C)``: ``C`` 3-vectors per node.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _checks
from .permute import straight_through_matrix


def _frame_apply(
    x: torch.Tensor,
    R: torch.Tensor,
    perm: Optional[torch.Tensor],
    center: Optional[torch.Tensor],
    soft: Optional[torch.Tensor],
) -> torch.Tensor:
    if center is not None:
        x = x - center[:, None]  # [B, n, 3, C]
    if perm is None:
        # out[b, j, r, m, c] = sum_a R[b, j, a, m] x[b, r, a, c]
        return torch.einsum("bjam,brac->bjrmc", R, x)
    h = straight_through_matrix(perm, soft, x.dtype)
    gathered = torch.einsum("bjir,biac->bjrac", h, x)  # H^T x, per sample
    return torch.einsum("bjam,bjrac->bjrmc", R, gathered)


def _frame_unapply_mean(
    y: torch.Tensor,
    R: torch.Tensor,
    perm: Optional[torch.Tensor],
    center: Optional[torch.Tensor],
    soft: Optional[torch.Tensor],
) -> torch.Tensor:
    k = y.shape[1]
    rotated = torch.einsum("bjam,bjrmc->bjrac", R, y)  # R y
    if perm is None:
        out = rotated.sum(dim=1) / k
    else:
        h = straight_through_matrix(perm, soft, y.dtype)
        out = torch.einsum("bjir,bjrac->biac", h, rotated) / k  # mean_j H (R y)
    if center is not None:
        out = out + center[:, None]
    return out


def frame_apply(
    x: torch.Tensor,
    R: torch.Tensor,
    perm: Optional[torch.Tensor] = None,
    center: Optional[torch.Tensor] = None,
    soft: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[b, j, r, :, c] = R[b, j]^T (x[b, p(r), :, c] - center[b, :, c])``: ``(B, n, 3, C) -> (B, k, n, 3, C)``."""
    _checks.check_frame_apply(x, R, perm, center, soft)
    return _frame_apply(x, R, perm, center, soft)


def frame_unapply_mean(
    y: torch.Tensor,
    R: torch.Tensor,
    perm: Optional[torch.Tensor] = None,
    center: Optional[torch.Tensor] = None,
    soft: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[b, p(r)] += R[b, j] y[b, j, r] / k``, then ``+ center``: ``(B, k, n, 3, C) -> (B, n, 3, C)``."""
    _checks.check_frame_unapply_mean(y, R, perm, center, soft)
    return _frame_unapply_mean(y, R, perm, center, soft)
