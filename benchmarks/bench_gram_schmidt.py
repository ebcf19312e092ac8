"""Benchmark gram_schmidt: three equivariant vectors per sample -> an O(3) frame, and the SO(3)
variant (``proper=True``, column 0 times det).

Inputs: V (B, k, 3, 3), one frame per (graph, sample), Gaussian with cond(V) <= 30 as in the
tests (the gradient amplifies float32 rounding by about cond^2). PATTERN has 32 frames, EXP 320,
n-body 2,000; the large case has 65,536 (B = 4096, k = 16), since the B k = 256 of the other
families' large case would only measure call overhead.

    python benchmarks/bench_gram_schmidt.py
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

import torch

try:
    from . import harness, inputs as rand
except ImportError:  # run as a script
    import harness
    import inputs as rand

Case, Inputs, Scale = harness.Case, harness.Inputs, harness.Scale

FAMILY = "gram_schmidt"
LARGE_FRAMES = (4096, 16)


def build_cases(scales: List[Scale], device: torch.device, dtype: torch.dtype) -> List[Case]:
    sum_atol, sum_rtol = rand.tolerance(dtype, "sum")
    dot_atol, dot_rtol = rand.tolerance(dtype, "dot")
    tol = dict(atol=sum_atol, rtol=sum_rtol, grad_atol=dot_atol, grad_rtol=dot_rtol)
    cases = []
    for s in scales:
        B, k = LARGE_FRAMES if s.name == "large" else (s.B, s.k)

        def make(proper, B=B, k=k):
            def build(device, dtype, g):
                return Inputs((rand.frames(B, k, g, device, dtype), proper), (0,))
            return build

        moved = lambda inp, size, B=B, k=k: 2 * B * k * 9 * size  # noqa: E731
        shape = f"B={B} k={k} ({B * k} frames)"
        cases += [
            Case(FAMILY, "gram_schmidt", "", s, make(False), shape, moved, **tol),
            Case(FAMILY, "gram_schmidt", "proper", s, make(True), shape, moved, **tol),
        ]
    return cases


def main(argv: Optional[Sequence[str]] = None):
    return harness.main(FAMILY, __doc__.splitlines()[0], build_cases, argv)


if __name__ == "__main__":
    sys.exit(harness.exit_status(main()))
