"""Benchmark the frame family: frame_apply and frame_unapply_mean, with a permutation and a
center (S_n x E(3), as for n-body particles) and with a center only (E(3) frame averaging).

Feature sizes: points carry the scale's C 3-vector channels per node (n-body: positions and
velocities, C = 2; PATTERN 4, EXP 1, large 4), rotations are (B, k, 3, 3), centers (B, 3, C).
Gradients flow to the points, the rotations and the center.

    python benchmarks/bench_frame.py
    python benchmarks/bench_frame.py --scales nbody --modes full
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

FAMILY = "frame"


def build_cases(scales: List[Scale], device: torch.device, dtype: torch.dtype) -> List[Case]:
    sum_atol, sum_rtol = rand.tolerance(dtype, "sum")
    dot_atol, dot_rtol = rand.tolerance(dtype, "dot")
    # forward: 3-term rotations; gradients to R and center sum over n and C (and k)
    tol = dict(atol=sum_atol, rtol=sum_rtol, grad_atol=dot_atol, grad_rtol=dot_rtol)
    cases = []
    for s in scales:
        B, k, n, C = s.B, s.k, s.n, s.C

        def make(points_shape, with_perm, s=s):
            def build(device, dtype, g):
                points = rand.randn(points_shape, g, device, dtype)
                R = rand.rotations(s.B, s.k, g, device, dtype)
                p = rand.perm(s.B, s.k, s.n, g, device) if with_perm else None
                center = rand.randn((s.B, 3, s.C), g, device, dtype)
                return Inputs((points, R, p, center), (0, 1, 3))
            return build

        def moved(in_elems, out_elems, with_perm, B=B, k=k, n=n, C=C):
            # points in, rotations, center, perm, points out
            return lambda inp, size: ((in_elems + out_elems + B * k * 9 + B * 3 * C) * size
                                      + (B * k * n * 8 if with_perm else 0))

        shape = f"B={B} k={k} n={n} C={C}"
        x_shape, y_shape = (B, n, 3, C), (B, k, n, 3, C)
        x_elems, y_elems = B * n * 3 * C, B * k * n * 3 * C
        for with_perm, variant in ((True, "perm+center"), (False, "center")):
            cases += [
                Case(FAMILY, "frame_apply", variant, s, make(x_shape, with_perm), shape,
                     moved(x_elems, y_elems, with_perm), **tol),
                Case(FAMILY, "frame_unapply_mean", variant, s, make(y_shape, with_perm), shape,
                     moved(y_elems, x_elems, with_perm), **tol),
            ]
    return cases


def main(argv: Optional[Sequence[str]] = None):
    return harness.main(FAMILY, __doc__.splitlines()[0], build_cases, argv)


if __name__ == "__main__":
    sys.exit(harness.exit_status(main()))
