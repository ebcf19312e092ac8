"""gram_schmidt on the compiled CPU kernels agrees with the reference, forward and backward."""

import pytest
import torch
from helpers import compare_backends

pytestmark = pytest.mark.usefixtures("poison_uninitialized")


def well_conditioned(*shape, dtype):
    """Random frames input away from degeneracy: Gram-Schmidt's gradient amplifies rounding by
    about cond(V)^2, so near-singular draws would compare float32 rounding noise."""
    V = torch.randn(*shape, dtype=torch.float64)
    if V.numel():
        bad = torch.linalg.cond(V) > 30
        V[bad] = torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(int(bad.sum()), 3, 3, dtype=torch.float64)
    return V.to(dtype)


@pytest.mark.parametrize("proper", [False, True], ids=["O3", "SO3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(3, 3), (5, 3, 3), (4, 20, 3, 3), (0, 3, 3)], ids=lambda s: "x".join(map(str, s)))
def test_gram_schmidt(cpu_backend, shape, dtype, proper):
    V = well_conditioned(*shape, dtype=dtype).requires_grad_()
    compare_backends("gram_schmidt", [V, proper], cpu_backend)


def test_gram_schmidt_tiny_columns(cpu_backend):
    """Tiny columns (norms near the 1e-12 clamp) follow the reference's arithmetic."""
    V = well_conditioned(4, 3, 3, dtype=torch.float64)
    V[0, :, 0] = 1e-14  # tiny first axis, still orthogonalized against
    V[1, :, 1] = 1e-13  # tiny second axis
    compare_backends("gram_schmidt", [V.requires_grad_(), False], cpu_backend)


def test_gram_schmidt_non_contiguous(cpu_backend):
    V = torch.randn(6, 3, 3, dtype=torch.float64).transpose(-1, -2).requires_grad_()
    compare_backends("gram_schmidt", [V, True], cpu_backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision(cpu_backend, dtype):
    from helpers import assert_close

    import lps_fast
    from lps_fast import reference as ref

    V = torch.randn(50, 3, 3).to(dtype)
    with lps_fast.use_backend(cpu_backend):
        R = lps_fast.gram_schmidt(V, proper=True)
    assert_close(R, ref.gram_schmidt(V.double(), proper=True).to(dtype), dtype=dtype)
