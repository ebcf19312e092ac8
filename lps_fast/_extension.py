"""Defensive loading of the compiled extensions.

A missing or broken binary never breaks ``import lps_fast``: it gives one clear warning (only
where the binary matters on this machine) and the ops fall back to another provider.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch


@dataclass
class ExtensionStatus:
    name: str
    loaded: bool
    error: Optional[str] = None
    path: Optional[str] = None
    module: Optional[ModuleType] = None

    def describe(self) -> dict:
        info = {"loaded": self.loaded, "path": self.path, "error": self.error}
        if self.module is not None:
            info["built_for_torch"] = getattr(self.module, "torch_version", None)
            info["openmp"] = getattr(self.module, "openmp", None)
            info["avx512"] = getattr(self.module, "avx512", None)
            if getattr(self.module, "with_cuda", False):
                info["cuda_runtime"] = self.module.cuda_runtime_version()
        return info


def _disabled() -> bool:
    return os.environ.get("LPS_FAST_NO_EXTENSION", "").strip().lower() in {"1", "true", "yes", "on"}


def _torch_release() -> str:
    return torch.__version__.split("+")[0]


def load(module_name: str, warn_if_missing: bool) -> ExtensionStatus:
    """Import ``lps_fast.<module_name>``; report instead of raising."""
    qualified = f"lps_fast.{module_name}"
    if _disabled():
        return ExtensionStatus(qualified, False, "disabled by LPS_FAST_NO_EXTENSION=1")
    try:
        module = importlib.import_module(qualified)
    except ModuleNotFoundError as exc:
        if exc.name != qualified:
            status = ExtensionStatus(qualified, False, f"{type(exc).__name__}: {exc}")
        else:
            status = ExtensionStatus(qualified, False, "not built")
    except (ImportError, OSError) as exc:
        status = ExtensionStatus(qualified, False, f"{type(exc).__name__}: {exc}")
    else:
        built_for = getattr(module, "torch_version", None)
        if built_for is not None and built_for != _torch_release():
            # Kernels linked against another torch may crash at the first call: do not use them.
            status = ExtensionStatus(
                qualified, False,
                f"built for torch {built_for} but torch {_torch_release()} is running",
                getattr(module, "__file__", None),
            )
        else:
            return ExtensionStatus(qualified, True, None, getattr(module, "__file__", None), module)
    if warn_if_missing or status.error != "not built":
        warnings.warn(
            f"lps_fast: the compiled extension {qualified} is unavailable ({status.error}); "
            "its ops fall back to another backend (see lps_fast.backend_info()). "
            "Rebuild with `make setup` or `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return status
