"""Shared test helpers: random inputs, tolerances and a comparison that explains itself."""

from __future__ import annotations

from typing import Optional

import torch

# Per-dtype (atol, rtol) for reductions; gathers are compared exactly.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def tolerance(dtype: torch.dtype):
    return TOLERANCES[dtype]


def random_perm(batch: int, k: int, n: int, generator: Optional[torch.Generator] = None, device="cpu"):
    """(B, k, n) int64, every row a uniformly random permutation."""
    keys = torch.rand(batch, k, n, generator=generator)
    return torch.argsort(keys, dim=-1).to(device)


def random_soft(batch: int, k: int, n: int, dtype=torch.float32, device="cpu"):
    """A positive (B, k, n, n) matrix standing in for a Sinkhorn output."""
    return torch.rand(batch, k, n, n, dtype=dtype, device=device).softmax(dim=-1)


def assert_close(actual, expected, *, dtype=None, exact=False, atol=None, rtol=None, name="output"):
    """torch.testing.assert_close with per-dtype defaults and a report of where values differ."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if exact:
        atol, rtol = 0.0, 0.0
    elif atol is None or rtol is None:
        d_atol, d_rtol = tolerance(dtype or expected.dtype)
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
    a = actual.detach().to(torch.float64) if actual.is_floating_point() else actual.detach()
    e = expected.detach().to(torch.float64) if expected.is_floating_point() else expected.detach()
    if a.is_floating_point():
        bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    else:
        bad = a != e
    if bool(bad.any()):
        count = int(bad.sum())
        first = [tuple(int(i) for i in idx) for idx in bad.nonzero()[:5]]
        diff = (a - e).abs() if a.is_floating_point() else (a != e).to(torch.int64)
        worst = diff.nan_to_num(float("inf")).max()
        samples = ", ".join(f"{idx}: {a[idx].item()} vs {e[idx].item()}" for idx in first)
        raise AssertionError(
            f"{name}: {count} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"largest difference {float(worst):.3g}; first at {samples}"
        )


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A NaN-filled (or extreme-valued) tensor: output memory nobody wrote cannot pass."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, torch.iinfo(t.dtype).min if t.dtype != torch.bool else True)


def ids(**params) -> str:
    return "-".join(f"{k}{v}" for k, v in params.items())
