"""Benchmark the distribution-side ops: sinkhorn_sort (soft sort + 20 log-domain Sinkhorn
iterations, tau = 0.1) and permutation_entropy.

Inputs: scores (B, k, n) for sinkhorn_sort, gradients flowing through every iteration to the
scores; a positive (B, k, n, n) matrix for permutation_entropy. The ``masked`` variants pad the
graphs (sizes uniform in [n/4, n]), as PATTERN batches are. The memory columns are the point of
this family: the reference keeps 2 * n_iter dense (n x n) intermediates for its backward pass.

    python benchmarks/bench_sinkhorn.py
    python benchmarks/bench_sinkhorn.py --scales pattern --cases sinkhorn_sort --modes full
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

FAMILY = "sinkhorn"
TAU = 0.1
N_ITER = 20
# masked variants where graphs of one batch differ in size (PATTERN: 44 to 188 nodes)
MASKED_SCALES = ("PATTERN", "quick")


def build_cases(scales: List[Scale], device: torch.device, dtype: torch.dtype) -> List[Case]:
    sum_atol, sum_rtol = rand.tolerance(dtype, "sum")
    dot_atol, dot_rtol = rand.tolerance(dtype, "dot")
    # The kernel iterates on dual potentials, the reference on the whole matrix: after 20
    # iterations both carry ~1e-5 relative rounding in float32, ~10x more in the gradient.
    sinkhorn_tol = dict(atol=sum_atol, rtol=10 * sum_rtol, grad_atol=dot_atol, grad_rtol=10 * dot_rtol)
    entropy_tol = dict(atol=dot_atol, rtol=dot_rtol, grad_atol=dot_atol, grad_rtol=dot_rtol)
    cases = []
    for s in scales:
        B, k, n = s.B, s.k, s.n

        def sinkhorn(masked, s=s):
            def build(device, dtype, g):
                scores = rand.randn((s.B, s.k, s.n), g, device, dtype)
                mask = rand.mask(s.B, s.n, g, device) if masked else None
                return Inputs((scores, TAU, N_ITER, mask), (0,))
            return build

        def entropy(masked, s=s):
            def build(device, dtype, g):
                soft = rand.soft(s.B, s.k, s.n, g, device, dtype)
                mask = rand.mask(s.B, s.n, g, device) if masked else None
                return Inputs((soft, mask), (0,))
            return build

        shape = f"B={B} k={k} n={n}"
        entropy_bytes = lambda inp, size, B=B, k=k, n=n: B * k * n * n * size  # noqa: E731
        variants = [(False, "")] + ([(True, "masked")] if s.name in MASKED_SCALES else [])
        for masked, variant in variants:
            cases.append(Case(FAMILY, "sinkhorn_sort", variant, s, sinkhorn(masked), f"{shape} tau={TAU} n_iter={N_ITER}",
                              None, output_index=0, **sinkhorn_tol))
        for masked, variant in variants:
            cases.append(Case(FAMILY, "permutation_entropy", variant, s, entropy(masked), shape, entropy_bytes,
                              **entropy_tol))
    return cases


def main(argv: Optional[Sequence[str]] = None):
    return harness.main(FAMILY, __doc__.splitlines()[0], build_cases, argv)


if __name__ == "__main__":
    sys.exit(harness.exit_status(main()))
