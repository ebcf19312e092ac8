"""Seeded random inputs shared by the benchmark scripts (drawn on the CPU, then moved, so every
device sees the same values)."""

from __future__ import annotations

from typing import Tuple

import torch

# (atol, rtol) per dtype: "sum" for reductions over a few terms (scatter-means, rotations),
# "dot" for long dot products (straight-through GEMMs, Sinkhorn's 20 iterations).
TOLERANCES = {
    torch.float64: {"sum": (1e-10, 1e-9), "dot": (1e-8, 1e-7)},
    torch.float32: {"sum": (1e-5, 1e-5), "dot": (1e-4, 1e-4)},
    torch.bfloat16: {"sum": (2e-2, 2e-2), "dot": (1e-1, 5e-2)},
    torch.float16: {"sum": (2e-3, 2e-3), "dot": (2e-2, 1e-2)},
}


def tolerance(dtype: torch.dtype, kind: str) -> Tuple[float, float]:
    return TOLERANCES[dtype][kind]


def randn(shape, generator: torch.Generator, device, dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def perm(batch: int, k: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """(B, k, n) int64, each row a uniformly random permutation."""
    return torch.argsort(torch.rand(batch, k, n, generator=generator), dim=-1).to(device)


def soft(batch: int, k: int, n: int, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """A positive (B, k, n, n) matrix with unit rows, standing in for a Sinkhorn output."""
    return torch.rand(batch, k, n, n, generator=generator).softmax(dim=-1).to(device=device, dtype=dtype)


def rotations(batch: int, k: int, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """(B, k, 3, 3) orthogonal matrices (QR of Gaussian matrices)."""
    q, r = torch.linalg.qr(torch.randn(batch, k, 3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    return q.to(device=device, dtype=dtype)


def mask(batch: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """(B, n) bool, True for real nodes: graph sizes uniform in [n/4, n], padding at the end."""
    low = max(1, n // 4)
    n_real = torch.randint(low, n + 1, (batch,), generator=generator)
    n_real[0] = n
    return (torch.arange(n)[None, :] < n_real[:, None]).to(device)


def frames(batch: int, k: int, generator: torch.Generator, device, dtype, max_cond: float = 30.0) -> torch.Tensor:
    """(B, k, 3, 3) Gaussian vectors away from degeneracy, as the tests draw them: Gram-Schmidt's
    gradient amplifies rounding by about cond(V)^2, so near-singular draws would compare float32
    rounding noise. Draws with cond > max_cond are redrawn as identity + 0.3 * noise."""
    V = torch.randn(batch, k, 3, 3, generator=generator, dtype=torch.float64)
    bad = torch.linalg.cond(V) > max_cond
    while bool(bad.any()):
        count = int(bad.sum())
        V[bad] = torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(count, 3, 3, generator=generator, dtype=torch.float64)
        bad = torch.linalg.cond(V) > max_cond
    return V.to(device=device, dtype=dtype)
