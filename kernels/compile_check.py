"""Compile every Triton kernel of lps_fast for NVIDIA targets without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute but accepts code the
real compiler rejects, and never lowers to PTX. This module runs every op's host launcher on
small CPU tensors with the launches recorded instead of executed, then compiles each recorded
launch (its argument types, constexprs and ``num_warps``) with ``triton.compile`` for the given
CUDA architectures, down to a cubin with the ptxas that ships with triton::

    TRITON_INTERPRET=0 python -m lps_fast.kernels.compile_check --arch 80 90

It must run without ``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled). Prints one
line per compiled kernel variant; exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Dict, List, Tuple

import torch

_TRITON_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.int16: "i16",
}


class _Recorder:
    """Stands in for ``torch.library.wrap_triton``: records ``kernel[grid](*args, **kwargs)``."""

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
    recorder = _Recorder()
    original = torch.library.wrap_triton
    torch.library.wrap_triton = recorder
    try:
        yield recorder
    finally:
        torch.library.wrap_triton = original


def _signature(kernel, args, kwargs):
    names = list(kernel.arg_names)
    signature: Dict[str, str] = {}
    constexprs: Dict[str, object] = {}
    options = {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i64" if not -(2**31) <= value < 2**31 else "i32"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type {type(value).__name__}")
    for name, value in kwargs.items():
        if name in ("num_warps", "num_stages"):
            options[name] = value
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    missing = [name for name in names if name not in signature]
    if missing:
        raise TypeError(f"{kernel.__name__}: arguments not given: {missing}")
    return signature, constexprs, options


def _exercise_ops(dtypes):
    """Launch every host launcher once per dtype and option, at shapes that reach each variant."""
    from . import frame, gram_schmidt, permute, sinkhorn

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
    for dtype in (torch.int64, torch.bool):
        permute.permute(torch.zeros(batch, n, n, dtype=dtype), perm, edges=True)
        permute.permute(torch.zeros(batch, n, dtype=dtype), perm, edges=False)


def compile_all(archs=(90,), dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64), verbose=True):
    """Compile every recorded kernel variant for each architecture; returns the failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with recording() as recorder:
        _exercise_ops(dtypes)
    seen = set()
    failures = []
    for kernel, args, kwargs in recorder.launches:
        signature, constexprs, options = _signature(kernel, args, kwargs)
        key = (kernel.__name__,) + tuple(tuple(sorted(d.items())) for d in (signature, constexprs, options))
        if key in seen:
            continue
        seen.add(key)
        for arch in archs:
            start = time.perf_counter()
            try:
                source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
                status = f"ok ({len(compiled.asm['cubin'])} B cubin)"
            except Exception as exc:  # report every failure, not just the first
                failures.append((kernel.__name__, arch, constexprs, exc))
                status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if verbose:
                types = ",".join(v for v in signature.values() if v.startswith("*"))
                print(
                    f"sm_{arch} {kernel.__name__:36s} {types:40s} {constexprs} "
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
