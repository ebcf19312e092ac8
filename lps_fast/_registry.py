"""Wires the providers together at import time and reports on them (``backend_info``)."""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Dict, Optional

import torch

from . import _backend, _extension, _ops
from .reference.frame import _frame_apply, _frame_unapply_mean
from .reference.gram_schmidt import _gram_schmidt
from .reference.permute import _permute_edges, _permute_nodes, _unpermute_edges_mean, _unpermute_mean
from .reference.sinkhorn import _permutation_entropy, _sinkhorn_sort

# The reference path without its input checks: the public ops have run them already.
REFERENCE_OPS = {
    "permute_nodes": _permute_nodes,
    "permute_edges": _permute_edges,
    "unpermute_mean": _unpermute_mean,
    "unpermute_edges_mean": _unpermute_edges_mean,
    "frame_apply": _frame_apply,
    "frame_unapply_mean": _frame_unapply_mean,
    "sinkhorn_sort": _sinkhorn_sort,
    "permutation_entropy": _permutation_entropy,
    "gram_schmidt": _gram_schmidt,
}

extensions: Dict[str, _extension.ExtensionStatus] = {}
triton_status: Dict[str, object] = {"available": False, "version": None, "interpret": False, "error": None}


def _has_kernel(name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(_ops.qualified(name), dispatch_key)


def _compiled_ops(dispatch_key: str) -> Dict[str, object]:
    """Public ops whose whole family (forward and backward kernels) is registered for the key."""
    namespace = getattr(torch.ops, _ops.NAMESPACE)
    return {
        name: getattr(namespace, name)
        for name in _ops.OP_NAMES
        if all(_has_kernel(member, dispatch_key) for member in _ops.FAMILIES[name])
    }


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() in {"1", "true", "True"}


def _load_triton() -> Optional[_backend.Provider]:
    if os.environ.get("LPS_FAST_NO_TRITON", "").strip() in {"1", "true", "yes"}:
        triton_status["error"] = "disabled by LPS_FAST_NO_TRITON=1"
        return None
    try:
        import triton

        triton_status["version"] = triton.__version__
        kernels = importlib.import_module("lps_fast.kernels")
    except Exception as exc:  # an absent or broken triton must not break import lps_fast
        triton_status["error"] = f"{type(exc).__name__}: {exc}"
        if torch.cuda.is_available():
            warnings.warn(f"lps_fast: Triton kernels unavailable ({triton_status['error']})", RuntimeWarning)
        return None
    interpret = _triton_interpret()
    triton_status.update(available=True, interpret=interpret)
    devices = ("cuda", "cpu") if interpret else ("cuda",)
    return _backend.Provider("triton", devices, dict(kernels.OPS))


def initialize() -> None:
    _ops.define_compiled_ops()
    _backend.register_provider(_backend.Provider("reference", ("*",), dict(REFERENCE_OPS)))

    cpu = _extension.load("_C", warn_if_missing=True)
    extensions["cpu"] = cpu
    if cpu.loaded:
        _backend.register_provider(
            _backend.Provider("cpp", ("cpu",), _compiled_ops("CPU"), checks_perm_values=True)
        )
    else:
        _backend.mark_unavailable("cpp", cpu.error)

    cuda = _extension.load("_C_cuda", warn_if_missing=torch.cuda.is_available())
    extensions["cuda"] = cuda
    if cuda.loaded:
        _backend.register_provider(_backend.Provider("cuda", ("cuda",), _compiled_ops("CUDA")))
    else:
        _backend.mark_unavailable("cuda", cuda.error)
        _ops.register_missing_cuda_kernels(cuda.error)

    triton_provider = _load_triton()
    if triton_provider is not None:
        _backend.register_provider(triton_provider)
    else:
        _backend.mark_unavailable("triton", str(triton_status["error"]))

    _backend.state.forced = _backend.initial_forced_backend()
    # Resolve every default now, so that torch.compile later traces plain dict lookups.
    _backend.op_table()


def backend_info() -> dict:
    """What is built, what loaded, and which provider runs each op on CPU and CUDA tensors."""
    from . import __version__

    return {
        "lps_fast": __version__,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "forced_backend": _backend.state.forced,
        "cpu_extension": extensions["cpu"].describe(),
        "cuda_extension": extensions["cuda"].describe(),
        "triton": dict(triton_status),
        "providers": {
            name: sorted(provider.ops) for name, provider in _backend.providers.items()
        },
        "unavailable": _backend.unavailable_providers(),
        "ops": _backend.op_table(),
    }


def format_backend_info(info: Optional[dict] = None) -> str:
    """A human-readable table of :func:`backend_info`."""
    info = info or backend_info()
    lines = [
        f"lps_fast {info['lps_fast']}  torch {info['torch']}  "
        f"cuda device: {info['cuda_device'] or 'none'}  forced backend: {info['forced_backend'] or 'auto'}",
    ]
    for key, label in (("cpu_extension", "CPU extension"), ("cuda_extension", "CUDA extension")):
        ext = info[key]
        state = "loaded" if ext["loaded"] else f"unavailable ({ext['error']})"
        lines.append(f"{label:15s} {state}")
    triton = info["triton"]
    if triton["available"]:
        state = f"available (triton {triton['version']}{', interpreter' if triton['interpret'] else ''})"
    else:
        state = f"unavailable ({triton['error']})"
    lines.append(f"{'Triton':15s} {state}")
    lines.append("")
    lines.append(f"{'op':22s} {'cpu':10s} {'cuda':10s}")
    for op, row in info["ops"].items():
        lines.append(f"{op:22s} {row['cpu']:10s} {row['cuda']:10s}")
    return "\n".join(lines)
