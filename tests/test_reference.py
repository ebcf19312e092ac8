"""The reference path is the specification: pin it with hand-computed cases, identities and
float64 gradient checks."""

import math

import pytest
import torch
from helpers import assert_close, random_perm, random_soft

from lps_fast import reference as ref

# ---------------------------------------------------------------------------------------------
# Hand-computed tiny cases


def test_permute_nodes_by_hand():
    x = torch.tensor([[[10.0], [20.0], [30.0]]])  # B=1, n=3, F=1
    perm = torch.tensor([[[2, 0, 1], [0, 1, 2]]])  # k=2
    out = ref.permute_nodes(x, perm)
    expected = torch.tensor([[[[30.0], [10.0], [20.0]], [[10.0], [20.0], [30.0]]]])
    assert_close(out, expected, exact=True)


def test_permute_edges_by_hand():
    e = torch.tensor([[10.0 * i + j for j in range(3)] for i in range(3)])[None]  # e[i, j] = 10 i + j
    perm = torch.tensor([[[2, 0, 1]]])
    out = ref.permute_edges(e, perm)
    expected = torch.tensor([[22.0, 20.0, 21.0], [2.0, 0.0, 1.0], [12.0, 10.0, 11.0]])[None, None]
    assert_close(out, expected, exact=True)


def test_unpermute_mean_by_hand():
    y = torch.tensor([[[1.0, 2.0], [5.0, 4.0]]])  # B=1, k=2, n=2
    perm = torch.tensor([[[1, 0], [0, 1]]])
    # sample 0: out[1] += 1, out[0] += 2; sample 1: out[0] += 5, out[1] += 4; halve.
    assert_close(ref.unpermute_mean(y, perm), torch.tensor([[3.5, 2.5]]), exact=True)


def test_unpermute_edges_mean_by_hand():
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]  # B=1, k=1
    perm = torch.tensor([[[1, 0]]])
    # out[p(r), p(s)] = y[r, s] with p = (1, 0): out = [[4, 3], [2, 1]]
    assert_close(ref.unpermute_edges_mean(y, perm), torch.tensor([[[4.0, 3.0], [2.0, 1.0]]]), exact=True)
    assert_close(ref.unpermute_edges_mean(y, perm, diagonal=True), torch.tensor([[4.0, 1.0]]), exact=True)


def _rotation_z90(dtype=torch.float32):
    # Columns are the frame axes: e_x -> e_y, e_y -> -e_x.
    return torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=dtype)


def test_frame_apply_by_hand():
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])[None, :, :, None]  # B=1, n=2, 3, C=1
    R = _rotation_z90()[None, None]
    center = torch.tensor([1.0, 1.0, 0.0])[None, :, None]
    perm = torch.tensor([[[1, 0]]])
    out = ref.frame_apply(x, R, perm=perm, center=center)
    # position 0 holds node 1: R^T ((0, 2, 0) - (1, 1, 0)) = R^T (-1, 1, 0) = (1, 1, 0)
    # position 1 holds node 0: R^T ((1, 0, 0) - (1, 1, 0)) = R^T (0, -1, 0) = (-1, 0, 0)
    expected = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])[None, None, :, :, None]
    assert_close(out, expected, exact=True)


def test_frame_unapply_mean_by_hand():
    y = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])[None, None, :, :, None]
    R = _rotation_z90()[None, None]
    center = torch.tensor([1.0, 1.0, 0.0])[None, :, None]
    perm = torch.tensor([[[1, 0]]])
    out = ref.frame_unapply_mean(y, R, perm=perm, center=center)
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])[None, :, :, None]
    assert_close(out, expected, exact=True)


def test_sinkhorn_sort_by_hand():
    scores = torch.tensor([[[3.0, 4.0]]], dtype=torch.float64)
    soft, perm = ref.sinkhorn_sort(scores, tau=1.0, n_iter=5)
    # s_hat = (0.6, 0.8), sorted (0.8, 0.6): L = [[-0.2, 0], [0, -0.2]], already balanced.
    a = math.exp(-0.2) / (1.0 + math.exp(-0.2))
    expected = torch.tensor([[a, 1 - a], [1 - a, a]], dtype=torch.float64)[None, None]
    assert perm.tolist() == [[[1, 0]]]
    assert perm.dtype == torch.int64
    assert_close(soft, expected)


def test_sinkhorn_sort_masked_by_hand():
    scores = torch.tensor([[[3.0, 7.0, 4.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True]])
    soft, perm = ref.sinkhorn_sort(scores, tau=1.0, n_iter=5, mask=mask)
    # the padded node (index 1) sorts last; the real 2 x 2 block is the unmasked case above
    assert perm.tolist() == [[[2, 0, 1]]]
    a = math.exp(-0.2) / (1.0 + math.exp(-0.2))
    # node 0 (0.6) is nearer position 1 (0.6) than position 0 (0.8); node 2 the other way round
    expected = torch.tensor([[a, 1 - a, 0.0], [0.0, 0.0, 0.0], [1 - a, a, 0.0]], dtype=torch.float64)
    assert_close(soft[0, 0], expected)
    assert soft[0, 0, 1].abs().sum() == 0 and soft[0, 0, :, 2].abs().sum() == 0


def test_permutation_entropy_by_hand():
    a = 0.3
    soft = torch.tensor([[a, 1 - a], [1 - a, a]], dtype=torch.float64)[None, None]
    h = -(a * math.log(a) + (1 - a) * math.log(1 - a))
    # every row and column has entropy h: per node 2h, averaged
    assert ref.permutation_entropy(soft).item() == pytest.approx(2 * h, rel=1e-12)
    hard = torch.eye(2, dtype=torch.float64)[None, None]
    # 1e-12 clamps: entropy of a hard permutation is ~0
    assert ref.permutation_entropy(hard).item() == pytest.approx(0.0, abs=1e-9)


def test_permutation_entropy_masked_by_hand():
    a = 0.3
    soft = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    soft[0, 0, :2, :2] = torch.tensor([[a, 1 - a], [1 - a, a]], dtype=torch.float64)
    soft[0, 0, 2, 2] = 0.9  # a padded entry must not count
    mask = torch.tensor([[True, True, False]])
    h = -(a * math.log(a) + (1 - a) * math.log(1 - a))
    assert ref.permutation_entropy(soft, mask).item() == pytest.approx(2 * h, rel=1e-12)


def test_gram_schmidt_by_hand():
    V = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert_close(ref.gram_schmidt(V), torch.eye(3, dtype=torch.float64))
    # columns (0, 2, 0), (1, 0, 0), (0, 0, 3): det = -1, so proper flips column 0
    W = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    improper = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert_close(ref.gram_schmidt(W), improper)
    proper = improper.clone()
    proper[:, 0] *= -1
    assert_close(ref.gram_schmidt(W, proper=True), proper)


# ---------------------------------------------------------------------------------------------
# Identities


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n,k", [(1, 1), (5, 3), (12, 4)], ids=lambda v: str(v))
def test_round_trips(n, k, dtype):
    batch = 2
    perm = random_perm(batch, k, n)
    x = torch.randn(batch, n, 4, dtype=dtype)
    assert_close(ref.unpermute_mean(ref.permute_nodes(x, perm), perm), x)
    e = torch.randn(batch, n, n, 2, dtype=dtype)
    assert_close(ref.unpermute_edges_mean(ref.permute_edges(e, perm), perm), e)
    diag = torch.diagonal(e, dim1=1, dim2=2).movedim(-1, 1)
    assert_close(ref.unpermute_edges_mean(ref.permute_edges(e, perm), perm, diagonal=True), diag)
    points = torch.randn(batch, n, 3, 2, dtype=dtype)
    R = ref.gram_schmidt(torch.randn(batch, k, 3, 3, dtype=dtype))
    center = torch.randn(batch, 3, 2, dtype=dtype)
    for p in (None, perm):
        moved = ref.frame_apply(points, R, perm=p, center=center)
        assert_close(ref.frame_unapply_mean(moved, R, perm=p, center=center), points)


def test_permute_edges_is_HtEH():
    batch, k, n = 2, 3, 6
    perm = random_perm(batch, k, n)
    e = torch.randn(batch, n, n, dtype=torch.float64)
    H = ref.permutation_matrix(perm, torch.float64)
    assert_close(ref.permute_edges(e, perm), H.transpose(-1, -2) @ e[:, None] @ H, exact=True)
    assert_close(ref.permute_nodes(e, perm), H.transpose(-1, -2) @ e[:, None], exact=True)


def test_gathers_match_indexing_and_integers():
    batch, k, n = 3, 2, 7
    perm = random_perm(batch, k, n)
    x = torch.randn(batch, n, 2, 3)
    b = torch.arange(batch)[:, None, None]
    assert_close(ref.permute_nodes(x, perm), x[b, perm], exact=True)
    e = torch.randn(batch, n, n, 2)
    b4 = b[..., None]
    assert_close(ref.permute_edges(e, perm), e[b4, perm[..., :, None], perm[..., None, :]], exact=True)
    labels = torch.randint(0, 9, (batch, n))
    assert_close(ref.permute_nodes(labels, perm), labels[b, perm], exact=True)
    adjacency = torch.rand(batch, n, n) > 0.5
    assert_close(ref.permute_edges(adjacency, perm), adjacency[b4, perm[..., :, None], perm[..., None, :]], exact=True)


def test_soft_does_not_change_the_forward_value():
    batch, k, n = 2, 3, 9
    perm = random_perm(batch, k, n)
    soft = random_soft(batch, k, n)
    x = torch.randn(batch, n, 5)
    assert_close(ref.permute_nodes(x, perm, soft), ref.permute_nodes(x, perm), exact=True)
    e = torch.randn(batch, n, n, 2)
    assert_close(ref.permute_edges(e, perm, soft), ref.permute_edges(e, perm), exact=True)


def test_gram_schmidt_orthonormal():
    V = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    for proper in (False, True):
        R = ref.gram_schmidt(V, proper=proper)
        eye = torch.eye(3, dtype=torch.float64).expand_as(R)
        assert_close(R.transpose(-1, -2) @ R, eye)
        det = torch.linalg.det(R)
        if proper:
            assert_close(det, torch.ones_like(det))
        else:
            assert_close(det.abs(), torch.ones_like(det))
    # equivariance: G-S of Q V is Q (G-S of V)
    Q = ref.gram_schmidt(torch.randn(3, 3, dtype=torch.float64))
    assert_close(ref.gram_schmidt(Q @ V), Q @ ref.gram_schmidt(V))


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_sinkhorn_sort_properties(masked):
    batch, k, n = 3, 4, 9
    scores = torch.randn(batch, k, n, dtype=torch.float64)
    mask = None
    if masked:
        n_real = torch.tensor([9, 5, 1])
        mask = torch.arange(n)[None, :] < n_real[:, None]
        mask[1] = mask[1][torch.randperm(n)]  # real nodes need not come first
    soft, perm = ref.sinkhorn_sort(scores, tau=0.3, n_iter=60, mask=mask)
    real = torch.ones(batch, n, dtype=torch.bool) if mask is None else mask
    for b in range(batch):
        nodes = real[b].nonzero().flatten()
        m = len(nodes)
        for j in range(k):
            block = soft[b, j][nodes][:, :m]
            assert_close(block.sum(dim=0), torch.ones(m, dtype=torch.float64), atol=1e-6, rtol=0)
            assert_close(block.sum(dim=1), torch.ones(m, dtype=torch.float64), atol=1e-6, rtol=0)
            # the hard perm lists real nodes by descending score, then padded nodes by index
            order = perm[b, j].tolist()
            real_scores = scores[b, j][order[:m]]
            assert order[:m] and set(order[:m]) == set(nodes.tolist())
            assert bool((real_scores[:-1] >= real_scores[1:]).all())
            padded = [i for i in range(n) if not real[b, i]]
            assert order[m:] == padded
            # padded rows and columns are exactly zero
            assert soft[b, j][~real[b]].abs().sum() == 0
            assert soft[b, j][:, m:].abs().sum() == 0


def test_sinkhorn_sort_ties_keep_index_order():
    scores = torch.tensor([[[1.0, 2.0, 1.0, 2.0]]])
    _, perm = ref.sinkhorn_sort(scores, tau=0.1)
    assert perm.tolist() == [[[1, 3, 0, 2]]]


# ---------------------------------------------------------------------------------------------
# Gradients


def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_permutation_ops():
    batch, k, n = 2, 3, 4
    perm = random_perm(batch, k, n)
    x = torch.randn(batch, n, 2, dtype=torch.float64, requires_grad=True)
    e = torch.randn(batch, n, n, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(batch, k, n, 2, dtype=torch.float64, requires_grad=True)
    ye = torch.randn(batch, k, n, n, 2, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda t: ref.permute_nodes(t, perm), x)
    _gradcheck(lambda t: ref.permute_edges(t, perm), e)
    _gradcheck(lambda t: ref.unpermute_mean(t, perm), y)
    _gradcheck(lambda t: ref.unpermute_edges_mean(t, perm), ye)
    _gradcheck(lambda t: ref.unpermute_edges_mean(t, perm, diagonal=True), ye)


def test_gradcheck_frame_ops():
    batch, k, n, channels = 2, 3, 4, 2
    perm = random_perm(batch, k, n)
    x = torch.randn(batch, n, 3, channels, dtype=torch.float64, requires_grad=True)
    y = torch.randn(batch, k, n, 3, channels, dtype=torch.float64, requires_grad=True)
    R = torch.randn(batch, k, 3, 3, dtype=torch.float64, requires_grad=True)  # any matrix: linear in R
    center = torch.randn(batch, 3, channels, dtype=torch.float64, requires_grad=True)
    for p in (None, perm):
        _gradcheck(lambda a, b, c: ref.frame_apply(a, b, perm=p, center=c), x, R, center)
        _gradcheck(lambda a, b, c: ref.frame_unapply_mean(a, b, perm=p, center=c), y, R, center)


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_gradcheck_sinkhorn_entropy_gram_schmidt(masked):
    batch, k, n = 2, 2, 4
    mask = torch.tensor([[True, True, True, True], [True, False, True, False]]) if masked else None
    scores = torch.randn(batch, k, n, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda s: ref.sinkhorn_sort(s, 0.5, 4, mask)[0], scores)
    soft = random_soft(batch, k, n, dtype=torch.float64).requires_grad_()
    _gradcheck(lambda s: ref.permutation_entropy(s, mask), soft)
    V = torch.randn(batch, k, 3, 3, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda v: ref.gram_schmidt(v), V)
    _gradcheck(lambda v: ref.gram_schmidt(v, proper=True), V)


def test_masked_sinkhorn_gradient_is_finite_and_zero_on_padding():
    mask = torch.tensor([[True, False, True, True, False]])
    scores = torch.randn(1, 3, 5, requires_grad=True)
    soft, _ = ref.sinkhorn_sort(scores, 0.2, 10, mask)
    (soft * torch.randn_like(soft)).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[:, :, ~mask[0]].abs().sum() == 0


def _dense_soft_gradient(fn_of_H, perm, upstream, dtype=torch.float64):
    """Gradient of a dense formula w.r.t. H, evaluated at the hard H (the ST definition)."""
    H = ref.permutation_matrix(perm, dtype).requires_grad_()
    out = fn_of_H(H)
    (grad,) = torch.autograd.grad(out, H, upstream)
    return grad


def test_straight_through_gradients_match_spec_formulas():
    batch, k, n, features = 2, 3, 5, 2
    perm = random_perm(batch, k, n)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(batch, n, features, **f64)
    e = torch.randn(batch, n, n, features, **f64)
    y = torch.randn(batch, k, n, features, **f64)
    ye = torch.randn(batch, k, n, n, features, **f64)

    def st_grad(op, inp, upstream, **kwargs):
        soft = random_soft(batch, k, n, **f64).requires_grad_()
        out = op(inp, perm, soft, **kwargs)
        (grad,) = torch.autograd.grad(out, soft, upstream)
        return grad

    G = torch.randn(batch, k, n, features, **f64)
    # permute_nodes: dS[i, r] = <x[i], G[r]>
    assert_close(st_grad(ref.permute_nodes, x, G), torch.einsum("bif,bjrf->bjir", x, G))
    # permute_edges: dS[i, r] = sum_s <e[i, p(s)], G[r, s]> + sum_s <e[p(s), i], G[s, r]>
    Ge = torch.randn(batch, k, n, n, features, **f64)
    b = torch.arange(batch)[:, None, None, None]
    p_s = perm[:, :, None, :]  # [b, j, ., s]
    i_idx = torch.arange(n)[None, None, :, None]
    e_i_ps = e[b, i_idx, p_s]  # [b, j, i, s, f] = e[i, p(s)]
    e_ps_i = e[b, p_s, i_idx]  # [b, j, i, s, f] = e[p(s), i]
    expected = torch.einsum("bjisf,bjrsf->bjir", e_i_ps, Ge) + torch.einsum("bjisf,bjsrf->bjir", e_ps_i, Ge)
    assert_close(st_grad(ref.permute_edges, e, Ge), expected)
    # unpermute_mean: dS[j, i, r] = <G[i], y[j, r]> / k
    Gn = torch.randn(batch, n, features, **f64)
    assert_close(st_grad(ref.unpermute_mean, y, Gn), torch.einsum("bif,bjrf->bjir", Gn, y) / k)
    # the edge and diagonal variants: the dense formula's gradient at H
    Gee = torch.randn(batch, n, n, features, **f64)
    dense = _dense_soft_gradient(
        lambda H: torch.einsum("bjir,bjrs...,bjus->biu...", H, ye, H) / k, perm, Gee
    )
    assert_close(st_grad(ref.unpermute_edges_mean, ye, Gee), dense)
    dense_diag = _dense_soft_gradient(
        lambda H: torch.einsum("bjir,bjrs...,bjis->bi...", H, ye, H) / k, perm, Gn
    )
    assert_close(st_grad(ref.unpermute_edges_mean, ye, Gn, diagonal=True), dense_diag)
