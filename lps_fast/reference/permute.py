"""Reference permutation ops: the dense formulas of docs/SPEC.md ("Ops") with permutation matrices.

``H[b, j, i, r] = 1`` if ``perm[b, j, r] == i`` (rows = nodes, columns = positions). The inverse
group element acts on inputs as ``H^T x``; outputs go back as ``H y``. With a soft matrix ``S``
the formulas use ``H_st = H + (S - S.detach())``: its value is exactly ``H`` (so the forward pass
is the hard permutation, bit for bit) and its gradient w.r.t. ``S`` is the identity, which is the
straight-through estimator ``(H - S).detach() + S`` without that form's rounding in the value.

These functions are the specification the fast kernels are tested against; they are written for
clarity, not speed (``permute_edges`` costs O(k n^3 F)).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _checks


def permutation_matrix(perm: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``H`` of a ``(B, k, n)`` perm: ``H[b, j, i, r] = (perm[b, j, r] == i)``."""
    n = perm.shape[-1]
    # A comparison rather than one_hot, which cannot build a matrix with n = 0 classes.
    nodes = torch.arange(n, device=perm.device, dtype=perm.dtype)
    return (perm[..., None, :] == nodes[:, None]).to(dtype)


def straight_through_matrix(
    perm: torch.Tensor, soft: Optional[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """``H`` in value, with the straight-through gradient path to ``soft`` when it is given."""
    hard = permutation_matrix(perm, dtype)
    if soft is None:
        return hard
    soft = soft.to(dtype)
    return hard + (soft - soft.detach())


def _gather_nodes(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Non-floating inputs (labels, adjacency bits) have no dense matmul; gather them instead."""
    batch, k, n = perm.shape
    index = perm.reshape(batch, k * n)
    flat = x.reshape(batch, x.shape[1], -1)
    out = torch.gather(flat, 1, index[..., None].expand(batch, k * n, flat.shape[-1]))
    return out.reshape(batch, k, n, *x.shape[2:])


def _permute_nodes(x: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor]) -> torch.Tensor:
    if not x.is_floating_point():
        return _gather_nodes(x, perm)
    h = straight_through_matrix(perm, soft, x.dtype)
    return torch.einsum("bjir,bi...->bjr...", h, x)


def _permute_edges(e: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor]) -> torch.Tensor:
    if not e.is_floating_point():
        rows = _gather_nodes(e, perm)  # [B, k, n, n, *F]: rows permuted
        batch, k, n = perm.shape
        index = perm[:, :, None, :].expand(batch, k, n, n)
        index = index.reshape(batch, k, n, n, *([1] * (e.dim() - 3))).expand(rows.shape)
        return torch.gather(rows, 3, index)
    h = straight_through_matrix(perm, soft, e.dtype)
    rows = torch.einsum("bjir,biu...->bjru...", h, e)  # H^T e
    return torch.einsum("bjru...,bjus->bjrs...", rows, h)  # (H^T e) H


def _unpermute_mean(y: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor]) -> torch.Tensor:
    h = straight_through_matrix(perm, soft, y.dtype)
    return torch.einsum("bjir,bjr...->bi...", h, y) / y.shape[1]


def _unpermute_edges_mean(
    y: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor], diagonal: bool
) -> torch.Tensor:
    h = straight_through_matrix(perm, soft, y.dtype)
    k = y.shape[1]
    rows = torch.einsum("bjir,bjrs...->bjis...", h, y)  # H y
    if diagonal:
        # diag(H y H^T)[i] = sum_s (H y)[i, s] H[i, s]
        return torch.einsum("bjis...,bjis->bi...", rows, h) / k
    return torch.einsum("bjis...,bjus->biu...", rows, h) / k  # (H y) H^T


def permute_nodes(x: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[b, j, r] = x[b, perm[b, j, r]]``: ``(B, n, *F) -> (B, k, n, *F)`` (= ``H^T x``)."""
    _checks.check_permute_nodes(x, perm, soft)
    return _permute_nodes(x, perm, soft)


def permute_edges(e: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[b, j, r, s] = e[b, perm[r], perm[s]]``: ``(B, n, n, *F) -> (B, k, n, n, *F)`` (= ``H^T e H``)."""
    _checks.check_permute_edges(e, perm, soft)
    return _permute_edges(e, perm, soft)


def unpermute_mean(y: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[b, perm[b, j, r]] += y[b, j, r] / k``: ``(B, k, n, *F) -> (B, n, *F)`` (= mean_j ``H y``)."""
    _checks.check_unpermute_mean(y, perm, soft)
    return _unpermute_mean(y, perm, soft)


def unpermute_edges_mean(
    y: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None, diagonal: bool = False
) -> torch.Tensor:
    """mean_j ``H y H^T``: ``(B, k, n, n, *F) -> (B, n, n, *F)``, or its diagonal ``(B, n, *F)``."""
    _checks.check_unpermute_edges_mean(y, perm, soft, diagonal)
    return _unpermute_edges_mean(y, perm, soft, diagonal)
