"""lps_fast: probabilistic symmetrization with fused kernels.

Make any PyTorch model equivariant to a symmetry group: sample group elements ``g ~ p(g | x)``,
run the model on ``g^-1 . x`` and average ``g . f(g^-1 . x)`` over the samples. The ops that do
the group work around the model (``permute_nodes``, ``frame_apply``, ``sinkhorn_sort``, ...) run
on compiled C++/CUDA or Triton kernels when available and agree with ``lps_fast.reference``.
"""

__version__ = "0.1.0"

from . import _registry

_registry.initialize()

from . import reference  # noqa: E402
from ._backend import set_backend, use_backend  # noqa: E402
from ._checks import check_perm_values, set_perm_check, set_validation, validation  # noqa: E402
from ._registry import backend_info, format_backend_info  # noqa: E402
from .ops import (  # noqa: E402
    frame_apply,
    frame_unapply_mean,
    gram_schmidt,
    permutation_entropy,
    permute_edges,
    permute_nodes,
    sinkhorn_sort,
    unpermute_edges_mean,
    unpermute_mean,
)

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
    "reference",
    "backend_info",
    "format_backend_info",
    "set_backend",
    "use_backend",
    "set_perm_check",
    "check_perm_values",
    "set_validation",
    "validation",
]

# The model level: groups, distributions over group elements, backbones and the symmetrizer.
from . import backbones, diagnostics, distributions, groups, nn, testing  # noqa: E402
from .symmetrize import InputResidual, Symmetrize  # noqa: E402

__all__ += ["Symmetrize", "InputResidual", "diagnostics", "groups", "distributions", "backbones", "nn", "testing"]
