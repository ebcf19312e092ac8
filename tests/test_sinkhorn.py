"""sinkhorn_sort and permutation_entropy on the compiled CPU kernels agree with the reference
(forward and gradient through every Sinkhorn iteration), and the kernel keeps no dense
per-iteration intermediates."""

import pytest
import torch
from helpers import assert_close, compare_backends, random_soft

import lps_fast
from lps_fast import reference as ref

pytestmark = pytest.mark.usefixtures("poison_uninitialized")

# (B, k, n, tau, n_iter)
CASES = [
    (2, 3, 5, 0.3, 20),
    (1, 1, 1, 1.0, 20),
    (2, 1, 2, 0.5, 3),
    (2, 3, 37, 0.1, 20),
    (1, 2, 64, 1.0, 10),
    (1, 2, 188, 0.1, 20),
    (3, 2, 9, 0.05, 0),
    # small tau: a wide spread of L0 (here up to 200) makes the kernel iterate in the log domain
    (2, 3, 5, 0.01, 20),
    (1, 2, 188, 0.01, 20),
]


def case_id(case):
    batch, k, n, tau, n_iter = case
    return f"B{batch}-k{k}-n{n}-tau{tau}-it{n_iter}"


def _mask(batch, n, generator=None):
    n_real = torch.randint(1, n + 1, (batch,), generator=generator)
    n_real[0] = n  # one full graph
    mask = torch.arange(n)[None, :] < n_real[:, None]
    if batch > 1:  # real nodes need not come first
        mask[-1] = mask[-1][torch.randperm(n, generator=generator)]
    return mask


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sinkhorn_sort(cpu_backend, case, dtype, masked):
    batch, k, n, tau, n_iter = case
    scores = torch.randn(batch, k, n, dtype=dtype, requires_grad=True)
    mask = _mask(batch, n) if masked else None
    # float32: the kernel iterates on potentials, the reference on the whole matrix; after 20
    # iterations at tau = 0.1 both carry ~1e-5 relative rounding
    tol = dict(atol=1e-5, rtol=1e-4, grad_atol=1e-4, grad_rtol=1e-3) if dtype == torch.float32 else {}
    (soft, _), _ = compare_backends("sinkhorn_sort", [scores, tau, n_iter, mask], cpu_backend, **tol)
    if mask is not None:
        padded = ~mask[:, None, :, None] | torch.zeros(1, 1, 1, n, dtype=torch.bool)
        assert soft.detach()[padded.expand_as(soft)].abs().sum() == 0


def test_sinkhorn_sort_ties_and_duplicates(cpu_backend):
    scores = torch.tensor([[[1.0, 2.0, 1.0, 2.0, 0.5], [3.0, 3.0, 3.0, 3.0, 3.0]]], dtype=torch.float64)
    scores.requires_grad_()
    compare_backends("sinkhorn_sort", [scores, 0.2, 10, None], cpu_backend)
    mask = torch.tensor([[True, False, True, True, False]])
    compare_backends("sinkhorn_sort", [scores, 0.2, 10, mask], cpu_backend)


def test_sinkhorn_sort_zero_scores(cpu_backend):
    """||s|| = 0 < eps: the normalization divides by eps and passes no gradient through the norm."""
    scores = torch.zeros(2, 2, 4, dtype=torch.float64, requires_grad=True)
    compare_backends("sinkhorn_sort", [scores, 0.5, 5, None], cpu_backend)


def test_sinkhorn_sort_fully_padded_graph(cpu_backend):
    scores = torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [False] * 5])
    (soft, _), _ = compare_backends("sinkhorn_sort", [scores, 0.5, 5, mask], cpu_backend)
    assert soft[1].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_sinkhorn_half_precision(cpu_backend, dtype):
    scores = torch.randn(2, 3, 12)
    with lps_fast.use_backend(cpu_backend):
        soft, perm = lps_fast.sinkhorn_sort(scores.to(dtype), 0.3, 10)
    # float32 arithmetic inside: compare with the float64 reference on the rounded inputs
    expected_soft, expected_perm = ref.sinkhorn_sort(scores.to(dtype).double(), 0.3, 10)
    assert soft.dtype == dtype
    assert_close(soft, expected_soft.to(dtype), dtype=dtype)
    assert torch.equal(perm, expected_perm)


def test_sinkhorn_backward_memory_is_small(cpu_backend):
    """The autograd graph keeps only the inputs: no n x n intermediate per iteration."""
    batch, k, n, n_iter = 2, 3, 64, 20
    scores = torch.randn(batch, k, n, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with lps_fast.use_backend(cpu_backend):
            soft, _ = lps_fast.sinkhorn_sort(scores, 0.1, n_iter)
    assert sum(saved) <= batch * k * n * 2, saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with lps_fast.use_backend("reference"):
            lps_fast.sinkhorn_sort(scores, 0.1, n_iter)
    assert sum(saved) > 2 * n_iter * batch * k * n * n  # what the fast path avoids


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 1, 1), (3, 4, 37), (1, 2, 188)], ids=lambda s: "B{}-k{}-n{}".format(*s))
def test_permutation_entropy(cpu_backend, shape, dtype, masked):
    batch, k, n = shape
    soft = random_soft(batch, k, n, dtype=dtype)
    soft[..., 0, 0] = 0.0  # an entry below the clamp: no gradient there
    soft.requires_grad_()
    mask = _mask(batch, n) if masked else None
    compare_backends("permutation_entropy", [soft, mask], cpu_backend)


def test_permutation_entropy_of_sinkhorn_output(cpu_backend):
    scores = torch.randn(3, 4, 20, dtype=torch.float64)
    mask = _mask(3, 20)
    soft, _ = ref.sinkhorn_sort(scores, 0.3, 20, mask)
    compare_backends("permutation_entropy", [soft.requires_grad_(), mask], cpu_backend)
