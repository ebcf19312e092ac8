"""Benchmark the permutation family: permute_nodes, permute_edges (with and without soft),
unpermute_mean, unpermute_edges_mean (full and diagonal).

Feature sizes: node-level ops use F = 64 features per node (a backbone width); edge-level ops use
the scale's C edge channels (PATTERN 4, EXP 1, n-body 2, large 4). ``soft`` variants pass a
(B, k, n, n) soft permutation that requires grad (the straight-through gradient of a learned
distribution).

    python benchmarks/bench_permute.py                      # every case, provider, mode and scale
    python benchmarks/bench_permute.py --scales pattern --cases permute_edges --modes fwd
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

FAMILY = "permute"


def build_cases(scales: List[Scale], device: torch.device, dtype: torch.dtype) -> List[Case]:
    sum_atol, sum_rtol = rand.tolerance(dtype, "sum")
    dot_atol, dot_rtol = rand.tolerance(dtype, "dot")
    cases = []
    for s in scales:
        B, k, n, C, F = s.B, s.k, s.n, s.C, s.F

        def nodes(with_soft, s=s):
            def make(device, dtype, g):
                x = rand.randn((s.B, s.n, s.F), g, device, dtype)
                p = rand.perm(s.B, s.k, s.n, g, device)
                if with_soft:
                    return Inputs((x, p, rand.soft(s.B, s.k, s.n, g, device, dtype)), (0, 2))
                return Inputs((x, p), (0,))
            return make

        def edges(with_soft, s=s):
            def make(device, dtype, g):
                e = rand.randn((s.B, s.n, s.n, s.C), g, device, dtype)
                p = rand.perm(s.B, s.k, s.n, g, device)
                if with_soft:
                    return Inputs((e, p, rand.soft(s.B, s.k, s.n, g, device, dtype)), (0, 2))
                return Inputs((e, p), (0,))
            return make

        def node_outputs(with_soft, s=s):
            def make(device, dtype, g):
                y = rand.randn((s.B, s.k, s.n, s.F), g, device, dtype)
                p = rand.perm(s.B, s.k, s.n, g, device)
                if with_soft:
                    return Inputs((y, p, rand.soft(s.B, s.k, s.n, g, device, dtype)), (0, 2))
                return Inputs((y, p), (0,))
            return make

        def edge_outputs(diagonal, s=s):
            def make(device, dtype, g):
                y = rand.randn((s.B, s.k, s.n, s.n, s.C), g, device, dtype)
                p = rand.perm(s.B, s.k, s.n, g, device)
                return Inputs((y, p, None, diagonal), (0,))
            return make

        def gather_bytes(source_elems, out_elems, k=k, B=B, n=n):
            # read the source once, the perm, write the output
            return lambda inp, size: (source_elems + out_elems) * size + B * k * n * 8

        # gathers are exact forward; the gradient to x is a sum over k samples, the one to soft
        # a long dot product
        tol = dict(atol=sum_atol, rtol=sum_rtol, grad_atol=sum_atol, grad_rtol=sum_rtol)
        dot = dict(tol, grad_atol=dot_atol, grad_rtol=dot_rtol)
        node_shape = f"B={B} k={k} n={n} F={F}"
        edge_shape = f"B={B} k={k} n={n} C={C}"
        cases += [
            Case(FAMILY, "permute_nodes", "", s, nodes(False), node_shape,
                 gather_bytes(B * n * F, B * k * n * F), exact_forward=True, **tol),
            Case(FAMILY, "permute_nodes", "soft", s, nodes(True), node_shape,
                 gather_bytes(B * n * F, B * k * n * F), exact_forward=True, **dot),
            Case(FAMILY, "permute_edges", "", s, edges(False), edge_shape,
                 gather_bytes(B * n * n * C, B * k * n * n * C), exact_forward=True, **tol),
            Case(FAMILY, "permute_edges", "soft", s, edges(True), edge_shape,
                 gather_bytes(B * n * n * C, B * k * n * n * C), exact_forward=True, **dot),
            Case(FAMILY, "unpermute_mean", "", s, node_outputs(False), node_shape,
                 gather_bytes(B * k * n * F, B * n * F), **tol),
            Case(FAMILY, "unpermute_mean", "soft", s, node_outputs(True), node_shape,
                 gather_bytes(B * k * n * F, B * n * F), **dot),
            Case(FAMILY, "unpermute_edges_mean", "full", s, edge_outputs(False), edge_shape,
                 gather_bytes(B * k * n * n * C, B * n * n * C), **tol),
            # the diagonal needs only y[j, r, r]: B k n C elements read
            Case(FAMILY, "unpermute_edges_mean", "diagonal", s, edge_outputs(True), edge_shape,
                 gather_bytes(B * k * n * C, B * n * C), **tol),
        ]
    return cases


def main(argv: Optional[Sequence[str]] = None):
    return harness.main(FAMILY, __doc__.splitlines()[0], build_cases, argv)


if __name__ == "__main__":
    sys.exit(harness.exit_status(main()))
