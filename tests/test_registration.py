"""Every registered op passes torch.library.opcheck (schema, fake kernel, autograd registration,
AOT dispatch), and code calling the public ops compiles with torch.compile(fullgraph=True)."""

import pytest
import torch
from helpers import assert_close, random_perm, random_soft

import lps_fast
from lps_fast import _backend, _ops
from lps_fast import reference as ref

B, K, N = 2, 3, 5


def _inputs():
    f64 = torch.float64
    perm = random_perm(B, K, N)
    soft = random_soft(B, K, N, dtype=f64).requires_grad_()
    mask = torch.tensor([[True] * N, [True, False, True, True, False]])
    R = ref.gram_schmidt(torch.randn(B, K, 3, 3, dtype=f64)).requires_grad_()
    center = torch.randn(B, 3, 2, dtype=f64, requires_grad=True)
    return {
        "permute_nodes": (torch.randn(B, N, 4, dtype=f64, requires_grad=True), perm, soft),
        "permute_edges": (torch.randn(B, N, N, 2, dtype=f64, requires_grad=True), perm, soft),
        "unpermute_mean": (torch.randn(B, K, N, 4, dtype=f64, requires_grad=True), perm, soft),
        "unpermute_edges_mean": (torch.randn(B, K, N, N, 2, dtype=f64, requires_grad=True), perm, soft, True),
        "frame_apply": (torch.randn(B, N, 3, 2, dtype=f64, requires_grad=True), R, perm, center, soft),
        "frame_unapply_mean": (torch.randn(B, K, N, 3, 2, dtype=f64, requires_grad=True), R, perm, center, soft),
        "sinkhorn_sort": (torch.randn(B, K, N, dtype=f64, requires_grad=True), 0.3, 5, mask),
        "permutation_entropy": (random_soft(B, K, N, dtype=f64).requires_grad_(), mask),
        "gram_schmidt": (torch.randn(B, K, 3, 3, dtype=f64, requires_grad=True), True),
        "sinkhorn_sort_backward": (
            torch.randn(B, K, N, N, dtype=f64), torch.randn(B, K, N, dtype=f64), 0.3, 5, mask),
        "permutation_entropy_backward": (torch.tensor(1.5, dtype=f64), random_soft(B, K, N, dtype=f64), mask),
        "gram_schmidt_backward": (torch.randn(B, 3, 3, dtype=f64), torch.randn(B, 3, 3, dtype=f64), True),
        "frame_apply_backward": (
            torch.randn(B, K, N, 3, 2, dtype=f64), torch.randn(B, N, 3, 2, dtype=f64), R.detach(), perm,
            center.detach()),
        "frame_unapply_mean_backward": (
            torch.randn(B, N, 3, 2, dtype=f64), torch.randn(B, K, N, 3, 2, dtype=f64), R.detach(), perm),
        "permute_nodes_backward": (torch.randn(B, K, N, 4, dtype=f64), perm),
        "permute_edges_backward": (torch.randn(B, K, N, N, 2, dtype=f64), perm),
        "unpermute_mean_backward": (torch.randn(B, N, 4, dtype=f64), perm),
        "unpermute_edges_mean_diagonal_backward": (torch.randn(B, N, 2, dtype=f64), perm),
    }


CPP_OPS = sorted(
    name for name in list(_ops.SCHEMAS) + list(_ops.BACKWARD_SCHEMAS) + list(_ops.CPU_BACKWARD_SCHEMAS)
    if torch._C._dispatch_has_kernel_for_dispatch_key(_ops.qualified(name), "CPU")
)


def _relayout(t, layout: str):
    """The same values in another memory layout: the kernels copy or stride through it, and the
    fake kernel must still describe the (contiguous) output the real kernel returns."""
    if not isinstance(t, torch.Tensor) or layout == "contiguous":
        return t
    if layout == "transposed":
        if t.dim() < 2:
            return t
        out = t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    else:  # every element one slot apart: a non-unit innermost stride
        out = torch.stack([t.detach(), torch.zeros_like(t)], dim=-1)[..., 0]
    assert t.dim() < 2 or not out.is_contiguous()
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("name", CPP_OPS or [pytest.param("none", marks=pytest.mark.skip("no CPU kernels"))])
def test_opcheck(name, layout):
    op = getattr(torch.ops.lps_fast, name).default
    torch.library.opcheck(op, tuple(_relayout(a, layout) for a in _inputs()[name]))


def _model_step(x, e, scores, points, V):
    """A symmetrization-shaped computation touching every op."""
    soft, perm = lps_fast.sinkhorn_sort(scores, 0.3, 8)
    nodes = lps_fast.permute_nodes(x, perm, soft)
    edges = lps_fast.permute_edges(e, perm, soft)
    mixed = nodes + edges.sum(dim=3)
    out = lps_fast.unpermute_mean(torch.tanh(mixed), perm, soft)
    diag = lps_fast.unpermute_edges_mean(torch.sin(edges), perm, soft, diagonal=True)
    R = lps_fast.gram_schmidt(V, proper=True)
    center = points.mean(dim=1)
    moved = lps_fast.frame_apply(points, R, perm, center, soft)
    back = lps_fast.frame_unapply_mean(moved * 2.0, R, perm, center, soft)
    entropy = lps_fast.permutation_entropy(soft)
    return out.sum() + diag.sum() + back.sum() + entropy


def _step_inputs():
    return [
        torch.randn(B, N, 4, requires_grad=True),
        torch.randn(B, N, N, 4, requires_grad=True),
        torch.randn(B, K, N, requires_grad=True),
        torch.randn(B, N, 3, 2, requires_grad=True),
        torch.randn(B, K, 3, 3, requires_grad=True),
    ]


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    if "cpp" not in _backend.providers or not _backend.providers["cpp"].ops:
        pytest.skip("no CPU kernels")
    torch._dynamo.reset()
    eager_inputs = _step_inputs()
    compiled_inputs = [t.detach().clone().requires_grad_() for t in eager_inputs]
    expected = _model_step(*eager_inputs)
    expected.backward()
    compiled = torch.compile(_model_step, fullgraph=True, backend=compiler)
    actual = compiled(*compiled_inputs)
    actual.backward()
    assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    for a, e in zip(compiled_inputs, eager_inputs):
        assert_close(a.grad, e.grad, atol=1e-4, rtol=1e-4)


def test_fake_kernels_match_on_non_contiguous_inputs():
    """The kernels return contiguous outputs for a transposed input; so must the fake kernels, or
    torch.compile's stride check fails (the frame network transposes its vectors before
    gram_schmidt)."""
    V = torch.randn(3, 2, 3, 3, dtype=torch.float64).transpose(-1, -2).requires_grad_()
    soft = torch.rand(2, 3, 4, 4, dtype=torch.float64).softmax(-1).transpose(-1, -2).requires_grad_()
    torch.library.opcheck(torch.ops.lps_fast.gram_schmidt.default, (V, True))
    torch.library.opcheck(torch.ops.lps_fast.permutation_entropy.default, (soft, None))


@pytest.mark.skipif(not CPP_OPS, reason="no CPU kernels")
def test_a_double_backward_through_a_compiled_op_is_refused_clearly():
    """create_graph=True (a gradient penalty) through an op whose backward runs kernels: an error
    naming the reference backend, not gradients whose derivatives silently miss the kernels'.
    Every provider's autograd goes through the same registration (_ops.register_autograd)."""
    x, perm, soft = _inputs()["permute_nodes"]
    with lps_fast.use_backend("cpp"):
        out = lps_fast.permute_nodes(x, perm, soft)
        with pytest.raises(RuntimeError, match="no second derivatives.*use_backend"):
            torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with lps_fast.use_backend("reference"):
        out = lps_fast.permute_nodes(x, perm, soft)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        assert grad.requires_grad
    assert torch.autograd.gradgradcheck(lambda x: ref.permute_nodes(x, perm, soft), (x,))
