"""Compile every Triton kernel of lps_fast for NVIDIA targets without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute but accepts code the
real compiler rejects, and never lowers to PTX. This module runs every op's host launcher on
small CPU tensors with the launches recorded instead of executed, then compiles each recorded
launch with ``triton.compile`` for the given CUDA architectures, down to a cubin with the ptxas
that ships with triton. Each launch is specialized as triton's launcher would specialize it
(argument types, integers equal to 1 as constexprs, divisibility hints, ``num_warps``), so the
variants compiled here are the ones a GPU run compiles for the same arguments::

    TRITON_INTERPRET=0 python -m lps_fast.kernels.compile_check --arch 80 90

It must run without ``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled). Prints one
line per compiled kernel variant; exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import List, Tuple

import torch

class _Recorder:
    """Stands in for ``wrap_triton`` in the launchers: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self):
        self.launches: List[Tuple[object, tuple, dict]] = []

    def __call__(self, kernel):
        recorder = self

        class _Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((kernel, args, kwargs))

                return launch

        return _Launch()


@contextlib.contextmanager
def recording():
    from . import _launch

    recorder = _Recorder()
    original = _launch._wrap
    _launch._wrap = recorder
    try:
        yield recorder
    finally:
        _launch._wrap = original


def specialize(kernel, args, kwargs, backend):
    """``(signature, constexprs, attrs, options)`` of a launch, as triton's own launcher derives
    them: integer arguments equal to 1 become constexprs, and integers and pointers divisible by
    16 carry the divisibility hint. Each distinct result is a separately compiled variant."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _exercise_ops(dtypes):
    """Launch every host launcher once per dtype and option, at shapes that reach each variant."""
    from . import frame, gram_schmidt, permute, sinkhorn, vn_layer

    batch, k, n = 2, 3, 5
    perm = torch.stack([torch.randperm(n) for _ in range(batch * k)]).view(batch, k, n)
    mask = torch.ones(batch, n, dtype=torch.bool)
    for dtype in dtypes:
        x = torch.zeros(batch, n, 4, dtype=dtype)
        e = torch.zeros(batch, n, n, 2, dtype=dtype)
        permute.permute(x, perm, edges=False)
        permute.permute(e, perm, edges=True)
        permute.unpermute_mean(torch.zeros(batch, k, n, 4, dtype=dtype), perm, edges=False)
        y_edges = torch.zeros(batch, k, n, n, 2, dtype=dtype)
        permute.unpermute_mean(y_edges, perm, edges=True)
        permute.unpermute_mean(y_edges, perm, edges=True, diagonal=True)
        points = torch.zeros(batch, n, 3, 2, dtype=dtype)
        y_points = torch.zeros(batch, k, n, 3, 2, dtype=dtype)
        R = torch.zeros(batch, k, 3, 3, dtype=dtype)
        center = torch.zeros(batch, 3, 2, dtype=dtype)
        for p, c in ((None, None), (perm, center)):
            frame.frame_apply(points, R, p, c)
            frame.frame_unapply_mean(y_points, R, p, c)
        for proper in (False, True):
            gram_schmidt.gram_schmidt(R, proper)
            gram_schmidt.gram_schmidt_backward(R, R, proper)
        scores = torch.zeros(batch, k, n, dtype=dtype)
        for m in (None, mask):
            sinkhorn.sinkhorn_sort(scores, 0.3, 3, m)
            sinkhorn.sinkhorn_sort_backward(torch.zeros(batch, k, n, n, dtype=dtype), scores, 0.3, 3, m)
            soft = torch.zeros(batch, k, n, n, dtype=dtype)
            sinkhorn.permutation_entropy(soft, m)
            sinkhorn.permutation_entropy_backward(torch.ones((), dtype=dtype), soft, m)
        if dtype in (torch.float32, torch.float64):  # vn_layer serves these two
            _exercise_vn_layer(vn_layer, batch, n, dtype, mask)
    for dtype in (torch.int64, torch.bool):
        permute.permute(torch.zeros(batch, n, n, dtype=dtype), perm, edges=True)
        permute.permute(torch.zeros(batch, n, dtype=dtype), perm, edges=False)


def _exercise_vn_layer(vn_layer, batch, n, dtype, mask, K=3, C=5):
    """Both layer kinds (edge convolution, per-node), training and eval, per-channel and shared
    directions, with and without a mask: every constexpr combination the network uses."""
    p = torch.zeros(batch, n, 3, C, dtype=dtype)
    neighbours = torch.zeros(batch, n, K, dtype=torch.int64)
    pool = torch.zeros(C, C, dtype=dtype)
    weight, bias = torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype)
    running = (torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype))
    for edges in (True, False):
        for shared in (False, True):
            d = torch.zeros(batch, n, 3, 1 if shared else C, dtype=dtype)
            centres = (p, d) if edges else (None, None)
            for m in (None, mask):
                for stats in ((None, None), running):
                    args = (p, d, *centres, neighbours if edges else None, pool if edges else None, m, weight, bias)
                    out, selected, moments = vn_layer.vn_layer(*args, *stats, 1e-5, 0.2)
                    vn_layer.vn_layer_backward(out, p, d, *centres, neighbours if edges else None, selected, m,
                                               weight, bias, moments, stats[0] is None, 1e-5, 0.2)


def compile_all(archs=(90,), dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64), verbose=True):
    """Compile every recorded kernel variant for each architecture; returns the failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    with recording() as recorder:
        _exercise_ops(dtypes)
    seen = set()
    failures = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        for kernel, args, kwargs in recorder.launches:
            signature, constexprs, attrs, options = specialize(kernel, args, kwargs, backend)
            key = (arch, kernel.__name__, repr(signature), repr(constexprs), repr(attrs), repr(options))
            if key in seen:
                continue
            seen.add(key)
            start = time.perf_counter()
            try:
                source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(source, target=target, options=options.__dict__)
                status = f"ok ({len(compiled.asm['cubin'])} B cubin)"
            except Exception as exc:  # report every failure, not just the first
                failures.append((kernel.__name__, arch, constexprs, exc))
                status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if verbose:
                types = ",".join(v for v in signature.values() if v.startswith("*"))
                named = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
                print(
                    f"sm_{arch} {kernel.__name__:36s} {types:40s} {named} hints={sum(1 for hint in attrs.values() if hint)} "
                    f"{time.perf_counter() - start:5.1f}s {status}",
                    flush=True,
                )
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--quick", action="store_true", help="float32 and bfloat16 only")
    args = parser.parse_args(argv)
    from lps_fast._registry import _triton_interpret

    if _triton_interpret():
        print("compile_check needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
        return 2
    dtypes = (torch.float32, torch.bfloat16)
    if not args.quick:
        dtypes += (torch.float16, torch.float64)
    failures = compile_all(tuple(args.arch), dtypes)
    for name, arch, constexprs, exc in failures:
        print(f"\n--- {name} sm_{arch} {constexprs}\n{exc}", file=sys.stderr)
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
