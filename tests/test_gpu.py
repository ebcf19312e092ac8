"""Agreement of the GPU providers (compiled CUDA kernels and Triton) with the reference on CUDA
tensors, forward and backward, for float32, bfloat16 and float16. Skipped without a GPU;
`benchmarks/gpu_check.sh` runs it on a GPU machine.

The fast path runs in the input dtype (accumulating in float32); the reference runs in float64
on the same (rounded) inputs, so the comparison measures the fast path's own error. Integer
outputs (Sinkhorn's hard permutation) are compared with the reference run in the input dtype:
rounding the normalized scores to bfloat16 or float16 creates ties that float64 does not have,
and the kernels break them as the reference does in that dtype.
"""

import pytest
import torch
from helpers import assert_close, random_perm, random_soft, run_with_grads

import lps_fast
from lps_fast import _backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_PROVIDERS = [name for name in ("cuda", "triton") if name in _backend.providers and "cuda" in _backend.providers[name].devices]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# error of a float32-accumulating kernel against float64, by input dtype (atol, rtol)
GPU_TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


@pytest.fixture(params=GPU_PROVIDERS or [pytest.param("none", marks=pytest.mark.skip("no GPU provider"))])
def gpu_backend(request):
    return request.param


def dtype_id(dtype):
    return {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]


def _require(backend, op):
    if op not in _backend.providers[backend].ops:
        pytest.skip(f"{backend} does not provide {op}")


def _to64(values):
    out = []
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            leaf = v.detach().double()
            out.append(leaf.requires_grad_(v.requires_grad))
        else:
            out.append(v)
    return out


def compare_gpu(op, inputs, backend, dtype, exact_forward=False, tolerance_scale=1.0):
    _require(backend, op)
    fn = getattr(lps_fast, op)
    with lps_fast.use_backend(backend):
        fast_out, fast_grads = run_with_grads(fn, inputs)
    with lps_fast.use_backend("reference"):
        ref_out, ref_grads = run_with_grads(fn, _to64(inputs))
        same_dtype_out, _ = run_with_grads(fn, [v.detach() if isinstance(v, torch.Tensor) else v for v in inputs])
    fast_list = fast_out if isinstance(fast_out, tuple) else (fast_out,)
    ref_list = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    same_dtype_list = same_dtype_out if isinstance(same_dtype_out, tuple) else (same_dtype_out,)
    atol, rtol = (t * tolerance_scale for t in GPU_TOLERANCE[dtype])
    for index, (a, e) in enumerate(zip(fast_list, ref_list)):
        assert a.device.type == "cuda"
        if not e.is_floating_point():
            expected = same_dtype_list[index]
            assert torch.equal(a, expected), f"{op} output {index}: {int((a != expected).sum())} entries differ"
        elif exact_forward:
            assert_close(a, e.to(a.dtype), exact=True, name=f"{op} output {index}")
        else:
            assert a.dtype == dtype
            assert_close(a, e, atol=atol, rtol=rtol, name=f"{op} output {index}")
    for index in ref_grads:
        assert_close(fast_grads[index], ref_grads[index], atol=atol * 4, rtol=rtol * 4, name=f"{op} grad {index}")


SCALES = [(2, 3, 5), (8, 4, 188), (1, 2, 444)]


def scale_id(scale):
    return "B{}-k{}-n{}".format(*scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scale", SCALES, ids=scale_id)
def test_permute_family(gpu_backend, scale, dtype):
    batch, k, n = scale
    device = "cuda"
    perm = random_perm(batch, k, n, device=device)
    soft = random_soft(batch, k, n, dtype=dtype, device=device).requires_grad_()
    x = torch.randn(batch, n, 16, dtype=dtype, device=device, requires_grad=True)
    compare_gpu("permute_nodes", [x, perm, soft], gpu_backend, dtype)
    y = torch.randn(batch, k, n, 16, dtype=dtype, device=device, requires_grad=True)
    compare_gpu("unpermute_mean", [y, perm, soft], gpu_backend, dtype)
    edge_features = 4 if n < 400 else 1
    e = torch.randn(batch, n, n, edge_features, dtype=dtype, device=device, requires_grad=True)
    compare_gpu("permute_edges", [e, perm, soft], gpu_backend, dtype)
    ye = torch.randn(batch, k, n, n, edge_features, dtype=dtype, device=device, requires_grad=True)
    compare_gpu("unpermute_edges_mean", [ye, perm, soft, False], gpu_backend, dtype)
    compare_gpu("unpermute_edges_mean", [ye, perm, soft, True], gpu_backend, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool], ids=str)
def test_gathers_are_exact(gpu_backend, dtype):
    _require(gpu_backend, "permute_edges")
    batch, k, n = 3, 5, 37
    perm = random_perm(batch, k, n, device="cuda")
    for shape in [(batch, n), (batch, n, 3), (batch, n, 8)]:
        x = torch.randint(0, 2, shape, device="cuda").to(dtype) if dtype in (torch.int64, torch.bool) else (
            torch.randn(shape, device="cuda").to(dtype))
        with lps_fast.use_backend(gpu_backend):
            got = lps_fast.permute_nodes(x, perm)
        b = torch.arange(batch, device="cuda")[:, None, None]
        assert torch.equal(got, x[b, perm])
    e = torch.randn(batch, n, n, 3, device="cuda").to(dtype)
    with lps_fast.use_backend(gpu_backend):
        got = lps_fast.permute_edges(e, perm)
    b = torch.arange(batch, device="cuda")[:, None, None, None]
    assert torch.equal(got, e[b, perm[..., :, None], perm[..., None, :]])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scale", [(2, 3, 5), (100, 20, 5), (4, 4, 188)], ids=scale_id)
def test_frame_family(gpu_backend, scale, dtype):
    batch, k, n = scale
    device = "cuda"
    channels = 2
    perm = random_perm(batch, k, n, device=device)
    soft = random_soft(batch, k, n, dtype=dtype, device=device).requires_grad_()
    R = lps_fast.reference.gram_schmidt(torch.randn(batch, k, 3, 3, device=device)).to(dtype).requires_grad_()
    center = torch.randn(batch, 3, channels, dtype=dtype, device=device, requires_grad=True)
    x = torch.randn(batch, n, 3, channels, dtype=dtype, device=device, requires_grad=True)
    y = torch.randn(batch, k, n, 3, channels, dtype=dtype, device=device, requires_grad=True)
    for p, s in ((None, None), (perm, None), (perm, soft)):
        compare_gpu("frame_apply", [x, R, p, center, s], gpu_backend, dtype)
        compare_gpu("frame_unapply_mean", [y, R, p, center, s], gpu_backend, dtype)


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scale", [(2, 3, 5), (8, 4, 64), (2, 4, 188), (1, 2, 444)], ids=scale_id)
def test_sinkhorn_and_entropy(gpu_backend, scale, dtype, masked):
    batch, k, n = scale
    device = "cuda"
    scores = torch.randn(batch, k, n, device=device).to(dtype).requires_grad_()
    mask = None
    if masked:
        n_real = torch.randint(1, n + 1, (batch,), device=device)
        mask = torch.arange(n, device=device)[None, :] < n_real[:, None]
    # 20 iterations at tau = 0.1 amplify the float32 rounding of the iterates; in half precision
    # the error is that of the scores rounded to the input dtype and of the output's rounding,
    # which the per-dtype tolerance already covers
    scale = 10.0 if dtype == torch.float32 else 1.0
    compare_gpu("sinkhorn_sort", [scores, 0.1, 20, mask], gpu_backend, dtype, tolerance_scale=scale)
    soft = random_soft(batch, k, n, dtype=dtype, device=device).requires_grad_()
    compare_gpu("permutation_entropy", [soft, mask], gpu_backend, dtype, tolerance_scale=scale)


@pytest.mark.parametrize("proper", [False, True], ids=["O3", "SO3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gram_schmidt(gpu_backend, dtype, proper):
    V = torch.eye(3, device="cuda") + 0.3 * torch.randn(1000, 3, 3, device="cuda")
    compare_gpu("gram_schmidt", [V.to(dtype).requires_grad_(), proper], gpu_backend, dtype, tolerance_scale=10.0)


def test_cuda_kernels_registered_for_cuda_key():
    info = lps_fast.backend_info()
    assert info["cuda_extension"]["loaded"], info["cuda_extension"]["error"]
    for op in ("permute_nodes", "permute_edges", "unpermute_mean", "unpermute_edges_mean", "frame_apply",
               "frame_unapply_mean", "gram_schmidt"):
        assert op in _backend.providers["cuda"].ops
