"""The public ops: validate, then run the provider chosen for the input's device.

Each function has the signature and semantics of its reference in ``lps_fast.reference``
(docs/SPEC.md, "Ops" and "Distribution-side ops"); ``lps_fast.backend_info()`` says which
provider runs it. With validation off (``lps_fast.set_validation(False)``), the ops whose kernel
checks its own arguments (the compiled C++ provider: shapes, dtypes and permutation values) skip
the Python checks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _backend, _checks


def _provider(op: str, device: torch.device) -> _backend.Provider:
    return _backend.resolve(op, device)


def permute_nodes(x: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[b, j, r] = x[b, perm[b, j, r]]``: ``(B, n, *F) -> (B, k, n, *F)`` (= ``H^T x``).

    With ``soft`` (B, k, n, n), gradients reach it through the straight-through estimator.
    """
    provider = _provider("permute_nodes", _checks.device_of(x, "x"))
    if not _checks.checks_skipped(provider.checks_perm_values):
        _checks.check_permute_nodes(x, perm, soft, values_checked_by_kernel=provider.checks_perm_values)
    return provider.ops["permute_nodes"](x, perm, soft)


def permute_edges(e: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[b, j, r, s] = e[b, perm[r], perm[s]]``: ``(B, n, n, *F) -> (B, k, n, n, *F)`` (= ``H^T e H``)."""
    provider = _provider("permute_edges", _checks.device_of(e, "e"))
    if not _checks.checks_skipped(provider.checks_perm_values):
        _checks.check_permute_edges(e, perm, soft, values_checked_by_kernel=provider.checks_perm_values)
    return provider.ops["permute_edges"](e, perm, soft)


def unpermute_mean(y: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[b, perm[b, j, r]] += y[b, j, r] / k``: ``(B, k, n, *F) -> (B, n, *F)`` (= mean_j ``H y``)."""
    provider = _provider("unpermute_mean", _checks.device_of(y, "y"))
    if not _checks.checks_skipped(provider.checks_perm_values):
        _checks.check_unpermute_mean(y, perm, soft, values_checked_by_kernel=provider.checks_perm_values)
    return provider.ops["unpermute_mean"](y, perm, soft)


def unpermute_edges_mean(
    y: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None, diagonal: bool = False
) -> torch.Tensor:
    """mean_j ``H y H^T``: ``(B, k, n, n, *F) -> (B, n, n, *F)``; with ``diagonal=True`` only its
    diagonal ``(B, n, *F)``, computed without forming the n x n result."""
    provider = _provider("unpermute_edges_mean", _checks.device_of(y, "y"))
    if not _checks.checks_skipped(provider.checks_perm_values):
        _checks.check_unpermute_edges_mean(y, perm, soft, diagonal, values_checked_by_kernel=provider.checks_perm_values)
    return provider.ops["unpermute_edges_mean"](y, perm, soft, diagonal)


def frame_apply(
    x: torch.Tensor,
    R: torch.Tensor,
    perm: Optional[torch.Tensor] = None,
    center: Optional[torch.Tensor] = None,
    soft: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[b, j, r, :, c] = R[b, j]^T (x[b, p(r), :, c] - center[b, :, c])``: ``(B, n, 3, C) -> (B, k, n, 3, C)``."""
    provider = _provider("frame_apply", _checks.device_of(x, "x"))
    if not _checks.checks_skipped(provider.checks_perm_values):
        _checks.check_frame_apply(x, R, perm, center, soft, values_checked_by_kernel=provider.checks_perm_values)
    return provider.ops["frame_apply"](x, R, perm, center, soft)


def frame_unapply_mean(
    y: torch.Tensor,
    R: torch.Tensor,
    perm: Optional[torch.Tensor] = None,
    center: Optional[torch.Tensor] = None,
    soft: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[b, p(r)] += R[b, j] y[b, j, r] / k``, then ``+ center``: ``(B, k, n, 3, C) -> (B, n, 3, C)``."""
    provider = _provider("frame_unapply_mean", _checks.device_of(y, "y"))
    if not _checks.checks_skipped(provider.checks_perm_values):
        _checks.check_frame_unapply_mean(y, R, perm, center, soft, values_checked_by_kernel=provider.checks_perm_values)
    return provider.ops["frame_unapply_mean"](y, R, perm, center, soft)


def sinkhorn_sort(
    scores: torch.Tensor, tau: float, n_iter: int = 20, mask: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft sort + log-domain Sinkhorn: ``(B, k, n)`` scores -> ``(soft (B, k, n, n), perm (B, k, n))``."""
    _checks.check_sinkhorn_sort(scores, tau, n_iter, mask)
    provider = _provider("sinkhorn_sort", _checks.device_of(scores, "scores"))
    return provider.ops["sinkhorn_sort"](scores, float(tau), n_iter, mask)


def permutation_entropy(soft: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean row + column entropy of ``soft (B, k, n, n)`` over real nodes and samples: a scalar."""
    _checks.check_permutation_entropy(soft, mask)
    provider = _provider("permutation_entropy", _checks.device_of(soft, "soft"))
    return provider.ops["permutation_entropy"](soft, mask)


def gram_schmidt(V: torch.Tensor, proper: bool = False) -> torch.Tensor:
    """Orthonormalize the columns of ``V (..., 3, 3)`` (classical Gram-Schmidt); ``proper=True``
    multiplies column 0 by ``det`` so the result is in SO(3)."""
    _checks.check_gram_schmidt(V, proper)
    provider = _provider("gram_schmidt", _checks.device_of(V, "V"))
    return provider.ops["gram_schmidt"](V, proper)
