"""Which implementation runs each op on each device, and the switches that change it.

Providers:

* ``reference`` the pure-PyTorch dense formulas (``lps_fast.reference``), on every device;
* ``cpp``       the compiled CPU kernels (``lps_fast._C``);
* ``cuda``      the compiled CUDA kernels (``lps_fast._C_cuda``);
* ``triton``    the Triton kernels (``lps_fast.kernels``), on CUDA tensors, and on CPU tensors
  when ``TRITON_INTERPRET=1`` was set before ``import lps_fast``.

By default each op runs on the fastest provider available for the device of its input. Forcing a
provider (``LPS_FAST_BACKEND=<name>`` read at import, :func:`set_backend`, or the context manager
:func:`use_backend`) applies to the devices that provider serves; tensors on other devices keep
their default. Forcing a provider that serves the device but lacks the op raises an error rather
than silently running something else.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from . import _ops

PROVIDERS = ("reference", "cpp", "cuda", "triton")

# Default order on CUDA tensors, per op: the measured winner first (see BENCHMARKS.md).
CUDA_PREFERENCE: Dict[str, Tuple[str, ...]] = {
    "permute_nodes": ("cuda", "triton"),
    "permute_edges": ("cuda", "triton"),
    "unpermute_mean": ("cuda", "triton"),
    "unpermute_edges_mean": ("cuda", "triton"),
    "frame_apply": ("cuda", "triton"),
    "frame_unapply_mean": ("cuda", "triton"),
    "sinkhorn_sort": ("triton", "cuda"),
    "permutation_entropy": ("triton", "cuda"),
    "gram_schmidt": ("triton", "cuda"),
}


@dataclass
class Provider:
    name: str
    # Device types served ("*": all); "cpu" for triton only under TRITON_INTERPRET=1.
    devices: Tuple[str, ...]
    # op name -> callable with the public signature (a torch.library op, or a reference function)
    ops: Dict[str, Callable] = field(default_factory=dict)
    # The kernels validate perm values themselves, so the Python check can be skipped.
    checks_perm_values: bool = False
    # Why an op is missing, for backend_info().
    missing_reason: str = ""


class _State:
    forced: Optional[str] = None


state = _State()
providers: Dict[str, Provider] = {}
_resolved: Dict[Tuple[str, str], str] = {}


def _parse_backend(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    value = value.strip().lower()
    if value in ("", "auto", "default"):
        return None
    if value not in PROVIDERS:
        raise ValueError(f"backend must be one of {PROVIDERS} or 'auto', got {value!r}")
    return value


def _backend_from_env() -> Optional[str]:
    try:
        return _parse_backend(os.environ.get("LPS_FAST_BACKEND"))
    except ValueError as exc:
        warnings.warn(f"LPS_FAST_BACKEND ignored: {exc}", RuntimeWarning, stacklevel=2)
        return None


def register_provider(provider: Provider) -> None:
    providers[provider.name] = provider
    _resolved.clear()


def _serves(name: str, device_type: str) -> bool:
    provider = providers.get(name)
    return provider is not None and (device_type in provider.devices or "*" in provider.devices)


def _offers(name: str, op: str, device_type: str) -> bool:
    return _serves(name, device_type) and op in providers[name].ops


def _default_order(op: str, device_type: str) -> Tuple[str, ...]:
    if device_type == "cpu":
        return ("cpp", "reference")
    if device_type == "cuda":
        return CUDA_PREFERENCE.get(op, ()) + ("reference",)
    return ("reference",)


def _default_provider(op: str, device_type: str) -> str:
    key = (op, device_type)
    name = _resolved.get(key)
    if name is None:
        name = next(n for n in _default_order(op, device_type) if _offers(n, op, device_type))
        _resolved[key] = name
    return name


def resolve(op: str, device: torch.device) -> Provider:
    """The provider that runs ``op`` on tensors of ``device`` under the current settings.

    Inside a ``torch.func`` transform (``grad``, ``jacrev``, ...) the default is the reference
    provider: the compiled providers' autograd is registered through ``torch.library``, which
    those transforms refuse (a forced provider is kept, and fails there as it would)."""
    device_type = device.type
    forced = state.forced
    if forced is None and not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return providers["reference"]
    if forced is not None and _serves(forced, device_type):
        if not _offers(forced, op, device_type):
            raise RuntimeError(
                f"backend {forced!r} was forced but does not provide {op} on {device_type} tensors "
                f"({providers[forced].missing_reason or 'not implemented'}); see lps_fast.backend_info()"
            )
        return providers[forced]
    return providers[_default_provider(op, device_type)]


def set_backend(name: Optional[str]) -> None:
    """Force a provider for every op (``None`` or ``'auto'`` restores the defaults)."""
    if name is not None:
        parsed = _parse_backend(name)
        if parsed is not None and parsed not in providers:
            raise ValueError(f"backend {parsed!r} is not available here; see lps_fast.backend_info()")
        name = parsed
    state.forced = name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Run the enclosed code with a forced provider (``'reference'``, ``'cpp'``, ``'cuda'``, ``'triton'``).

    The setting is process-wide (not per thread); it is read when an op is called, and by
    ``torch.compile`` when it traces, which guards on it.
    """
    previous = state.forced
    set_backend(name)
    try:
        yield
    finally:
        state.forced = previous


def initial_forced_backend() -> Optional[str]:
    name = _backend_from_env()
    if name is not None and name not in providers:
        warnings.warn(
            f"LPS_FAST_BACKEND={name} ignored: that backend is not available here "
            f"({_unavailable_reason(name)})",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return name


_unavailable: Dict[str, str] = {}


def mark_unavailable(name: str, reason: str) -> None:
    _unavailable[name] = reason


def _unavailable_reason(name: str) -> str:
    return _unavailable.get(name, "not loaded")


def op_table() -> Dict[str, Dict[str, str]]:
    """``{op: {"cpu": provider, "cuda": provider}}`` under the current settings."""
    table = {}
    for op in _ops.OP_NAMES:
        row = {}
        for device_type in ("cpu", "cuda"):
            try:
                row[device_type] = resolve(op, torch.device(device_type)).name
            except RuntimeError as exc:
                row[device_type] = f"error: {exc}"
        table[op] = row
    return table


def unavailable_providers() -> Dict[str, str]:
    return dict(_unavailable)
