"""The frame family on the compiled CPU kernels agrees with the reference, forward and backward."""

import pytest
import torch
from helpers import assert_close, compare_backends, random_perm, random_soft

import lps_fast
from lps_fast import reference as ref

pytestmark = pytest.mark.usefixtures("poison_uninitialized")

# On AVX-512 CPUs 1, 2 or 4 channels of float or double run in chunks of 16 / C (8 / C) points:
# whole and partial chunks, and 3 or 8 channels on the scalar loops
SHAPES = [(2, 3, 5, 2), (1, 1, 1, 1), (100, 20, 5, 2), (2, 3, 37, 4), (1, 4, 188, 1), (3, 2, 64, 1), (2, 2, 17, 2),
          (2, 2, 8, 4), (2, 2, 6, 3), (2, 2, 9, 8)]


def shape_id(shape):
    batch, k, n, channels = shape
    return f"B{batch}-k{k}-n{n}-C{channels}"


def _frames(batch, k, dtype):
    return ref.gram_schmidt(torch.randn(batch, k, 3, 3, dtype=dtype)).requires_grad_()


@pytest.mark.parametrize("use_center", [False, True], ids=["nocenter", "center"])
@pytest.mark.parametrize("use_perm", ["none", "hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_frame_apply(cpu_backend, shape, dtype, use_perm, use_center):
    batch, k, n, channels = shape
    x = torch.randn(batch, n, 3, channels, dtype=dtype, requires_grad=True)
    R = _frames(batch, k, dtype)
    perm = random_perm(batch, k, n) if use_perm != "none" else None
    soft = random_soft(batch, k, n, dtype=dtype).requires_grad_() if use_perm == "soft" else None
    center = torch.randn(batch, 3, channels, dtype=dtype, requires_grad=True) if use_center else None
    compare_backends("frame_apply", [x, R, perm, center, soft], cpu_backend)


@pytest.mark.parametrize("use_center", [False, True], ids=["nocenter", "center"])
@pytest.mark.parametrize("use_perm", ["none", "hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_frame_unapply_mean(cpu_backend, shape, dtype, use_perm, use_center):
    batch, k, n, channels = shape
    y = torch.randn(batch, k, n, 3, channels, dtype=dtype, requires_grad=True)
    R = _frames(batch, k, dtype)
    perm = random_perm(batch, k, n) if use_perm != "none" else None
    soft = random_soft(batch, k, n, dtype=dtype).requires_grad_() if use_perm == "soft" else None
    center = torch.randn(batch, 3, channels, dtype=dtype, requires_grad=True) if use_center else None
    compare_backends("frame_unapply_mean", [y, R, perm, center, soft], cpu_backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision(cpu_backend, dtype):
    batch, k, n, channels = 3, 4, 6, 2
    x = torch.randn(batch, n, 3, channels, dtype=dtype)
    R = ref.gram_schmidt(torch.randn(batch, k, 3, 3)).to(dtype)
    perm = random_perm(batch, k, n)
    center = torch.randn(batch, 3, channels, dtype=dtype)
    with lps_fast.use_backend(cpu_backend):
        fast = lps_fast.frame_apply(x, R, perm, center)
    # float32 accumulation in the kernel: compare with the float64 reference
    expected = ref.frame_apply(x.double(), R.double(), perm, center.double()).to(dtype)
    assert_close(fast, expected, dtype=dtype)


def test_non_contiguous(cpu_backend):
    batch, k, n, channels = 2, 3, 7, 3
    x = torch.randn(batch, n, channels, 3).transpose(-1, -2).requires_grad_()
    R = ref.gram_schmidt(torch.randn(batch, k, 3, 3)).transpose(-1, -2).requires_grad_()
    center = torch.randn(batch, channels, 3).transpose(-1, -2).requires_grad_()
    perm = random_perm(batch, k, n)
    compare_backends("frame_apply", [x, R, perm, center, None], cpu_backend)
    y = torch.randn(batch, n, k, 3, channels).transpose(1, 2).requires_grad_()
    compare_backends("frame_unapply_mean", [y, R, perm, center, None], cpu_backend)


def test_round_trip(cpu_backend):
    batch, k, n, channels = 4, 5, 9, 2
    x = torch.randn(batch, n, 3, channels)
    R = ref.gram_schmidt(torch.randn(batch, k, 3, 3))
    center = torch.randn(batch, 3, channels)
    perm = random_perm(batch, k, n)
    with lps_fast.use_backend(cpu_backend):
        for p in (None, perm):
            moved = lps_fast.frame_apply(x, R, p, center)
            assert_close(lps_fast.frame_unapply_mean(moved, R, p, center), x)


@pytest.mark.parametrize("wanted", ["points", "R", "center", "R+center"])
@pytest.mark.parametrize("op", ["frame_apply", "frame_unapply_mean"])
def test_gradients_of_a_subset_of_inputs(cpu_backend, op, wanted):
    """The fused backward passes serve any subset of the inputs that need a gradient."""
    batch, k, n, channels = 3, 4, 6, 2
    shape = (batch, n, 3, channels) if op == "frame_apply" else (batch, k, n, 3, channels)
    points = torch.randn(shape, dtype=torch.float64, requires_grad="points" in wanted)
    R = ref.gram_schmidt(torch.randn(batch, k, 3, 3, dtype=torch.float64)).requires_grad_("R" in wanted)
    center = torch.randn(batch, 3, channels, dtype=torch.float64, requires_grad="center" in wanted)
    for perm in (None, random_perm(batch, k, n)):
        compare_backends(op, [points, R, perm, center, None], cpu_backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("op", ["frame_apply", "frame_unapply_mean"])
def test_half_precision_gradients(cpu_backend, op, dtype):
    batch, k, n, channels = 3, 4, 6, 2
    shape = (batch, n, 3, channels) if op == "frame_apply" else (batch, k, n, 3, channels)
    # values representable in the half type, so both sides see the same inputs
    points = torch.randn(shape).to(dtype).float()
    R = ref.gram_schmidt(torch.randn(batch, k, 3, 3)).to(dtype).float()
    center = torch.randn(batch, 3, channels).to(dtype).float()
    perm = random_perm(batch, k, n)
    upstream = None
    grads = {}
    for name, cast in ((cpu_backend, dtype), ("reference", torch.float64)):
        inputs = [t.to(cast).requires_grad_() for t in (points, R, center)]
        with lps_fast.use_backend(name):
            out = getattr(lps_fast, op)(inputs[0], inputs[1], perm, inputs[2])
        if upstream is None:
            upstream = torch.randn(out.shape).to(dtype).float()
        grads[name] = torch.autograd.grad(out, inputs, upstream.to(cast))
    for fast, expected in zip(grads[cpu_backend], grads["reference"]):
        assert fast.dtype == dtype
        assert_close(fast, expected.to(dtype), dtype=dtype)
