"""Launch-side helpers shared by the kernel families."""

from __future__ import annotations

import contextlib
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


def _wrap(kernel):
    """``torch.library.wrap_triton(kernel)``, or the kernel itself where torch refuses it.

    Some torch releases accept only ``triton.jit`` functions in ``wrap_triton``; under
    ``TRITON_INTERPRET=1`` the decorated kernel is an interpreter object, which those reject.
    The interpreter runs eagerly on CPU tensors, so launching it directly loses nothing.
    """
    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:
        if INTERPRETING:
            return kernel
        raise


def device_guard(tensor: torch.Tensor):
    """Makes ``tensor``'s GPU the current device for a launch: Triton launches on the current
    device, whatever device the arguments live on. A no-op for CPU tensors (interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def launch(kernel, grid, device_of: torch.Tensor, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on the device of ``device_of``, traceable by
    ``torch.compile`` (through ``wrap_triton``)."""
    with device_guard(device_of):
        _wrap(kernel)[grid](*args, **kwargs)
