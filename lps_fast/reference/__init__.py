"""The pure-PyTorch reference path: the specification every fast kernel is tested against.

Each function has the signature of the public op of the same name in ``lps_fast`` and is
written as the plain dense formula of docs/SPEC.md, "Ops" and "Distribution-side ops".
"""

from .frame import frame_apply, frame_unapply_mean
from .gram_schmidt import gram_schmidt
from .permute import (
    permutation_matrix,
    permute_edges,
    permute_nodes,
    unpermute_edges_mean,
    unpermute_mean,
)
from .sinkhorn import permutation_entropy, sinkhorn_sort

__all__ = [
    "permute_nodes",
    "permute_edges",
    "unpermute_mean",
    "unpermute_edges_mean",
    "frame_apply",
    "frame_unapply_mean",
    "sinkhorn_sort",
    "permutation_entropy",
    "gram_schmidt",
    "permutation_matrix",
]
