"""The Triton kernels agree with the reference, forward and backward.

Without a GPU these run on CPU tensors under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it
before lps_fast is imported), so shapes are small; on a GPU the same tests run on CUDA tensors.
The provider is forced with ``lps_fast.use_backend("triton")`` and the public ops are compared
with ``lps_fast.reference``:

* gathers (every forward value of the permutation ops) exactly, ``rtol = atol = 0``;
* reductions with the per-dtype tolerances of tests/helpers.py. float16 and bfloat16 inputs are
  compared with the reference evaluated in float32 on the same input values, since the kernels
  accumulate in float32 and round once (the reference run in half precision rounds at every
  step and is the less accurate of the two); hard permutations are still compared exactly with
  the reference in the input's own dtype.

Gradients: one shared random upstream gradient per case, every floating input's gradient.
A last test compiles every kernel variant for sm_80 and sm_90 with triton's own compiler (no GPU
needed), which the interpreter alone cannot check.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close, random_perm, random_soft, tolerance

import lps_fast
from lps_fast import _backend, _ops
from lps_fast import reference as ref

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
TRITON_READY = "triton" in _backend.providers and (ON_GPU or lps_fast.backend_info()["triton"]["interpret"])

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not TRITON_READY, reason="Triton kernels need a GPU or TRITON_INTERPRET=1"),
]

HALF = (torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}

# (n, k) grid in float32, plus every dtype at two shapes.
SHAPES = [(n, k) for n in (1, 2, 5, 12) for k in (1, 3)]
SHAPE_DTYPES = [(n, k, torch.float32) for n, k in SHAPES] + [
    (n, k, dtype) for n, k in ((5, 3), (12, 1)) for dtype in (torch.float64, torch.float16, torch.bfloat16)
]


def _case_id(case) -> str:
    n, k, dtype = case
    return f"n{n}-k{k}-{DTYPE_IDS[dtype]}"


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def small_tiles(monkeypatch):
    """Shrink every tile so that even these small shapes take the multi-block paths."""
    from lps_fast.kernels import frame, permute, sinkhorn

    monkeypatch.setattr(permute, "TILE_ELEMENTS", 8)
    monkeypatch.setattr(frame, "TILE_ELEMENTS", 8)
    monkeypatch.setattr(sinkhorn, "TILE_ELEMENTS", 32)
    monkeypatch.setattr(sinkhorn, "BACKWARD_TILE_ELEMENTS", 32)


def _reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def _run(fn, args: dict, upstream=None, grad_names=()):
    """Call ``fn(**args)``; return ``(outputs, {name: grad})`` for ``sum(out * upstream)``."""
    args = dict(args)
    for name in grad_names:
        args[name] = args[name].detach().clone().requires_grad_()
    out = fn(**args)
    first = out[0] if isinstance(out, tuple) else out
    grads = {}
    if grad_names:
        if upstream is None:
            upstream = torch.ones_like(first)
        values = torch.autograd.grad(first, [args[name] for name in grad_names], upstream.to(first.dtype))
        grads = dict(zip(grad_names, values))
    return out, grads


def _check(op: str, args: dict, grad_names=(), exact=False):
    """Compare ``lps_fast.<op>`` under the triton backend with ``reference.<op>``, forward and
    backward; ``exact`` compares the forward value bit for bit. Returns the triton outputs
    and gradients."""
    dtype = next(v.dtype for v in args.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    reference_dtype = _reference_dtype(dtype)
    reference_args = {
        name: v.to(reference_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for name, v in args.items()
    }
    with torch.no_grad():
        probe = getattr(ref, op)(**reference_args)
    shape = (probe[0] if isinstance(probe, tuple) else probe).shape
    upstream = torch.randn(shape, dtype=torch.float32, device=DEVICE).to(dtype)
    with lps_fast.use_backend("triton"):
        out, grads = _run(getattr(lps_fast, op), args, upstream, grad_names)
    expected, expected_grads = _run(getattr(ref, op), reference_args, upstream.to(reference_dtype), grad_names)
    outs = out if isinstance(out, tuple) else (out,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    for index, (actual, wanted) in enumerate(zip(outs, expecteds)):
        assert actual.dtype == (wanted.dtype if not wanted.is_floating_point() else dtype), (op, index)
        assert actual.is_contiguous()
        _assert_finite_where(actual, wanted, f"{op} output {index}")
        if actual.is_floating_point():
            assert_close(actual, wanted.to(dtype), dtype=dtype, exact=exact, name=f"{op} output {index}")
        else:
            assert_close(actual, wanted, exact=True, name=f"{op} output {index}")
    for name in grad_names:
        assert grads[name].dtype == dtype, name
        wanted = expected_grads[name]
        _assert_finite_where(grads[name], wanted, f"{op} d/d{name}")
        atol = None
        if dtype in HALF:
            # The autograd formulas round intermediate gradients to the input dtype before
            # their last reduction (e.g. d/dcenter sums n rounded per-node gradients), so the
            # absolute error scales with the gradient's magnitude, not with 1.
            atol = tolerance(dtype)[0] * max(1.0, float(wanted.abs().max()))
        assert_close(grads[name], wanted.to(dtype), dtype=dtype, atol=atol, name=f"{op} d/d{name}")
    return out, grads


def _assert_finite_where(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    if actual.is_floating_point():
        finite = torch.isfinite(expected)
        assert bool(torch.isfinite(actual)[finite].all()), f"{name}: non-finite where the reference is finite"


def _floats(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(dtype).to(DEVICE)


def _inputs(n, k, dtype, batch=2):
    return dict(perm=random_perm(batch, k, n).to(DEVICE), soft=random_soft(batch, k, n, dtype=dtype).to(DEVICE))


# ---------------------------------------------------------------------------------------------
# Registration


def test_every_op_is_registered_with_the_shared_schema():
    from lps_fast import kernels

    assert set(kernels.OPS) == set(_ops.OP_NAMES)
    namespace = getattr(torch.ops, _ops.NAMESPACE)
    for name, schema in {**_ops.SCHEMAS, **_ops.BACKWARD_SCHEMAS}.items():
        actual = str(getattr(namespace, name + "_triton").default._schema)
        expected = f"{_ops.NAMESPACE}::{name}_triton{schema}"
        # torch releases whose triton_op ignores its schema argument infer SymInt for int
        assert actual == expected or actual.replace("SymInt", "int") == expected, (actual, expected)
    for name, op in kernels.OPS.items():
        assert op is getattr(namespace, name + "_triton")


def test_backend_info_routes_cuda_tensors_to_a_gpu_kernel():
    info = lps_fast.backend_info()
    assert info["triton"]["available"], info["triton"]["error"]
    for op in _ops.OP_NAMES:
        assert op in _backend.providers["triton"].ops
        assert info["ops"][op]["cuda"] in ("triton", "cuda"), (op, info["ops"][op])
    with lps_fast.use_backend("triton"):
        forced = lps_fast.backend_info()["ops"]
        for op in _ops.OP_NAMES:
            assert forced[op]["cuda"] == "triton"
            if not ON_GPU:
                assert forced[op]["cpu"] == "triton"


# ---------------------------------------------------------------------------------------------
# Permutation ops


@pytest.mark.parametrize("with_soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("case", SHAPE_DTYPES, ids=_case_id)
def test_permute_nodes(case, with_soft):
    n, k, dtype = case
    inputs = _inputs(n, k, dtype)
    args = dict(x=_floats(2, n, 2, 3, dtype=dtype), perm=inputs["perm"], soft=inputs["soft"] if with_soft else None)
    _check("permute_nodes", args, ("x", "soft") if with_soft else ("x",), exact=True)


@pytest.mark.parametrize("with_soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("case", SHAPE_DTYPES, ids=_case_id)
def test_unpermute_mean(case, with_soft):
    n, k, dtype = case
    inputs = _inputs(n, k, dtype)
    args = dict(y=_floats(2, k, n, 3, dtype=dtype), perm=inputs["perm"], soft=inputs["soft"] if with_soft else None)
    _check("unpermute_mean", args, ("y", "soft") if with_soft else ("y",))


@pytest.mark.parametrize("with_soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("case", SHAPE_DTYPES, ids=_case_id)
def test_permute_edges(case, with_soft):
    n, k, dtype = case
    inputs = _inputs(n, k, dtype)
    args = dict(e=_floats(2, n, n, 2, dtype=dtype), perm=inputs["perm"], soft=inputs["soft"] if with_soft else None)
    _check("permute_edges", args, ("e", "soft") if with_soft else ("e",), exact=True)


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diagonal"])
@pytest.mark.parametrize("with_soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("case", SHAPE_DTYPES, ids=_case_id)
def test_unpermute_edges_mean(case, with_soft, diagonal):
    n, k, dtype = case
    inputs = _inputs(n, k, dtype)
    args = dict(
        y=_floats(2, k, n, n, 2, dtype=dtype),
        perm=inputs["perm"],
        soft=inputs["soft"] if with_soft else None,
        diagonal=diagonal,
    )
    _check("unpermute_edges_mean", args, ("y", "soft") if with_soft else ("y",))


@pytest.mark.parametrize("features", [(), (1,), (3, 2)], ids=["F-none", "F1", "F3x2"])
def test_permutation_ops_feature_shapes(features, small_tiles):
    """No trailing dims, a single one, several; with tiles small enough to split rows, columns
    and features over several programs."""
    n, k = 5, 3
    inputs = _inputs(n, k, torch.float32)
    perm, soft = inputs["perm"], inputs["soft"]
    x = _floats(2, n, *features, dtype=torch.float32)
    _check("permute_nodes", dict(x=x, perm=perm, soft=soft), ("x", "soft"), exact=True)
    e = _floats(2, n, n, *features, dtype=torch.float32)
    _check("permute_edges", dict(e=e, perm=perm, soft=soft), ("e", "soft"), exact=True)
    y = _floats(2, k, n, *features, dtype=torch.float32)
    _check("unpermute_mean", dict(y=y, perm=perm, soft=soft), ("y", "soft"))
    y = _floats(2, k, n, n, *features, dtype=torch.float32)
    for diagonal in (False, True):
        _check("unpermute_edges_mean", dict(y=y, perm=perm, soft=soft, diagonal=diagonal), ("y", "soft"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_gathers_of_labels_and_adjacency(dtype):
    batch, k, n = 2, 3, 5
    perm = random_perm(batch, k, n).to(DEVICE)
    if dtype == torch.bool:
        labels = torch.rand(batch, n, 2) > 0.5
        adjacency = torch.rand(batch, n, n) > 0.5
    else:
        labels = torch.randint(0, 100, (batch, n, 2), dtype=dtype)
        adjacency = torch.randint(0, 100, (batch, n, n), dtype=dtype)
    labels, adjacency = labels.to(DEVICE), adjacency.to(DEVICE)
    with lps_fast.use_backend("triton"):
        nodes = lps_fast.permute_nodes(labels, perm)
        edges = lps_fast.permute_edges(adjacency, perm)
    assert nodes.dtype == dtype and edges.dtype == dtype
    assert_close(nodes, ref.permute_nodes(labels, perm), exact=True, name="labels")
    assert_close(edges, ref.permute_edges(adjacency, perm), exact=True, name="adjacency")


def test_non_contiguous_inputs_and_stride_zero_gradients():
    """Transposed / sliced inputs are read through their strides; ``out.sum()`` hands every
    backward an expanded (stride-0) upstream gradient."""
    batch, k, n = 2, 3, 5
    perm = random_perm(batch, k, n).to(DEVICE)
    soft = random_soft(batch, k, n).to(DEVICE)
    x = _floats(batch, 4, n, dtype=torch.float32).transpose(1, 2)  # [B, n, 4], feature stride n
    e = _floats(batch, n, n, 6, dtype=torch.float32)[..., ::2].transpose(1, 2)
    y = _floats(batch, n, k, 3, dtype=torch.float32).transpose(1, 2)
    ye = _floats(batch, k, n, n, 2, dtype=torch.float32).transpose(2, 3)
    points = _floats(batch, n, 2, 3, dtype=torch.float32).transpose(2, 3)  # [B, n, 3, C=2]
    y_points = _floats(batch, k, n, 2, 3, dtype=torch.float32).transpose(3, 4)
    R = _floats(batch, k, 3, 3, dtype=torch.float32).transpose(2, 3)
    center = _floats(batch, 2, 3, dtype=torch.float32).transpose(1, 2)
    scores = _floats(batch, n, k, dtype=torch.float32).transpose(1, 2)
    cases = [
        ("permute_nodes", dict(x=x, perm=perm, soft=soft), ("x", "soft")),
        ("permute_edges", dict(e=e, perm=perm, soft=soft), ("e", "soft")),
        ("unpermute_mean", dict(y=y, perm=perm, soft=soft), ("y", "soft")),
        ("unpermute_edges_mean", dict(y=ye, perm=perm, soft=soft), ("y", "soft")),
        ("unpermute_edges_mean", dict(y=ye, perm=perm, soft=soft, diagonal=True), ("y", "soft")),
        ("frame_apply", dict(x=points, R=R, perm=perm, center=center, soft=soft), ("x", "R", "center", "soft")),
        (
            "frame_unapply_mean",
            dict(y=y_points, R=R, perm=perm, center=center, soft=soft),
            ("y", "R", "center", "soft"),
        ),
        ("sinkhorn_sort", dict(scores=scores, tau=0.5, n_iter=3), ("scores",)),
        ("permutation_entropy", dict(soft=soft.transpose(2, 3)), ("soft",)),
        ("gram_schmidt", dict(V=R), ("V",)),
    ]
    for op, args, grad_names in cases:
        assert not next(iter(args.values())).is_contiguous(), op
        with lps_fast.use_backend("triton"):
            out, grads = _run(getattr(lps_fast, op), args, None, grad_names)
        expected, expected_grads = _run(getattr(ref, op), args, None, grad_names)
        first = out[0] if isinstance(out, tuple) else out
        wanted = expected[0] if isinstance(expected, tuple) else expected
        assert_close(first, wanted, name=f"{op} output")
        for name in grad_names:
            assert_close(grads[name], expected_grads[name], name=f"{op} d/d{name}")


def _guarded(values: torch.Tensor, dim: int, pad: int = 3) -> torch.Tensor:
    """``values`` as a view into a larger NaN-filled buffer: a read outside the view yields NaN."""
    shape = list(values.shape)
    shape[dim] += 2 * pad
    buffer = torch.full(shape, float("nan"), dtype=values.dtype, device=values.device)
    view = buffer.narrow(dim, pad, values.shape[dim])
    view.copy_(values)
    return view


def test_invalid_perm_stays_in_bounds():
    """On GPU nobody validates perm values (a check would synchronize). Out-of-range indices
    must read nothing: their outputs are 0, and no NaN from outside the tensors leaks in."""
    batch, k, n = 2, 2, 4
    perm = random_perm(batch, k, n).to(DEVICE)
    perm[0, 0, 1] = -1
    perm[0, 1, 2] = n
    perm[1, 0, 0] = 10 * n
    perm[1, 1, 3] = -(2**40)
    bad = (perm < 0) | (perm >= n)
    ops = torch.ops.lps_fast
    x = _guarded(_floats(batch, n, 3, dtype=torch.float32), 1)
    out = ops.permute_nodes_triton(x, perm)
    assert bool(torch.isfinite(out).all())
    assert bool((out[bad] == 0).all())
    e = _guarded(_floats(batch, n, n, 2, dtype=torch.float32), 2)
    out = ops.permute_edges_triton(e, perm)
    assert bool(torch.isfinite(out).all())
    assert bool((out[bad] == 0).all()) and bool((out.transpose(2, 3)[bad] == 0).all())
    y = _guarded(_floats(batch, k, n, 3, dtype=torch.float32), 2)
    assert bool(torch.isfinite(ops.unpermute_mean_triton(y, perm)).all())
    ye = _guarded(_floats(batch, k, n, n, 2, dtype=torch.float32), 3)
    assert bool(torch.isfinite(ops.unpermute_edges_mean_triton(ye, perm)).all())
    assert bool(torch.isfinite(ops.unpermute_edges_mean_triton(ye, perm, None, True)).all())
    points = _guarded(_floats(batch, n, 3, 2, dtype=torch.float32), 1)
    R = _floats(batch, k, 3, 3, dtype=torch.float32)
    out = ops.frame_apply_triton(points, R, perm)
    assert bool(torch.isfinite(out).all()) and bool((out[bad] == 0).all())
    y_points = _guarded(_floats(batch, k, n, 3, 2, dtype=torch.float32), 2)
    assert bool(torch.isfinite(ops.frame_unapply_mean_triton(y_points, R, perm)).all())


def test_zero_size_inputs():
    perm = torch.empty(2, 3, 0, dtype=torch.int64, device=DEVICE)
    with lps_fast.use_backend("triton"):
        assert lps_fast.permute_nodes(torch.empty(2, 0, 4, device=DEVICE), perm).shape == (2, 3, 0, 4)
        assert lps_fast.permute_edges(torch.empty(2, 0, 0, device=DEVICE), perm).shape == (2, 3, 0, 0)
        assert lps_fast.unpermute_mean(torch.empty(2, 3, 0, 4, device=DEVICE), perm).shape == (2, 0, 4)
        nonempty = random_perm(2, 3, 4).to(DEVICE)
        assert lps_fast.permute_nodes(torch.empty(2, 4, 0, device=DEVICE), nonempty).shape == (2, 3, 4, 0)
        assert lps_fast.gram_schmidt(torch.empty(0, 3, 3, device=DEVICE)).shape == (0, 3, 3)
        soft, order = lps_fast.sinkhorn_sort(torch.empty(0, 2, 5, device=DEVICE), 0.5)
        assert soft.shape == (0, 2, 5, 5) and order.shape == (0, 2, 5)


# ---------------------------------------------------------------------------------------------
# Frame ops


FRAME_CASES = [(5, 3, torch.float32), (1, 1, torch.float32), (12, 2, torch.float32)] + [
    (5, 3, dtype) for dtype in (torch.float64, torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize("with_center", [False, True], ids=["origin", "center"])
@pytest.mark.parametrize("perm_mode", ["none", "hard", "soft"])
@pytest.mark.parametrize("case", FRAME_CASES, ids=_case_id)
def test_frame_ops(case, perm_mode, with_center):
    n, k, dtype = case
    batch, channels = 2, 3
    inputs = _inputs(n, k, dtype)
    perm = None if perm_mode == "none" else inputs["perm"]
    soft = inputs["soft"] if perm_mode == "soft" else None
    center = _floats(batch, 3, channels, dtype=dtype) if with_center else None
    R = _floats(batch, k, 3, 3, dtype=dtype)  # any matrix: both ops are linear in R
    grads = ["R"] + (["center"] if with_center else []) + (["soft"] if soft is not None else [])
    x = _floats(batch, n, 3, channels, dtype=dtype)
    _check("frame_apply", dict(x=x, R=R, perm=perm, center=center, soft=soft), ["x"] + grads)
    y = _floats(batch, k, n, 3, channels, dtype=dtype)
    _check("frame_unapply_mean", dict(y=y, R=R, perm=perm, center=center, soft=soft), ["y"] + grads)


def test_frame_ops_multi_block(small_tiles):
    n, k, batch, channels = 9, 2, 2, 3
    inputs = _inputs(n, k, torch.float32)
    R = _floats(batch, k, 3, 3, dtype=torch.float32)
    center = _floats(batch, 3, channels, dtype=torch.float32)
    for perm in (None, inputs["perm"]):
        x = _floats(batch, n, 3, channels, dtype=torch.float32)
        _check("frame_apply", dict(x=x, R=R, perm=perm, center=center), ("x", "R", "center"))
        y = _floats(batch, k, n, 3, channels, dtype=torch.float32)
        _check("frame_unapply_mean", dict(y=y, R=R, perm=perm, center=center), ("y", "R", "center"))


# ---------------------------------------------------------------------------------------------
# Sinkhorn sort and permutation entropy


def _mask(batch: int, n: int, kind: str):
    if kind == "full":
        return None
    n_real = [n, max(n - 2, 1), 1][:batch]
    mask = torch.arange(n)[None, :] < torch.tensor(n_real)[:, None]
    if batch > 1:
        mask[1] = mask[1][torch.randperm(n)]  # real nodes need not come first
    return mask.to(DEVICE)


SINKHORN_CASES = [(1, 3, torch.float32), (2, 1, torch.float32), (5, 3, torch.float32), (12, 2, torch.float32)] + [
    (5, 3, dtype) for dtype in (torch.float64, torch.float16, torch.bfloat16)
]


def _check_sinkhorn(scores, tau, n_iter, mask):
    (soft, perm), grads = _check("sinkhorn_sort", dict(scores=scores, tau=tau, n_iter=n_iter, mask=mask), ("scores",))
    # the hard permutation is the reference's in the input's own dtype (its rounding decides ties)
    assert_close(perm, ref.sinkhorn_sort(scores, tau, n_iter, mask)[1], exact=True, name="perm")
    real = torch.ones(scores.shape[0], scores.shape[2], dtype=torch.bool, device=DEVICE) if mask is None else mask
    for b in range(scores.shape[0]):
        m = int(real[b].sum())
        assert soft[b][:, ~real[b]].abs().sum() == 0, "padded rows must be exactly 0"
        assert soft[b][:, :, m:].abs().sum() == 0, "padded columns must be exactly 0"
    padded = ~real[:, None, :].expand_as(scores)
    assert grads["scores"][padded].abs().sum() == 0, "padded scores get zero gradient"


@pytest.mark.parametrize("masking", ["full", "masked"])
@pytest.mark.parametrize("case", SINKHORN_CASES, ids=_case_id)
def test_sinkhorn_sort(case, masking):
    n, k, dtype = case
    batch = 3 if masking == "masked" else 2
    scores = _floats(batch, k, n, dtype=dtype)
    _check_sinkhorn(scores, 0.3, 3, _mask(batch, n, masking))


@pytest.mark.parametrize("n_iter", [0, 1, 20])
def test_sinkhorn_sort_iterations(n_iter):
    scores = _floats(1, 2, 5, dtype=torch.float32)
    _check_sinkhorn(scores, 0.4, n_iter, None)
    _check_sinkhorn(scores.repeat(2, 1, 1), 0.4, n_iter, _mask(2, 5, "masked"))


@pytest.mark.parametrize("masking", ["full", "masked"])
def test_sinkhorn_sort_multi_tile(masking, small_tiles):
    """Tiles of 32 entries: several row blocks per matrix, for the rank count, the streamed
    column log-sum-exp and the backward's scratch round trips."""
    scores = _floats(2, 2, 12, dtype=torch.float64)
    _check_sinkhorn(scores, 0.2, 4, _mask(2, 12, masking))


def test_sinkhorn_sort_ties_and_sharp_temperature():
    scores = torch.tensor([[[1.0, 2.0, 1.0, 2.0, 0.0]], [[0.0, 0.0, 0.0, 0.0, 0.0]]], device=DEVICE)
    _check_sinkhorn(scores, 0.1, 5, None)
    with lps_fast.use_backend("triton"):
        _, perm = lps_fast.sinkhorn_sort(scores, 0.1)
    assert perm[0].tolist() == [[1, 3, 0, 2, 4]]
    assert perm[1].tolist() == [[0, 1, 2, 3, 4]]
    # a sharp temperature: log-domain values down to -2 / tau = -400
    _check_sinkhorn(_floats(2, 3, 5, dtype=torch.float64), 0.005, 5, _mask(2, 5, "masked"))


def test_sinkhorn_sort_and_entropy_of_a_graph_without_real_nodes():
    """A batch element whose mask is all False: soft all 0, zero gradient, and the entropy
    counts it as 0 (the reference's ``n_real`` clamp to 1)."""
    scores = _floats(2, 2, 4, dtype=torch.float32)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False]], device=DEVICE)
    (soft, _), grads = _check("sinkhorn_sort", dict(scores=scores, tau=0.3, n_iter=3, mask=mask), ("scores",))
    assert soft[1].abs().sum() == 0 and grads["scores"][1].abs().sum() == 0
    _check("permutation_entropy", dict(soft=soft.detach(), mask=mask), ("soft",))


ENTROPY_CASES = [(n, k, torch.float32) for n in (1, 2, 5, 12) for k in (1, 3)] + [
    (5, 3, dtype) for dtype in (torch.float64, torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize("masking", ["full", "masked"])
@pytest.mark.parametrize("case", ENTROPY_CASES, ids=_case_id)
def test_permutation_entropy(case, masking):
    n, k, dtype = case
    batch = 3 if masking == "masked" else 2
    soft = random_soft(batch, k, n, dtype=torch.float32)
    soft[0, 0, 0, 0] = 1e-13  # below the clamp: zero gradient there
    _check("permutation_entropy", dict(soft=soft.to(dtype).to(DEVICE), mask=_mask(batch, n, masking)), ("soft",))


def test_permutation_entropy_of_sinkhorn_output(small_tiles):
    scores = _floats(3, 2, 12, dtype=torch.float64)
    mask = _mask(3, 12, "masked")
    soft, _ = ref.sinkhorn_sort(scores, 0.3, 5, mask)
    _check("permutation_entropy", dict(soft=soft, mask=mask), ("soft",))
    _check("permutation_entropy", dict(soft=soft, mask=None), ("soft",))


# ---------------------------------------------------------------------------------------------
# Gram-Schmidt


@pytest.mark.parametrize("proper", [False, True], ids=["O3", "SO3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(3, 3), (2, 5, 3, 3), (300, 3, 3)], ids=["single", "B2-k5", "M300"])
def test_gram_schmidt(shape, dtype, proper):
    V = torch.randn(*shape, dtype=torch.float64)
    # Nearly dependent columns make Gram-Schmidt's gradient ill-conditioned: two correct float32
    # evaluations then differ beyond any tolerance. Keep the random draws well-conditioned.
    well = torch.linalg.cond(V) < (4.0 if dtype in HALF else 30.0)
    V = torch.where(well[..., None, None], V, V + 3 * torch.eye(3, dtype=torch.float64))
    _check("gram_schmidt", dict(V=V.to(dtype).to(DEVICE), proper=proper), ("V",))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0/0 of u1 = 0
def test_gram_schmidt_degenerate_columns():
    """A zero column takes the ``max(norm, 1e-12)`` clamp: the output column is 0 and every
    value and gradient stays where the reference's is."""
    V = _floats(4, 3, 3, dtype=torch.float64)
    V[0, :, 2] = 0.0  # u2 = 0 exactly
    V[1, :, 1] = 0.0  # u1 = 0 exactly: 0/0 downstream, NaN in both
    _check("gram_schmidt", dict(V=V, proper=False), ("V",))


def test_gram_schmidt_proper_gradient_at_a_singular_frame():
    """With ``u2 = 0`` the frame is singular (det = 0). ``d det / dR`` is still the cofactor
    matrix, which the kernel uses; autograd through ``torch.linalg.det`` disagrees at singular
    matrices, so the degenerate column is checked against central differences instead (in the
    clamp's linear regime, |u2| < 1e-12)."""
    V = _floats(1, 3, 3, dtype=torch.float64)
    V[0, :, 2] = 0.0
    upstream = _floats(1, 3, 3, dtype=torch.float64)
    with lps_fast.use_backend("triton"):
        _, grads = _run(lps_fast.gram_schmidt, dict(V=V, proper=True), upstream, ("V",))
        step = 1e-14
        for a in range(3):
            plus, minus = V.clone(), V.clone()
            plus[0, a, 2] += step
            minus[0, a, 2] -= step
            change = (lps_fast.gram_schmidt(plus, True) - lps_fast.gram_schmidt(minus, True)) * upstream
            finite_difference = float(change.sum()) / (2 * step)
            assert finite_difference == pytest.approx(float(grads["V"][0, a, 2]), rel=1e-3)
    # the other columns agree with autograd through the reference
    _, expected = _run(ref.gram_schmidt, dict(V=V, proper=True), upstream, ("V",))
    assert_close(grads["V"][..., :2], expected["V"][..., :2], name="gram_schmidt d/dV[:, :2]")


# ---------------------------------------------------------------------------------------------
# torch.library checks


def _opcheck_cases():
    batch, k, n = 2, 2, 3
    perm = random_perm(batch, k, n).to(DEVICE)
    soft = random_soft(batch, k, n).to(DEVICE)
    mask = torch.tensor([[True, True, True], [True, False, True]], device=DEVICE)
    f = lambda *shape: torch.randn(*shape, device=DEVICE)  # noqa: E731
    return [
        ("permute_nodes", (f(batch, n, 2), perm, soft)),
        ("permute_edges", (f(batch, n, n, 2), perm, soft)),
        ("unpermute_mean", (f(batch, k, n, 2), perm, soft)),
        ("unpermute_edges_mean", (f(batch, k, n, n, 2), perm, soft, True)),
        ("frame_apply", (f(batch, n, 3, 2), f(batch, k, 3, 3), perm, f(batch, 3, 2), soft)),
        ("frame_unapply_mean", (f(batch, k, n, 3, 2), f(batch, k, 3, 3), perm, f(batch, 3, 2), soft)),
        ("sinkhorn_sort", (f(batch, k, n), 0.5, 2, mask)),
        ("permutation_entropy", (soft, mask)),
        ("gram_schmidt", (f(batch, 3, 3), True)),
        ("sinkhorn_sort_backward", (f(batch, k, n, n), f(batch, k, n), 0.5, 2, mask)),
        ("permutation_entropy_backward", (torch.tensor(1.0, device=DEVICE), soft, mask)),
        ("gram_schmidt_backward", (f(batch, 3, 3), f(batch, 3, 3), False)),
    ]


# test_aot_dispatch_dynamic runs on a GPU only: AOTAutograd decomposes a triton_op into its
# kernel launches under functionalization, and under TRITON_INTERPRET=1 torch's wrap_triton hands
# back the interpreted kernel, which cannot run on functional tensors (torch.compile of these ops
# is likewise GPU-only).
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if ON_GPU
    else ("test_schema", "test_autograd_registration", "test_faketensor")
)


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("index", range(12), ids=[name for name, _ in _opcheck_cases()])
def test_opcheck(index, transposed):
    name, args = _opcheck_cases()[index]
    if transposed:  # same values, last two dims stored transposed: outputs are still contiguous
        args = tuple(a.transpose(-1, -2).contiguous().transpose(-1, -2) if isinstance(a, torch.Tensor) and a.dim() >= 2
                     else a for a in args)
    op = getattr(getattr(torch.ops, _ops.NAMESPACE), name + "_triton").default
    if name in _ops.SCHEMAS:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


# ---------------------------------------------------------------------------------------------
# The real compiler


@pytest.mark.skipif(ON_GPU, reason="on a GPU every kernel is compiled by the tests above")
def test_every_kernel_compiles_for_sm80_and_sm90():
    """Lower every kernel variant the launchers pick (float32 and bfloat16) to a cubin with
    triton's bundled ptxas: catches what the interpreter accepts but the compiler rejects."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-m", "lps_fast.kernels.compile_check", "--arch", "80", "90", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 failure(s)" in result.stdout
