"""Input validation shared by the reference and the fast paths.

Every public op calls one of the ``check_<op>`` functions first, so bad input fails the same way
on every backend: a ``TypeError`` for a wrong type or dtype, a ``ValueError`` for a wrong shape,
device or value, each naming the argument and what was expected. The checks read shapes only,
except two value checks (every row of ``perm`` is a permutation; ``sinkhorn_sort`` scores are
finite on real nodes), whose policy is set by ``LPS_FAST_CHECK_PERM``. Value checks never run
on meta or fake tensors (shape propagation, tracing), which hold no values:

* ``auto`` (default): check perm values in Python on CPU tensors when the backend does not check
  them itself (the C++ kernels validate perm inside the kernel at no extra pass); never on GPU
  tensors, where a check would force a host-device synchronisation;
* ``always``: check on every device (synchronises on GPU; for debugging);
* ``never``: skip the Python check (the C++ kernels still refuse out-of-range indices).

Trusted inputs: ``set_validation(False)``, the context manager ``validation(False)`` or the
environment variable ``LPS_FAST_VALIDATE=0`` turn the per-call checks of the permutation and
frame ops off: no value check at all, and no Python shape checks where the kernel checks its
arguments itself (the compiled C++ ops, whose errors are then the kernel's). Validation is on by
default. The model's group transforms run their ops this way, since their permutations and
rotations come from the distribution and their inputs were checked once by the group.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

_PERM_POLICIES = ("auto", "always", "never")


def _perm_policy_from_env() -> str:
    value = os.environ.get("LPS_FAST_CHECK_PERM", "auto").strip().lower() or "auto"
    if value not in _PERM_POLICIES:
        import warnings

        warnings.warn(
            f"LPS_FAST_CHECK_PERM={value!r} is not one of {_PERM_POLICIES}; using 'auto'",
            stacklevel=2,
        )
        value = "auto"
    return value


def _validation_from_env() -> bool:
    return os.environ.get("LPS_FAST_VALIDATE", "1").strip().lower() not in ("0", "false", "no", "off")


class _CheckConfig:
    perm_policy: str = _perm_policy_from_env()
    validate: bool = _validation_from_env()


config = _CheckConfig()


def set_perm_check(policy: str) -> None:
    """Set the permutation-value check policy: 'auto', 'always' or 'never'."""
    if policy not in _PERM_POLICIES:
        raise ValueError(f"policy must be one of {_PERM_POLICIES}, got {policy!r}")
    config.perm_policy = policy


def set_validation(enabled: bool) -> None:
    """Turn the per-call input checks of the permutation and frame ops on (default) or off."""
    config.validate = bool(enabled)


class validation:
    """``with lps_fast.validation(False): ...`` runs the block without the per-call checks (see
    the module docstring) and restores the previous setting on exit."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        self.previous = config.validate

    def __enter__(self) -> "validation":
        self.previous, config.validate = config.validate, self.enabled
        return self

    def __exit__(self, *exc) -> None:
        config.validate = self.previous


def checks_skipped(kernel_checks_arguments: bool) -> bool:
    """Whether a public op may skip its Python checks: validation is off and the kernel checks
    shapes and values itself."""
    return kernel_checks_arguments and not config.validate


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _require_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def device_of(value, name: str) -> torch.device:
    """The device of a tensor argument (a TypeError naming it if it is not a tensor)."""
    return _require_tensor(value, name).device


def _require_floating(t: torch.Tensor, name: str, why: str = "") -> None:
    if not t.is_floating_point():
        reason = f" ({why})" if why else ""
        raise TypeError(f"{name} must be a floating-point tensor{reason}, got dtype {t.dtype}")


def _require_ndim(t: torch.Tensor, name: str, expected: str, ndim: int, at_least: bool = False) -> None:
    if (t.dim() < ndim) if at_least else (t.dim() != ndim):
        raise ValueError(f"{name} must have shape {expected}, got {_shape(t)}")


def _require_same_device(reference: torch.Tensor, ref_name: str, t: torch.Tensor, name: str) -> None:
    if t.device != reference.device:
        raise ValueError(
            f"{name} is on {t.device} but {ref_name} is on {reference.device}; "
            "all tensors of one call must be on the same device"
        )


def _require_same_dtype(reference: torch.Tensor, ref_name: str, t: torch.Tensor, name: str) -> None:
    if t.dtype != reference.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({reference.dtype}), got {t.dtype}")


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def check_perm(
    perm,
    name: str,
    like: torch.Tensor,
    like_name: str,
    batch: int,
    n: int,
    k: Optional[int] = None,
    expected: str = "(B, k, n)",
    values_checked_by_kernel: bool = False,
) -> int:
    """Check a (B, k, n) int64 permutation tensor; returns k."""
    perm = _require_tensor(perm, name)
    if perm.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 (torch.long) index tensor, got dtype {perm.dtype}")
    _require_ndim(perm, name, f"{expected} = ({batch}, k, {n})", 3)
    _require_same_device(like, like_name, perm, name)
    if perm.shape[0] != batch or perm.shape[2] != n or (k is not None and perm.shape[1] != k):
        k_text = "k" if k is None else str(k)
        raise ValueError(
            f"{name} must have shape {expected} = ({batch}, {k_text}, {n}) to match {like_name} "
            f"{_shape(like)}, got {_shape(perm)}"
        )
    if _should_check_values(perm, values_checked_by_kernel):
        check_perm_values(perm, name)
    return perm.shape[1]


def _has_values(t: torch.Tensor) -> bool:
    """False for meta and fake tensors (shape propagation, tracing): they hold no values to read."""
    if t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def _should_check_values(perm: torch.Tensor, values_checked_by_kernel: bool) -> bool:
    policy = config.perm_policy
    if policy == "never" or not config.validate or perm.numel() == 0 or _is_compiling() or not _has_values(perm):
        return False
    if policy == "always":
        return True
    return perm.device.type == "cpu" and not values_checked_by_kernel


def check_perm_values(perm: torch.Tensor, name: str = "perm") -> None:
    """Raise ValueError unless every row perm[b, j, :] is a permutation of 0..n-1."""
    n = perm.shape[-1]
    ordered = torch.sort(perm, dim=-1).values
    expected = torch.arange(n, device=perm.device, dtype=perm.dtype)
    bad_rows = (ordered != expected).any(dim=-1)
    if bool(bad_rows.any()):
        b, j = (int(v) for v in bad_rows.nonzero()[0])
        row = perm[b, j].tolist()
        shown = row if len(row) <= 12 else row[:12] + ["..."]
        raise ValueError(
            f"{name} must hold a permutation of 0..{n - 1} in every row; "
            f"{name}[{b}, {j}] = {shown} is not one"
        )


def check_soft(soft, like: torch.Tensor, like_name: str, batch: int, k: int, n: int) -> None:
    if soft is None:
        return
    soft = _require_tensor(soft, "soft")
    _require_floating(soft, "soft")
    _require_same_device(like, like_name, soft, "soft")
    if tuple(soft.shape) != (batch, k, n, n):
        raise ValueError(f"soft must have shape (B, k, n, n) = ({batch}, {k}, {n}, {n}), got {_shape(soft)}")


def _check_soft_source(x: torch.Tensor, name: str, soft) -> None:
    if soft is not None and not x.is_floating_point():
        raise TypeError(
            f"{name} must be floating-point when soft is given (the straight-through gradient "
            f"is a product with {name}), got dtype {x.dtype}"
        )


# --------------------------------------------------------------------------------------------
# Permutation ops


def check_permute_nodes(x, perm, soft=None, *, values_checked_by_kernel: bool = False) -> int:
    x = _require_tensor(x, "x")
    _require_ndim(x, "x", "(B, n, *F)", 2, at_least=True)
    _check_soft_source(x, "x", soft)
    batch, n = x.shape[0], x.shape[1]
    k = check_perm(perm, "perm", x, "x", batch, n, values_checked_by_kernel=values_checked_by_kernel)
    check_soft(soft, x, "x", batch, k, n)
    return k


def check_permute_edges(e, perm, soft=None, *, values_checked_by_kernel: bool = False) -> int:
    e = _require_tensor(e, "e")
    _require_ndim(e, "e", "(B, n, n, *F)", 3, at_least=True)
    if e.shape[1] != e.shape[2]:
        raise ValueError(f"e must have shape (B, n, n, *F) with two equal node dims, got {_shape(e)}")
    _check_soft_source(e, "e", soft)
    batch, n = e.shape[0], e.shape[1]
    k = check_perm(perm, "perm", e, "e", batch, n, values_checked_by_kernel=values_checked_by_kernel)
    check_soft(soft, e, "e", batch, k, n)
    return k


def _check_sample_count(k: int, name: str) -> None:
    if k < 1:
        raise ValueError(f"{name} must hold at least one sample (k >= 1) to average over, got k = {k}")


def check_unpermute_mean(y, perm, soft=None, *, values_checked_by_kernel: bool = False) -> int:
    y = _require_tensor(y, "y")
    _require_ndim(y, "y", "(B, k, n, *F)", 3, at_least=True)
    _require_floating(y, "y", "it is averaged over samples")
    batch, k, n = y.shape[0], y.shape[1], y.shape[2]
    _check_sample_count(k, "y")
    check_perm(perm, "perm", y, "y", batch, n, k=k, values_checked_by_kernel=values_checked_by_kernel)
    check_soft(soft, y, "y", batch, k, n)
    return k


def check_unpermute_edges_mean(y, perm, soft=None, diagonal=False, *, values_checked_by_kernel: bool = False) -> int:
    y = _require_tensor(y, "y")
    _require_ndim(y, "y", "(B, k, n, n, *F)", 4, at_least=True)
    if y.shape[2] != y.shape[3]:
        raise ValueError(f"y must have shape (B, k, n, n, *F) with two equal node dims, got {_shape(y)}")
    _require_floating(y, "y", "it is averaged over samples")
    if not isinstance(diagonal, bool):
        raise TypeError(f"diagonal must be a bool, got {type(diagonal).__name__}")
    batch, k, n = y.shape[0], y.shape[1], y.shape[2]
    _check_sample_count(k, "y")
    check_perm(perm, "perm", y, "y", batch, n, k=k, values_checked_by_kernel=values_checked_by_kernel)
    check_soft(soft, y, "y", batch, k, n)
    return k


# --------------------------------------------------------------------------------------------
# Frame ops


def _check_rotation(R, like: torch.Tensor, like_name: str, batch: int, k: Optional[int]) -> int:
    R = _require_tensor(R, "R")
    _require_floating(R, "R")
    _require_same_device(like, like_name, R, "R")
    _require_same_dtype(like, like_name, R, "R")
    k_text = "k" if k is None else str(k)
    if R.dim() != 4 or R.shape[0] != batch or R.shape[2:] != (3, 3) or (k is not None and R.shape[1] != k):
        raise ValueError(f"R must have shape (B, k, 3, 3) = ({batch}, {k_text}, 3, 3), got {_shape(R)}")
    return R.shape[1]


def _check_center(center, like: torch.Tensor, like_name: str, batch: int, channels: int) -> None:
    if center is None:
        return
    center = _require_tensor(center, "center")
    _require_floating(center, "center")
    _require_same_device(like, like_name, center, "center")
    _require_same_dtype(like, like_name, center, "center")
    if tuple(center.shape) != (batch, 3, channels):
        raise ValueError(f"center must have shape (B, 3, C) = ({batch}, 3, {channels}), got {_shape(center)}")


def _check_frame_perm(perm, soft, like, like_name, batch, k, n, values_checked_by_kernel):
    if perm is None:
        if soft is not None:
            raise ValueError("soft was given without perm: the straight-through gradient needs the hard perm")
        return
    check_perm(perm, "perm", like, like_name, batch, n, k=k, values_checked_by_kernel=values_checked_by_kernel)
    check_soft(soft, like, like_name, batch, k, n)


def check_frame_apply(x, R, perm=None, center=None, soft=None, *, values_checked_by_kernel: bool = False) -> int:
    x = _require_tensor(x, "x")
    _require_floating(x, "x", "it is rotated")
    if x.dim() != 4 or x.shape[2] != 3:
        raise ValueError(f"x must have shape (B, n, 3, C), got {_shape(x)}")
    batch, n, channels = x.shape[0], x.shape[1], x.shape[3]
    k = _check_rotation(R, x, "x", batch, None)
    _check_center(center, x, "x", batch, channels)
    _check_frame_perm(perm, soft, x, "x", batch, k, n, values_checked_by_kernel)
    return k


def check_frame_unapply_mean(y, R, perm=None, center=None, soft=None, *, values_checked_by_kernel: bool = False) -> int:
    y = _require_tensor(y, "y")
    _require_floating(y, "y", "it is rotated and averaged")
    if y.dim() != 5 or y.shape[3] != 3:
        raise ValueError(f"y must have shape (B, k, n, 3, C), got {_shape(y)}")
    batch, k, n, channels = y.shape[0], y.shape[1], y.shape[2], y.shape[4]
    _check_sample_count(k, "y")
    _check_rotation(R, y, "y", batch, k)
    _check_center(center, y, "y", batch, channels)
    _check_frame_perm(perm, soft, y, "y", batch, k, n, values_checked_by_kernel)
    return k


# --------------------------------------------------------------------------------------------
# Distribution-side ops


def check_mask(mask, like: torch.Tensor, like_name: str, batch: int, n: int) -> None:
    if mask is None:
        return
    mask = _require_tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = real node), got dtype {mask.dtype}")
    _require_same_device(like, like_name, mask, "mask")
    if tuple(mask.shape) != (batch, n):
        raise ValueError(f"mask must have shape (B, n) = ({batch}, {n}), got {_shape(mask)}")


def check_sinkhorn_sort(scores, tau, n_iter=20, mask=None) -> None:
    scores = _require_tensor(scores, "scores")
    _require_floating(scores, "scores")
    _require_ndim(scores, "scores", "(B, k, n)", 3)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a Python float, got {type(tau).__name__}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite positive temperature, got {tau}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int):
        raise TypeError(f"n_iter must be an int, got {type(n_iter).__name__}")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    check_mask(mask, scores, "scores", scores.shape[0], scores.shape[2])
    if _should_check_values(scores, values_checked_by_kernel=False):
        check_scores_finite(scores, mask)


def check_scores_finite(scores: torch.Tensor, mask=None) -> None:
    """Raise ValueError if a real node's score is NaN or infinite: it has no place in a sort
    (the normalization would turn its whole row into NaN). Padded nodes' scores are ignored."""
    finite = torch.isfinite(scores)
    if mask is not None:
        finite = finite | ~mask[:, None, :]
    if not bool(finite.all()):
        b, j, i = (int(v) for v in (~finite).nonzero()[0])
        raise ValueError(
            f"scores must be finite on real nodes; scores[{b}, {j}, {i}] = {float(scores[b, j, i])} "
            f"({int((~finite).sum())} non-finite entries): check the network that produced them"
        )


def check_permutation_entropy(soft, mask=None) -> None:
    soft = _require_tensor(soft, "soft")
    _require_floating(soft, "soft")
    if soft.dim() != 4 or soft.shape[2] != soft.shape[3]:
        raise ValueError(f"soft must have shape (B, k, n, n), got {_shape(soft)}")
    check_mask(mask, soft, "soft", soft.shape[0], soft.shape[2])


def check_gram_schmidt(V, proper=False) -> None:
    V = _require_tensor(V, "V")
    _require_floating(V, "V")
    if V.dim() < 2 or V.shape[-2:] != (3, 3):
        raise ValueError(f"V must have shape (..., 3, 3), got {_shape(V)}")
    if not isinstance(proper, bool):
        raise TypeError(f"proper must be a bool, got {type(proper).__name__}")
