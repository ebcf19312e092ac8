"""The permutation family on the compiled CPU kernels agrees with the reference, forward and
backward: gathers bit for bit, scatter-means within per-dtype tolerances."""

import pytest
import torch
from helpers import assert_close, compare_backends, random_perm, random_soft
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lps_fast

pytestmark = pytest.mark.usefixtures("poison_uninitialized")

# (B, k, n, feature shape): a realistic case plus awkward ones
SHAPES = [
    (2, 3, 5, (4,)),
    (1, 1, 1, ()),
    (2, 1, 2, (3,)),
    (3, 20, 5, (2, 3)),
    (2, 3, 37, ()),
    (1, 3, 64, (8,)),
    (2, 4, 188, (4,)),
]
DTYPES = [torch.float32, torch.float64]


def soft_grad_tolerance(dtype, with_soft, contraction):
    """The soft gradient is a reduction over ``contraction`` products (n F for edges): float32
    sums of that length differ by ~eps sqrt(length) times the partial sums between two orders."""
    if not with_soft or dtype != torch.float32:
        return {}
    scale = 1e-5 * max(1.0, contraction ** 0.5)
    return {"grad_atol": scale, "grad_rtol": scale}


def shape_id(shape):
    batch, k, n, features = shape
    return f"B{batch}-k{k}-n{n}-F{'x'.join(map(str, features)) or 'none'}"


def dtype_id(dtype):
    return {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]


@pytest.mark.parametrize("with_soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_permute_nodes(cpu_backend, shape, dtype, with_soft):
    batch, k, n, features = shape
    perm = random_perm(batch, k, n)
    x = torch.randn(batch, n, *features, dtype=dtype, requires_grad=True)
    soft = random_soft(batch, k, n, dtype=dtype).requires_grad_() if with_soft else None
    compare_backends("permute_nodes", [x, perm, soft], cpu_backend, exact_forward=True)


@pytest.mark.parametrize("with_soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_unpermute_mean(cpu_backend, shape, dtype, with_soft):
    batch, k, n, features = shape
    perm = random_perm(batch, k, n)
    y = torch.randn(batch, k, n, *features, dtype=dtype, requires_grad=True)
    soft = random_soft(batch, k, n, dtype=dtype).requires_grad_() if with_soft else None
    compare_backends("unpermute_mean", [y, perm, soft], cpu_backend)


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize(
    "shape",
    [(4, 3, 50, (64,)), (1, 3, 50, (64,)), (3, 2, 300, (256,))],
    ids=["graph-per-thread", "fewer-graphs-than-threads", "accumulator-beyond-l2"],
)
def test_node_scatter_forms(cpu_backend, shape, threads):
    """The node scatter-sums stream each graph into a cached accumulator when there is a graph per
    thread and the accumulator fits in L2, and gather the rows otherwise: both agree, and both
    reject a repeated index."""
    batch, k, n, features = shape
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        perm = random_perm(batch, k, n)
        y = torch.randn(batch, k, n, *features, dtype=torch.float64, requires_grad=True)
        compare_backends("unpermute_mean", [y, perm, None], cpu_backend)
        x = torch.randn(batch, n, *features, dtype=torch.float64, requires_grad=True)
        compare_backends("permute_nodes", [x, perm, None], cpu_backend, exact_forward=True)
        perm[batch - 1, k - 1, 0] = perm[batch - 1, k - 1, 1]
        with pytest.raises(ValueError, match="repeated"):
            torch.ops.lps_fast.unpermute_mean(y.detach(), perm, None)
    finally:
        torch.set_num_threads(previous)


EDGE_SHAPES = [s for s in SHAPES if s[2] <= 64] + [(1, 4, 188, (1,))]


@pytest.mark.parametrize("with_soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=shape_id)
def test_permute_edges(cpu_backend, shape, dtype, with_soft):
    batch, k, n, features = shape
    perm = random_perm(batch, k, n)
    e = torch.randn(batch, n, n, *features, dtype=dtype, requires_grad=True)
    soft = random_soft(batch, k, n, dtype=dtype).requires_grad_() if with_soft else None
    features_size = int(torch.tensor(features).prod()) if features else 1
    compare_backends("permute_edges", [e, perm, soft], cpu_backend, exact_forward=True,
                     **soft_grad_tolerance(dtype, with_soft, n * features_size))


# One-word edge cells (one float or double channel, two float channels) up to 128 (float) or 64
# (8-byte cells) nodes are permuted in registers on AVX-512 CPUs; the sizes straddle each table
# size (16, 32, 48, 64 words and beyond the largest).
REGISTER_EDGE_SHAPES = [(2, 3, n, features) for n in (16, 17, 33, 64, 65, 100, 128, 129) for features in ((), (2,))]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", REGISTER_EDGE_SHAPES, ids=shape_id)
def test_edge_cells_in_registers(cpu_backend, shape, dtype):
    batch, k, n, features = shape
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the scatter's register form needs a graph per thread
    try:
        perm = random_perm(batch, k, n)
        e = torch.randn(batch, n, n, *features, dtype=dtype, requires_grad=True)
        compare_backends("permute_edges", [e, perm, None], cpu_backend, exact_forward=True)
        y = torch.randn(batch, k, n, n, *features, dtype=dtype, requires_grad=True)
        compare_backends("unpermute_edges_mean", [y, perm, None, False], cpu_backend)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diagonal"])
@pytest.mark.parametrize("with_soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=shape_id)
def test_unpermute_edges_mean(cpu_backend, shape, dtype, with_soft, diagonal):
    batch, k, n, features = shape
    perm = random_perm(batch, k, n)
    y = torch.randn(batch, k, n, n, *features, dtype=dtype, requires_grad=True)
    soft = random_soft(batch, k, n, dtype=dtype).requires_grad_() if with_soft else None
    features_size = int(torch.tensor(features).prod()) if features else 1
    compare_backends("unpermute_edges_mean", [y, perm, soft, diagonal], cpu_backend,
                     **soft_grad_tolerance(dtype, with_soft, n * features_size))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_half_precision(cpu_backend, dtype):
    batch, k, n = 2, 3, 9
    perm = random_perm(batch, k, n)
    x = torch.randn(batch, n, 4, dtype=dtype, requires_grad=True)
    compare_backends("permute_nodes", [x, perm, None], cpu_backend, exact_forward=True)
    e = torch.randn(batch, n, n, 2, dtype=dtype, requires_grad=True)
    compare_backends("permute_edges", [e, perm, None], cpu_backend, exact_forward=True)
    # the reference sums in the half dtype; the kernels accumulate in float32
    y = torch.randn(batch, k, n, 4, dtype=dtype, requires_grad=True)
    compare_backends("unpermute_mean", [y, perm, None], cpu_backend)
    ye = torch.randn(batch, k, n, n, 2, dtype=dtype, requires_grad=True)
    compare_backends("unpermute_edges_mean", [ye, perm, None, False], cpu_backend)
    compare_backends("unpermute_edges_mean", [ye, perm, None, True], cpu_backend)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_gathers_of_non_float_dtypes(cpu_backend, dtype):
    batch, k, n = 2, 3, 11
    perm = random_perm(batch, k, n)
    labels = torch.randint(0, 2 if dtype == torch.bool else 100, (batch, n, 2)).to(dtype)
    adjacency = torch.randint(0, 2 if dtype == torch.bool else 100, (batch, n, n)).to(dtype)
    compare_backends("permute_nodes", [labels, perm, None], cpu_backend, exact_forward=True)
    compare_backends("permute_edges", [adjacency, perm, None], cpu_backend, exact_forward=True)


def test_non_contiguous_inputs(cpu_backend):
    batch, k, n = 3, 4, 13
    perm = torch.empty(batch, k, n, 2, dtype=torch.long)[..., 0]  # a strided perm
    perm.copy_(random_perm(batch, k, n))
    assert not perm.is_contiguous()
    x = torch.randn(batch, 5, n).transpose(1, 2).requires_grad_()  # (B, n, 5), strided
    compare_backends("permute_nodes", [x, perm, None], cpu_backend, exact_forward=True)
    e = torch.randn(batch, n, n, 3).transpose(1, 2).requires_grad_()
    compare_backends("permute_edges", [e, perm, None], cpu_backend, exact_forward=True)
    y = torch.randn(batch, n, k, 4).transpose(1, 2).requires_grad_()
    soft = random_soft(batch, k, n).transpose(-1, -2).requires_grad_()
    compare_backends("unpermute_mean", [y, perm, soft], cpu_backend)
    ye = torch.randn(batch, k, n, 2, n).transpose(-1, -2).requires_grad_()
    compare_backends("unpermute_edges_mean", [ye, perm, None, False], cpu_backend)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)], ids=["B0", "k0", "n0"])
def test_zero_size(cpu_backend, shape):
    batch, k, n = shape
    perm = random_perm(batch, k, n)
    with lps_fast.use_backend(cpu_backend):
        out = lps_fast.permute_nodes(torch.randn(batch, n, 2), perm)
        assert out.shape == (batch, k, n, 2)
        assert lps_fast.permute_edges(torch.randn(batch, n, n), perm).shape == (batch, k, n, n)
        if k > 0:
            assert lps_fast.unpermute_mean(torch.randn(batch, k, n, 2), perm).shape == (batch, n, 2)
            out = lps_fast.unpermute_edges_mean(torch.randn(batch, k, n, n), perm, diagonal=True)
            assert out.shape == (batch, n)


def test_kernel_rejects_bad_perm_values(cpu_backend):
    """The kernels validate perm themselves: also when called through torch.ops directly."""
    x = torch.randn(2, 4, 3)
    bad = random_perm(2, 3, 4)
    bad[1, 2, 3] = 7
    with pytest.raises(ValueError, match=r"perm\[1, 2\] is not one \(entry 3 is 7, out of range\)"):
        torch.ops.lps_fast.permute_nodes(x, bad)
    bad = random_perm(2, 3, 4)
    bad[0, 1, 0] = bad[0, 1, 2]
    with pytest.raises(ValueError, match=r"perm\[0, 1\] is not one .*repeated"):
        torch.ops.lps_fast.unpermute_mean(torch.randn(2, 3, 4, 3), bad)
    with pytest.raises(ValueError, match="perm must have shape"):
        torch.ops.lps_fast.permute_edges(torch.randn(2, 4, 4), random_perm(2, 3, 5))


@pytest.mark.parametrize("n", [5, 64, 65, 130])
def test_kernels_reject_each_kind_of_bad_row(cpu_backend, n):
    """The validation (a bitmap check per row, vectorized up to 64 nodes) finds a negative entry,
    one past the end and a repeat, in the last row as well as the first, and names the first bad
    row and entry."""
    for row, value, message in [((0, 0), -1, "out of range"), ((1, 2), n, "out of range"), ((1, 2), None, "repeated")]:
        bad = random_perm(2, 3, n)
        bad[row][n - 1] = bad[row][0] if value is None else value
        pattern = rf"perm\[{row[0]}, {row[1]}\] is not one .*{message}"
        with pytest.raises(ValueError, match=pattern):
            torch.ops.lps_fast.permute_nodes(torch.randn(2, n, 3), bad, None)
        with pytest.raises(ValueError, match=pattern):
            torch.ops.lps_fast.frame_apply(torch.randn(2, n, 3, 1), torch.eye(3).expand(2, 3, 3, 3).contiguous(), bad,
                                           None, None)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    k=st.integers(1, 5),
    n=st.integers(1, 24),
    features=st.lists(st.integers(1, 4), max_size=2),
    with_soft=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_agreement(cpu_backend, batch, k, n, features, with_soft, seed):
    torch.manual_seed(seed)
    perm = random_perm(batch, k, n)
    f64 = torch.float64
    soft = random_soft(batch, k, n, dtype=f64).requires_grad_() if with_soft else None
    x = torch.randn(batch, n, *features, dtype=f64, requires_grad=True)
    compare_backends("permute_nodes", [x, perm, soft], cpu_backend, exact_forward=True)
    y = torch.randn(batch, k, n, *features, dtype=f64, requires_grad=True)
    compare_backends("unpermute_mean", [y, perm, soft], cpu_backend)
    e = torch.randn(batch, n, n, *features, dtype=f64, requires_grad=True)
    compare_backends("permute_edges", [e, perm, soft], cpu_backend, exact_forward=True)
    ye = torch.randn(batch, k, n, n, *features, dtype=f64, requires_grad=True)
    compare_backends("unpermute_edges_mean", [ye, perm, soft, True], cpu_backend)


def test_round_trip_is_identity(cpu_backend):
    batch, k, n = 4, 6, 30
    perm = random_perm(batch, k, n)
    x = torch.randn(batch, n, 7)
    with lps_fast.use_backend(cpu_backend):
        assert_close(lps_fast.unpermute_mean(lps_fast.permute_nodes(x, perm), perm), x)
        e = torch.randn(batch, n, n, 2)
        assert_close(lps_fast.unpermute_edges_mean(lps_fast.permute_edges(e, perm), perm), e)
