"""Reference distribution-side ops for S_n: the Sinkhorn soft sort and the permutation entropy.

``sinkhorn_sort`` follows docs/SPEC.md ("Distribution-side ops") step by step, as an unrolled
loop that autograd differentiates through every iteration (it keeps ``2 * n_iter`` dense intermediates alive: that
cost is what the fast kernels remove).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _checks

NORM_EPS = 1e-12
MASKED_NORM_EPS = 1e-6
ENTROPY_CLAMP = 1e-12
LOG_FLOOR = -100.0


def normalize_scores(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Step 1: ``s / max(||s||_2, eps)`` over nodes; padded entries are 0 (not yet -inf)."""
    if mask is None:
        return scores / scores.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    real = mask[:, None, :]  # [B, 1, n]
    scores = scores.masked_fill(~real, 0.0)
    return scores / scores.norm(dim=-1, keepdim=True).clamp_min(MASKED_NORM_EPS)


def sort_positions(normalized: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Step 2: descending order, ties and padded nodes (sorted as -inf) in index order."""
    if mask is not None:
        normalized = normalized.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.sort(normalized, dim=-1, descending=True, stable=True).indices


def real_pairs(mask: Optional[torch.Tensor], perm: torch.Tensor) -> Optional[torch.Tensor]:
    """``[B, k, n, n]`` True where node i and position r are both real (None without mask)."""
    if mask is None:
        return None
    real_nodes = mask[:, None, :].expand(perm.shape)  # [B, k, n] by node
    # Real nodes sort first, so position r is real iff r < n_real.
    real_positions = torch.gather(real_nodes, -1, perm)  # [B, k, n] by position
    return real_nodes[..., :, None] & real_positions[..., None, :]


def _clean(log_matrix: torch.Tensor, pairs: Optional[torch.Tensor]) -> torch.Tensor:
    if pairs is not None:
        log_matrix = log_matrix.masked_fill(~pairs, float("-inf"))
    return torch.where(torch.isfinite(log_matrix), log_matrix, float("-inf"))


def _sinkhorn_sort(
    scores: torch.Tensor, tau: float, n_iter: int, mask: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    normalized = normalize_scores(scores, mask)  # [B, k, n], padded = 0
    perm = sort_positions(normalized.detach(), mask)  # [B, k, n]
    ordered = torch.gather(normalized, -1, perm)  # s_hat sorted, by position
    pairs = real_pairs(mask, perm)
    # L[i, r] = -|s_hat[i] - s_hat_sorted[r]| / tau; padded pairs are -inf.
    log_matrix = -(normalized[..., :, None] - ordered[..., None, :]).abs() / tau
    log_matrix = _clean(log_matrix, pairs)
    for _ in range(n_iter):
        log_matrix = _clean(log_matrix - torch.logsumexp(log_matrix, dim=-1, keepdim=True), pairs)
        log_matrix = _clean(log_matrix - torch.logsumexp(log_matrix, dim=-2, keepdim=True), pairs)
    return log_matrix.exp(), perm


def sinkhorn_sort(
    scores: torch.Tensor, tau: float, n_iter: int = 20, mask: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft sort + log-domain Sinkhorn: ``(B, k, n)`` scores -> ``(soft (B, k, n, n), perm (B, k, n))``.

    ``soft[b, j, i, r]`` (node i, position r) is doubly stochastic on real nodes, exactly 0 on
    padded rows and columns; ``perm`` sorts the normalized scores in descending order.
    """
    _checks.check_sinkhorn_sort(scores, tau, n_iter, mask)
    return _sinkhorn_sort(scores, float(tau), n_iter, mask)


def _permutation_entropy(soft: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    batch, k, n, _ = soft.shape
    if batch == 0 or k == 0:
        return soft.sum()  # no graphs or no samples carry no entropy: 0 (and a zero gradient)
    if mask is None:
        mask = torch.ones(batch, n, dtype=torch.bool, device=soft.device)
    pairs = (mask[:, :, None] & mask[:, None, :])[:, None]  # [B, 1, n, n]
    clamped = torch.where(pairs, soft.clamp_min(ENTROPY_CLAMP), 0.0)

    def entropy(dim: int) -> torch.Tensor:
        total = clamped.sum(dim=dim, keepdim=True)
        p = clamped / torch.where(total > 0, total, 1.0)
        # log only of real entries: padded ones would give 0 * log(0) and a NaN gradient.
        log_p = torch.log(torch.where(pairs, p, 1.0)).clamp_min(LOG_FLOOR)
        return -(torch.where(pairs, p * log_p, 0.0)).sum(dim=dim)

    per_node = entropy(dim=-2) + entropy(dim=-1)  # column t + row t: [B, k, n]
    per_node = per_node.mean(dim=1)  # over samples: [B, n]
    n_real = mask.sum(dim=-1).clamp_min(1).to(soft.dtype)
    per_graph = torch.where(mask, per_node, 0.0).sum(dim=-1) / n_real
    return per_graph.mean()


def permutation_entropy(soft: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean row + column entropy of a soft permutation ``(B, k, n, n)``, over real nodes: a scalar."""
    _checks.check_permutation_entropy(soft, mask)
    return _permutation_entropy(soft, mask)
