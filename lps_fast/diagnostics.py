"""How concentrated a distribution's samples are: between blind group averaging and one
deterministic sample (canonicalization).

For the ``k`` samples drawn for one input:

* permutations: the mean over real nodes of the largest entry of the averaged permutation
  matrix ``mean_j H_j`` (how often the most frequent position of a node is taken). 1 when every
  sample puts every node at the same position; for uniform samples it falls towards ``1 / n``
  as ``k`` grows (with few samples it stays above it: the maximum of a few counts).
* rotations: ``||mean_j R_j||_F / sqrt(3)``. 1 when every sample is the same frame; for Haar
  samples about ``sqrt(1 / k)`` (the mean of ``k`` independent random rotations).

Both are averaged over the batch. A learned distribution that drifts towards 1 during training
collapses towards canonicalization; one that stays at the uniform level learned nothing.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .groups import GroupSample


@torch.no_grad()
def permutation_concentration(perm: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``perm (B, k, n)`` -> scalar tensor: the mean largest entry of ``mean_j H_j`` per real node."""
    batch, k, n = perm.shape
    counts = torch.zeros(batch, n, n, dtype=torch.float32, device=perm.device)
    # counts[b, node, position] += 1 for every sample
    positions = torch.arange(n, device=perm.device).expand(batch, k, n)
    counts.view(batch, n * n).scatter_add_(1, (perm * n + positions).reshape(batch, k * n),
                                           torch.ones(batch, k * n, device=perm.device))
    largest = counts.amax(dim=-1) / k  # [B, n]: per node
    if mask is None:
        return largest.mean()
    real = mask.to(largest.dtype)
    per_graph = (largest * real).sum(-1) / real.sum(-1).clamp_min(1.0)
    return per_graph[real.sum(-1) > 0].mean() if bool((real.sum(-1) > 0).any()) else per_graph.new_zeros(())


@torch.no_grad()
def rotation_concentration(rotation: torch.Tensor) -> torch.Tensor:
    """``rotation (B, k, 3, 3)`` -> scalar tensor: ``mean_b ||mean_j R_bj||_F / sqrt(3)``."""
    return (rotation.double().mean(dim=1).flatten(1).norm(dim=-1) / math.sqrt(3.0)).mean().to(torch.float32)


def concentration(sample: GroupSample, mask: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """``{"permutation": ..., "rotation": ...}`` for the parts a sample has (floats)."""
    out: Dict[str, float] = {}
    if sample.perm is not None:
        out["permutation"] = float(permutation_concentration(sample.perm, mask))
    if sample.rotation is not None:
        out["rotation"] = float(rotation_concentration(sample.rotation))
    return out


__all__ = ["concentration", "permutation_concentration", "rotation_concentration"]
