"""Triton kernels of lps_fast (installed as ``lps_fast.kernels``).

Each family module registers ``lps_fast::<op>_triton`` ops through ``torch.library.triton_op``,
with the schemas of ``lps_fast._ops.SCHEMAS`` / ``BACKWARD_SCHEMAS``. ``OPS`` maps each public op
name to its registered op, for the ops whose whole family (``_ops.FAMILIES``) exists here, and
the autograd formulas of ``lps_fast._ops`` are attached to exactly those.

Importing this package needs triton but no GPU: the kernels compile on first launch (or run
under ``TRITON_INTERPRET=1`` on CPU tensors).
"""

import torch

from lps_fast import _ops

from . import frame, gram_schmidt, permute, sinkhorn, vn_layer  # noqa: F401  (registers the ops)

SUFFIX = "_triton"


def _registered(name: str) -> bool:
    return hasattr(getattr(torch.ops, _ops.NAMESPACE), name + SUFFIX)


OPS = {
    name: getattr(getattr(torch.ops, _ops.NAMESPACE), name + SUFFIX)
    for name in _ops.OP_NAMES
    if all(_registered(member) for member in _ops.FAMILIES[name]) and _registered(name)
}

_ops.register_autograd(_ops.OpSet(SUFFIX), names=OPS.keys())
# the distribution network's fused layer (lps_fast.nn.vn_layer), outside the public ops
_ops.register_vn_layer_autograd(SUFFIX)

__all__ = ["OPS"]
