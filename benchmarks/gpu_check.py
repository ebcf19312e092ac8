"""The checks behind ``benchmarks/gpu_check.sh``: one line per check, no dependency beyond torch.

    python benchmarks/gpu_check.py preflight [--require-gpu]
    python benchmarks/gpu_check.py correctness [--device cuda] [--providers cuda,triton] [--quick | --small]
    python benchmarks/gpu_check.py compile [--device cuda] [--providers cuda,triton]
    python benchmarks/gpu_check.py <command> ... --list       (names the checks, runs nothing)

Every line starts with ``PASS``, ``FAIL``, ``SKIP`` or ``INFO``; the exit status is 1 when any
check failed. The fast providers are compared with the reference on the same input values:
forward values and the gradient of every floating input, for one shared upstream gradient,
against the reference run in float64 (gathers must match exactly; integer outputs such as
Sinkhorn's ``perm`` are compared with the reference run in the input dtype, whose rounding
decides ties). Each case also runs twice and must give bit-identical results. After every op
the device is synchronized, so an asynchronous kernel error is reported against its op.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inputs as rand  # noqa: E402  (benchmarks/inputs.py: seeded inputs drawn on the CPU)

# Largest error relative to the largest reference magnitude, per dtype, for the kernels that
# reduce (the gathers are exact). Half-precision outputs are rounded once: a few ulps of 1.
RELATIVE_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 5e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
# Sinkhorn's 20 iterations at tau = 0.1, and the entropy's logs, amplify the rounding above.
OP_FACTOR = {"sinkhorn_sort": 10.0, "permutation_entropy": 4.0}
TAU, N_ITER = 0.1, 20
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


class CheckFailed(AssertionError):
    pass


class Skipped(Exception):
    pass


@dataclass
class Check:
    name: str
    run: Callable[[], Optional[str]]  # returns a note, or raises


# ---------------------------------------------------------------------------------------------
# Running ops


def synchronize(device: torch.device, what: str) -> None:
    """Surfaces an asynchronous kernel error here, named after the op that raised it."""
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception as exc:
            raise CheckFailed(f"{what}: error at synchronize: {exc}") from exc


def _leaves(args: Sequence, grad_index: Sequence[int], dtype: Optional[torch.dtype]) -> list:
    """Fresh copies of ``args`` (floating ones cast to ``dtype``); ``grad_index`` require grad."""
    out = []
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            else:
                value = value.clone()
            value.requires_grad_(index in grad_index)
        out.append(value)
    return out


def run_op(op: str, provider: str, args: Sequence, grad_index: Sequence[int], upstream, dtype=None):
    """``(outputs, grads)`` of ``lps_fast.<op>`` under ``provider``; ``upstream`` is the
    gradient of the first output (any strides: stride-0 gradients are part of the check)."""
    import lps_fast

    leaves = _leaves(args, grad_index, dtype)
    device = next(v.device for v in leaves if isinstance(v, torch.Tensor))
    with lps_fast.use_backend(provider):
        out = getattr(lps_fast, op)(*leaves)
        synchronize(device, f"{provider} {op} forward")
        outs = out if isinstance(out, tuple) else (out,)
        grads = []
        if grad_index:
            first = outs[0]
            wanted = [leaves[i] for i in grad_index]
            grads = torch.autograd.grad(first, wanted, upstream.to(first.dtype))
            synchronize(device, f"{provider} {op} backward")
    return [o.detach() for o in outs], [g.detach() for g in grads]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference over the largest reference magnitude, at least 0.01: a reference that
    is zero up to rounding (a graph with one real node) compares absolute rounding instead."""
    a, e = actual.double(), expected.double()
    if a.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    scale = max(float(e.abs().max()), 1e-2)
    return float((a - e).abs().max()) / scale


def compare_with_reference(op: str, provider: str, args: Sequence, grad_index: Sequence[int], *,
                           exact_forward: bool = False, upstream_stride0: bool = False) -> str:
    """Provider vs reference, forward and gradients, plus a bitwise rerun; returns a note."""
    dtype = next(v.dtype for v in args if isinstance(v, torch.Tensor) and v.is_floating_point())
    device = next(v.device for v in args if isinstance(v, torch.Tensor))
    with torch.no_grad():
        shape = run_op(op, "reference", args, (), None, dtype=torch.float64)[0][0].shape
    generator = torch.Generator().manual_seed(7)
    if upstream_stride0 and len(shape) >= 2:
        # stride 0 along dim 1 (samples or nodes): along a row or column of a Sinkhorn matrix
        # the gradient would vanish analytically and compare rounding noise
        upstream = _randn(shape[:1] + (1,) + shape[2:], generator, device, dtype).expand(shape)
    else:
        upstream = _randn(shape, generator, device, dtype)
    outs, grads = run_op(op, provider, args, grad_index, upstream)
    again, grads_again = run_op(op, provider, args, grad_index, upstream)
    for index, (a, b) in enumerate(zip(outs + grads, again + grads_again)):
        if not torch.equal(a, b) and not (a.is_floating_point() and bool(torch.isnan(a).any())):
            raise CheckFailed(f"not deterministic: result {index} differs between two identical runs")
    ref_outs, ref_grads = run_op(op, "reference", args, grad_index, upstream.double(), dtype=torch.float64)
    tolerance = RELATIVE_TOLERANCE[dtype] * OP_FACTOR.get(op, 1.0)
    worst = 0.0
    for index, (a, e) in enumerate(zip(outs, ref_outs)):
        if a.shape != e.shape:
            raise CheckFailed(f"output {index}: shape {tuple(a.shape)} != {tuple(e.shape)}")
        if not a.is_floating_point():
            same_dtype, _ = run_op(op, "reference", args, (), None)
            if not torch.equal(a, same_dtype[index]):
                count = int((a != same_dtype[index]).sum())
                raise CheckFailed(f"output {index}: {count} integer entries differ from the reference")
            continue
        if a.dtype != dtype:
            raise CheckFailed(f"output {index}: dtype {a.dtype}, expected {dtype}")
        if exact_forward:
            if not torch.equal(a, e.to(dtype)):
                raise CheckFailed(f"output {index}: a gather differs from the reference")
            continue
        error = relative_error(a, e)
        worst = max(worst, error)
        if not error <= tolerance:
            raise CheckFailed(f"output {index}: relative error {error:.3g} > {tolerance:.3g}")
    for index, (g, e) in zip(grad_index, zip(grads, ref_grads)):
        error = relative_error(g, e)
        worst = max(worst, error)
        if not error <= 4 * tolerance:
            raise CheckFailed(f"grad of input {index}: relative error {error:.3g} > {4 * tolerance:.3g}")
    return f"max rel err {worst:.2g}"


def _randn(shape, generator: torch.Generator, device, dtype) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The cases


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a transposed memory layout (the last two dims swapped in storage)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def permute_cases(B, k, n, F, dtype, device, noncontiguous=False):
    g = _generator(n)
    perm = rand.perm(B, k, n, g, device)
    soft = rand.soft(B, k, n, g, device, dtype)
    x = rand.randn((B, n, F), g, device, dtype)
    y = rand.randn((B, k, n, F), g, device, dtype)
    edge_features = max(1, min(F, 4))
    e = rand.randn((B, n, n, edge_features), g, device, dtype)
    ye = rand.randn((B, k, n, n, edge_features), g, device, dtype)
    if noncontiguous:
        x, y, e, ye = (_noncontiguous(t) for t in (x, y, e, ye))
    return [
        ("permute_nodes", (x, perm, soft), (0, 2), True),
        ("unpermute_mean", (y, perm, soft), (0, 2), False),
        ("permute_edges", (e, perm, soft), (0, 2), True),
        ("unpermute_edges_mean", (ye, perm, soft, False), (0, 2), False),
        ("unpermute_edges_mean", (ye, perm, soft, True), (0, 2), False),
    ]


def frame_cases(B, k, n, C, dtype, device, noncontiguous=False):
    g = _generator(n + 1)
    perm = rand.perm(B, k, n, g, device)
    soft = rand.soft(B, k, n, g, device, dtype)
    R = rand.rotations(B, k, g, device, dtype)
    center = rand.randn((B, 3, C), g, device, dtype)
    x = rand.randn((B, n, 3, C), g, device, dtype)
    y = rand.randn((B, k, n, 3, C), g, device, dtype)
    if noncontiguous:
        x, y, R = _noncontiguous(x), _noncontiguous(y), _noncontiguous(R)
    return [
        ("frame_apply", (x, R, perm, center, soft), (0, 1, 3, 4), False),
        ("frame_unapply_mean", (y, R, perm, center, soft), (0, 1, 3, 4), False),
        ("frame_apply", (x, R, None, None, None), (0, 1), False),
        ("frame_unapply_mean", (y, R, None, None, None), (0, 1), False),
    ]


def sinkhorn_cases(B, k, n, dtype, device, masking, n_iter=N_ITER):
    g = _generator(n + 2)
    scores = rand.randn((B, k, n), g, device, dtype)
    mask = None
    if masking == "random":
        mask = rand.mask(B, n, g, device)
    elif masking == "0-and-1-real":
        mask = torch.zeros(B, n, dtype=torch.bool, device=device)
        mask[1:, 0] = True  # graph 0 has no real node, the others one
    soft = rand.soft(B, k, n, g, device, dtype)
    return [
        ("sinkhorn_sort", (scores, TAU, n_iter, mask), (0,), False),
        ("permutation_entropy", (soft, mask), (0,), False),
    ]


def gram_schmidt_cases(M, dtype, device):
    V = rand.frames(1, M, _generator(3), device, dtype)[0]
    return [("gram_schmidt", (V, False), (0,), False), ("gram_schmidt", (V, True), (0,), False)]


def _describe(args) -> str:
    parts = []
    for value in args:
        if isinstance(value, torch.Tensor):
            parts.append("x".join(map(str, value.shape)) + ("" if value.is_contiguous() else "(nc)"))
        elif value is None:
            parts.append("-")
    return " ".join(parts)


def op_checks(provider: str, device: torch.device, quick: bool, small: bool) -> List[Check]:
    """The agreement checks of one provider. ``small``: float32 at tiny shapes (for
    compute-sanitizer); ``quick``: float32 and bfloat16 at small shapes (for a CPU dry run)."""
    import lps_fast

    offered = set(lps_fast.backend_info()["providers"].get(provider, ()))
    cases: List[Tuple[str, tuple, tuple, bool, bool]] = []

    def add(group, stride0=False):
        for op, args, grad_index, exact in group:
            cases.append((op, args, grad_index, exact, stride0))

    # A few Sinkhorn iterations at small sizes: the Triton interpreter (CPU dry run) runs each
    # iteration's tiles in Python.
    if small:
        dtypes, main_n, awkward, n_iter = (torch.float32,), 5, (1,), 3
    elif quick:
        dtypes, main_n, awkward, n_iter = (torch.float32, torch.bfloat16), 12, (1,), 3
    else:
        dtypes, main_n, awkward, n_iter = (torch.float32, torch.bfloat16, torch.float16, torch.float64), 189, (1, 257), N_ITER
    for dtype in dtypes:
        # every dtype at one awkward size; the shape sweep in float32 only (few kernel variants)
        add(permute_cases(2, 3, main_n, 16, dtype, device))
        add(frame_cases(2, 3, main_n, 2, dtype, device))
        add(sinkhorn_cases(2, 2, main_n, dtype, device, "random", n_iter))
        add(gram_schmidt_cases(500, dtype, device))
    for n in awkward:
        add(permute_cases(2, 3, n, 16, torch.float32, device))
        add(frame_cases(2, 3, n, 2, torch.float32, device))
        add(sinkhorn_cases(2, 2, n, torch.float32, device, None, n_iter))
    if not small:
        add(permute_cases(2, 1, main_n, 16, torch.float32, device))  # k = 1
        add(frame_cases(2, 1, main_n, 2, torch.float32, device))
        add(sinkhorn_cases(3, 1, 7, torch.float32, device, "0-and-1-real", n_iter))
        add(permute_cases(2, 3, 33, 7, torch.float32, device, noncontiguous=True), stride0=True)
        add(frame_cases(2, 3, 33, 5, torch.float32, device, noncontiguous=True), stride0=True)
        add(sinkhorn_cases(2, 2, 33, torch.float32, device, "random", n_iter), stride0=True)
        # channel counts past one feature block (multi-block paths)
        add(permute_cases(1, 2, 9, 700 if quick else 1500, torch.float32, device)[:2])
        add(frame_cases(1, 2, 9, 300, torch.float32, device)[:2])

    checks = []
    for op, args, grad_index, exact, stride0 in cases:
        dtype = next(v.dtype for v in args if isinstance(v, torch.Tensor) and v.is_floating_point())
        extra = " diagonal" if op == "unpermute_edges_mean" and args[3] else ""
        mask = args[-1] if op in ("sinkhorn_sort", "permutation_entropy") else None
        if mask is not None:
            extra += f" mask(real={mask.sum(-1).tolist()})" if mask.shape[0] <= 3 else " mask"
        name = f"{provider} {op}{extra} {DTYPE_NAMES[dtype]} {_describe(args)}" + (" grad-stride0" if stride0 else "")
        if op not in offered:
            checks.append(Check(name, _skip(f"{provider} does not provide {op}")))
            continue
        checks.append(Check(name, _bind(compare_with_reference, op, provider, args, grad_index,
                                        exact_forward=exact, upstream_stride0=stride0)))
    if provider == "triton":  # the learned distribution's fused VN layer (a Triton kernel on GPUs)
        for dtype, masked in ((torch.float64, True), (torch.float32, False)):
            name = f"triton vn_layer VNDGCNN {DTYPE_NAMES[dtype]}{' mask' if masked else ''} against the composed layers"
            checks.append(Check(name, _bind(vn_network_check, provider, device, dtype, masked)))
    if not small and "sinkhorn_sort" in offered:
        for n in ((257,) if quick else (1000, 4096)):
            checks.append(Check(f"{provider} sinkhorn_sort large n={n} finite doubly-stochastic",
                                _bind(large_sinkhorn, provider, n, device, n_iter)))
    return checks


def vn_network_check(provider: str, device: torch.device, dtype: torch.dtype, masked: bool) -> str:
    """The n-body distribution network (``VNDGCNN``, training mode) on the fused kernel of
    ``provider`` against its composed layers (the reference backend) on the same device: the
    outputs, the input gradient and every parameter gradient."""
    import copy

    import lps_fast
    from lps_fast.nn import VNDGCNN, fused_vn_available

    gen = _generator(3)
    net = VNDGCNN(2, hidden=30, neighbours=4, dropout=0.0).to(dtype=dtype)
    x = torch.randn(6, 7, 3, 2, generator=gen, dtype=dtype)
    mask = None
    if masked:
        mask = torch.ones(6, 7, dtype=torch.bool)
        mask[0, 5:] = False
        mask[3, 1:] = False
        x = x * mask[..., None, None]
        mask = mask.to(device)
    net, x = net.to(device), x.to(device)
    weights = [torch.randn(shape, generator=gen, dtype=dtype).to(device) for shape in ((6, 3, 3), (6, 7))]

    def run(backend):
        model = copy.deepcopy(net)
        leaf = x.clone().requires_grad_(True)
        with lps_fast.use_backend(backend):
            if backend != "reference" and not fused_vn_available(leaf):
                raise Skipped(f"{backend} has no fused vn_layer for {dtype} on {device}")
            frame, scores = model(leaf, mask)
            ((frame * weights[0]).sum() + (scores * weights[1]).sum()).backward()
        synchronize(device, f"{backend} VNDGCNN")
        return [frame.detach(), scores.detach(), leaf.grad] + [p.grad for p in model.parameters() if p.grad is not None]

    got, expected = run(provider), run("reference")
    worst = max(relative_error(a, e) for a, e in zip(got, expected))
    tolerance = RELATIVE_TOLERANCE[dtype] * (1.0 if dtype == torch.float64 else 10.0)
    if not worst <= tolerance:
        raise CheckFailed(f"max relative error {worst:.2e} > {tolerance:.0e}")
    return f"max relative error {worst:.1e} over {len(got)} tensors"


def _bind(fn, *args, **kwargs):
    return lambda: fn(*args, **kwargs)


def _skip(reason: str):
    def run():
        raise Skipped(reason)

    return run


def large_sinkhorn(provider: str, n: int, device: torch.device, n_iter: int = N_ITER) -> str:
    """One large matrix: finite, columns summing to 1 (the last Sinkhorn step), rows close to 1,
    and the same hard permutation and soft matrix as the reference (float32, no autograd)."""
    g = _generator(n)
    scores = rand.randn((1, 1, n), g, device, torch.float32)
    soft, perm = run_op("sinkhorn_sort", provider, (scores, TAU, n_iter, None), (), None)[0]
    if not bool(torch.isfinite(soft).all()):
        raise CheckFailed("non-finite entries")
    column_error = float((soft.double().sum(-2) - 1).abs().max())
    row_error = float((soft.double().sum(-1) - 1).abs().max())
    if column_error > 1e-3 or row_error > 5e-2:
        raise CheckFailed(f"not doubly stochastic: column sums off by {column_error:.3g}, rows by {row_error:.3g}")
    with torch.no_grad():
        ref_soft, ref_perm = run_op("sinkhorn_sort", "reference", (scores, TAU, n_iter, None), (), None)[0]
    if not torch.equal(perm, ref_perm):
        raise CheckFailed("perm differs from the reference")
    error = relative_error(soft, ref_soft)
    if error > 1e-3:
        raise CheckFailed(f"soft: relative error {error:.3g} against the float32 reference")
    return f"col err {column_error:.1g}, row err {row_error:.1g}, rel err {error:.1g}"


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): one compiled function per family and provider


def compile_checks(provider: str, device: torch.device) -> List[Check]:
    import lps_fast

    offered = set(lps_fast.backend_info()["providers"].get(provider, ()))
    g = _generator(11)
    B, k, n, F, C = 2, 3, 37, 8, 4
    perm = rand.perm(B, k, n, g, device)
    x = rand.randn((B, n, F), g, device, torch.float32)
    e = rand.randn((B, n, n, 2), g, device, torch.float32)
    points = rand.randn((B, n, 3, C), g, device, torch.float32)
    R = rand.rotations(B, k, g, device, torch.float32)
    center = rand.randn((B, 3, C), g, device, torch.float32)
    scores = rand.randn((B, k, n), g, device, torch.float32)
    mask = rand.mask(B, n, g, device)
    V = rand.frames(1, 64, g, device, torch.float32)[0]

    def permute_family(x, e):
        nodes = lps_fast.unpermute_mean(lps_fast.permute_nodes(x, perm) * 2, perm)
        edges = lps_fast.unpermute_edges_mean(lps_fast.permute_edges(e, perm).sin(), perm)
        diagonal = lps_fast.unpermute_edges_mean(lps_fast.permute_edges(e, perm), perm, diagonal=True)
        return nodes.sum() + edges.sum() + diagonal.square().sum()

    def frame_family(points, R, center):
        y = lps_fast.frame_apply(points, R, perm, center)
        return lps_fast.frame_unapply_mean(y.tanh(), R, perm, center).square().sum()

    def sinkhorn_family(scores):
        soft, _ = lps_fast.sinkhorn_sort(scores, TAU, 5, mask)
        return (soft * soft.detach().roll(1, -1)).sum() + lps_fast.permutation_entropy(soft, mask)

    def gram_schmidt_family(V):
        return lps_fast.gram_schmidt(V, True).sin().sum()

    families = [
        ("permute_nodes permute_edges unpermute_mean unpermute_edges_mean", permute_family, (x, e)),
        ("frame_apply frame_unapply_mean", frame_family, (points, R, center)),
        ("sinkhorn_sort permutation_entropy", sinkhorn_family, (scores,)),
        ("gram_schmidt", gram_schmidt_family, (V,)),
    ]
    checks = []
    for ops, fn, args in families:
        name = f"{provider} torch.compile(fullgraph=True) fwd+bwd: {ops}"
        missing = [op for op in ops.split() if op not in offered]
        if missing:
            checks.append(Check(name, _skip(f"{provider} does not provide {', '.join(missing)}")))
        else:
            checks.append(Check(name, _bind(compiled_matches_eager, provider, fn, args, device)))
    return checks


def compiled_matches_eager(provider: str, fn, args, device: torch.device) -> str:
    import lps_fast

    def value_and_grads(f):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        with lps_fast.use_backend(provider):
            value = f(*leaves)
            grads = torch.autograd.grad(value, leaves)
        synchronize(device, f"{provider} {getattr(f, '__name__', 'compiled')}")
        return [value.detach()] + [g.detach() for g in grads]

    torch._dynamo.reset()
    eager = value_and_grads(fn)
    compiled = value_and_grads(torch.compile(fn, fullgraph=True))
    worst = 0.0
    for index, (c, e) in enumerate(zip(compiled, eager)):
        error = relative_error(c, e)
        worst = max(worst, error)
        if not error <= 1e-4:
            raise CheckFailed(f"result {index}: compiled differs from eager by {error:.3g} (relative)")
    return f"max rel err {worst:.2g}"


# ---------------------------------------------------------------------------------------------
# Preflight


def _nvcc_release() -> Optional[str]:
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None)
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"release (\d+\.\d+)", text)
    return match.group(1) if match else None


def preflight(require_gpu: bool) -> List[Tuple[str, str, str]]:
    """``(status, name, detail)`` lines about the machine; FAIL only for what stops a stage."""
    lines = [("INFO", "python", sys.version.split()[0]), ("INFO", "torch", f"{torch.__version__} (CUDA {torch.version.cuda})")]
    try:
        import triton

        lines.append(("INFO", "triton", triton.__version__))
    except Exception as exc:
        lines.append(("FAIL", "triton", f"cannot import: {exc}"))
    nvcc = _nvcc_release()
    torch_cuda = torch.version.cuda
    if nvcc is None:
        lines.append(("FAIL" if require_gpu else "SKIP", "nvcc", "not found: the CUDA extension cannot be built"))
    elif torch_cuda is None:
        lines.append(("FAIL" if require_gpu else "SKIP", "nvcc", f"{nvcc}, but torch is not a CUDA build"))
    elif nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        lines.append(("FAIL", "nvcc", f"{nvcc} vs torch's CUDA {torch_cuda}: major versions differ, the build will fail"))
    else:
        same = "same" if nvcc == torch_cuda else "minor versions differ (supported)"
        lines.append(("PASS", "nvcc", f"{nvcc} vs torch's CUDA {torch_cuda}: {same}"))
    if not torch.cuda.is_available():
        lines.append(("FAIL" if require_gpu else "SKIP", "gpu", "no CUDA device visible to torch"))
        return lines
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        lines.append(("PASS", f"gpu {index}", f"{props.name}, sm_{props.major}{props.minor}, "
                      f"{props.multi_processor_count} SMs, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"))
        if free < 8 * 2**30:
            lines.append(("FAIL", f"gpu {index} memory", f"only {free / 2**30:.1f} GiB free; the checks need about 8"))
    return lines


# ---------------------------------------------------------------------------------------------
# Command line


def _providers(text: str, device: torch.device) -> List[str]:
    import lps_fast

    wanted = [p.strip() for p in text.split(",") if p.strip()]
    info = lps_fast.backend_info()
    available = []
    for provider in wanted:
        if provider not in info["providers"]:
            reason = info["unavailable"].get(provider, "not available")
            # on a GPU machine a missing provider is a failure; on the CPU it is expected
            print(f"{'FAIL' if device.type == 'cuda' else 'SKIP'} {provider}: provider unavailable ({reason})", flush=True)
            continue
        devices = lps_fast._backend.providers[provider].devices
        if device.type not in devices and "*" not in devices:
            print(f"SKIP {provider}: does not run on {device.type} tensors here", flush=True)
            continue
        available.append(provider)
    return available


def run_checks(checks: Sequence[Check], list_only: bool = False) -> int:
    """Runs each check, prints one line per check; returns the number of failures."""
    failures = 0
    for check in checks:
        if list_only:
            print(f"CHECK {check.name}", flush=True)
            continue
        start = time.perf_counter()
        try:
            note = check.run()
            status, detail = "PASS", note or ""
        except Skipped as exc:
            status, detail = "SKIP", str(exc)
        except Exception as exc:  # a failing check must not stop the others
            failures += 1
            message = str(exc).strip().splitlines()
            status, detail = "FAIL", f"{type(exc).__name__}: {message[0] if message else ''}"
        print(f"{status} {check.name} ({time.perf_counter() - start:.1f}s) {detail}".rstrip(), flush=True)
    return failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pre = commands.add_parser("preflight", help="versions, nvcc vs torch's CUDA, GPUs and free memory")
    pre.add_argument("--require-gpu", action="store_true", help="fail when no GPU or nvcc is found")
    for name, help_text in (("correctness", "every op and gradient against the reference"),
                            ("compile", "torch.compile(fullgraph=True) per op family against eager")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--device", default="cuda", help="cuda (default) or cpu")
        sub.add_argument("--providers", default="cuda,triton", help="comma list (default cuda,triton)")
        size = sub.add_mutually_exclusive_group()
        size.add_argument("--quick", action="store_true", help="float32 and bfloat16 at small shapes")
        size.add_argument("--small", action="store_true", help="float32 at tiny shapes (compute-sanitizer)")
        sub.add_argument("--only", default="", help="run the checks whose name contains this text")
        sub.add_argument("--list", action="store_true", help="print the check names without running them")
    args = parser.parse_args(argv)

    if args.command == "preflight":
        lines = preflight(args.require_gpu)
        for status, name, detail in lines:
            print(f"{status} {name}: {detail}", flush=True)
        return 1 if any(status == "FAIL" for status, _, _ in lines) else 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("FAIL device: --device cuda but no CUDA device is visible to torch", flush=True)
        return 1
    import lps_fast

    providers = _providers(args.providers, device)
    failures = len([p for p in args.providers.split(",") if p.strip()]) - len(providers) if device.type == "cuda" else 0
    checks: List[Check] = []
    for provider in providers:
        if args.command == "correctness":
            checks += op_checks(provider, device, args.quick, args.small)
        else:
            checks += compile_checks(provider, device)
    if args.only:
        checks = [c for c in checks if args.only in c.name]
    if not args.list:
        print(f"INFO lps_fast {lps_fast.__version__} on {device}: {len(checks)} checks, providers {', '.join(providers) or 'none'}",
              flush=True)
    failures += run_checks(checks, list_only=args.list)
    if not providers:
        print("FAIL providers: none of the requested providers can run here", flush=True)
        failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
