"""Reference Gram-Schmidt: three equivariant vectors -> an O(3) (or SO(3)) frame."""

from __future__ import annotations

import torch

from .. import _checks

NORM_EPS = 1e-12


def _project(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(<v, u> / <u, u>) u`` over the vector dim (-2 of a column stack); 0 when ``u = 0``.

    Degenerate input (a zero column, or one that repeats an earlier one) leaves ``u = 0``; its
    projection is defined as 0 (with zero gradient) rather than ``0 / 0``, so the frame gets a
    zero column instead of NaN (docs/SPEC.md, "Degenerate frames").
    """
    squared = (u * u).sum(dim=-1, keepdim=True)
    nonzero = squared > 0
    coefficient = (v * u).sum(dim=-1, keepdim=True) / torch.where(nonzero, squared, torch.ones_like(squared))
    return torch.where(nonzero, coefficient, torch.zeros_like(coefficient)) * u


def _gram_schmidt(V: torch.Tensor, proper: bool) -> torch.Tensor:
    v0, v1, v2 = V[..., :, 0], V[..., :, 1], V[..., :, 2]  # columns, [..., 3]
    u0 = v0
    u1 = v1 - _project(u0, v1)
    u2 = v2 - _project(u0, v2) - _project(u1, v2)  # classical: both projections of v2
    columns = [u / u.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS) for u in (u0, u1, u2)]
    R = torch.stack(columns, dim=-1)
    if proper:
        # det as the triple product <e0, e1 x e2>: the same value, and a polynomial whose gradient
        # is the cofactor matrix even for the singular frames of degenerate input.
        det = (R[..., :, 0] * torch.linalg.cross(R[..., :, 1], R[..., :, 2], dim=-1)).sum(dim=-1, keepdim=True)
        R = torch.cat([R[..., :, :1] * det[..., None], R[..., :, 1:]], dim=-1)
    return R


def gram_schmidt(V: torch.Tensor, proper: bool = False) -> torch.Tensor:
    """Orthonormalize the columns of ``V (..., 3, 3)``; ``proper=True`` flips column 0 by ``det``."""
    _checks.check_gram_schmidt(V, proper)
    return _gram_schmidt(V, proper)
