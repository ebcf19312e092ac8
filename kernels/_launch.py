"""Launch-side helpers shared by the kernel families."""

from __future__ import annotations

import os

import torch
from torch._subclasses.fake_tensor import FakeTensor

# Read once, like triton itself: TRITON_INTERPRET must be set before the kernels are decorated.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "").strip() in {"1", "true", "True"}


def shapes_only(*tensors: torch.Tensor) -> bool:
    """True when a launcher runs on fake tensors under the Triton interpreter.

    ``triton_op`` registers its function as the op's fake kernel, and on a GPU
    ``wrap_triton`` turns each launch into a traceable no-op for fake tensors. Under
    ``TRITON_INTERPRET=1`` torch hands back the interpreted kernel itself, which would try to
    read the fake storage; the launcher then returns its freshly allocated outputs unlaunched,
    which is all shape propagation needs. Only plain fake tensors qualify: a functionalized
    trace (AOTAutograd decomposing the op) must record the kernels, so it is never skipped.
    """
    return INTERPRETING and any(type(t) is FakeTensor for t in tensors)
