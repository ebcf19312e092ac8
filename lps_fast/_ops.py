"""torch.library registration of the fast ops: schemas, fake kernels and autograd formulas.

Every op of docs/SPEC.md ("Ops" and "Distribution-side ops") is declared once here as
``lps_fast::<op>`` with the public signature. The compiled extensions register its CPU and CUDA
kernels (``TORCH_LIBRARY_IMPL`` in ``csrc/``); the Triton kernels (``kernels/``) define ``lps_fast::<op>_triton`` with the same
schema through ``triton_op``. Both get the same autograd formulas from :func:`register_autograd`,
written against an :class:`OpSet` so that a backward pass runs on the provider of its forward.

The backward passes reuse the forward kernels, since the gathers and scatters are each other's
adjoints: d(permute_nodes)/dx is a scatter-sum (``unpermute_mean * k``), d(unpermute_mean)/dy is a
gather (``permute_nodes(G / k)``), and likewise for edges and frames. The straight-through
gradients w.r.t. ``soft`` are batched matrix products of gathered data, never dense
permutation-matrix products. ``sinkhorn_sort``, ``permutation_entropy`` and ``gram_schmidt``
have dedicated ``*_backward`` kernels, and on CPU tensors the compiled provider runs each frame
backward pass as one fused kernel (``CPU_BACKWARD_SCHEMAS``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch

NAMESPACE = "lps_fast"

# Public ops, with the schema every provider implements.
SCHEMAS: Dict[str, str] = {
    "permute_nodes": "(Tensor x, Tensor perm, Tensor? soft=None) -> Tensor",
    "permute_edges": "(Tensor e, Tensor perm, Tensor? soft=None) -> Tensor",
    "unpermute_mean": "(Tensor y, Tensor perm, Tensor? soft=None) -> Tensor",
    "unpermute_edges_mean": "(Tensor y, Tensor perm, Tensor? soft=None, bool diagonal=False) -> Tensor",
    "frame_apply": "(Tensor x, Tensor R, Tensor? perm=None, Tensor? center=None, Tensor? soft=None) -> Tensor",
    "frame_unapply_mean": "(Tensor y, Tensor R, Tensor? perm=None, Tensor? center=None, Tensor? soft=None) -> Tensor",
    "sinkhorn_sort": "(Tensor scores, float tau, int n_iter=20, Tensor? mask=None) -> (Tensor, Tensor)",
    "permutation_entropy": "(Tensor soft, Tensor? mask=None) -> Tensor",
    "gram_schmidt": "(Tensor V, bool proper=False) -> Tensor",
}

# Kernels that only backward passes call.
BACKWARD_SCHEMAS: Dict[str, str] = {
    "sinkhorn_sort_backward": "(Tensor grad_soft, Tensor scores, float tau, int n_iter, Tensor? mask) -> Tensor",
    "permutation_entropy_backward": "(Tensor grad, Tensor soft, Tensor? mask) -> Tensor",
    "gram_schmidt_backward": "(Tensor grad, Tensor V, bool proper) -> Tensor",
}

# Fused backward kernels of the compiled CPU provider alone; other providers compose the same
# gradients from their forward kernels.
CPU_BACKWARD_SCHEMAS: Dict[str, str] = {
    "permute_nodes_backward": "(Tensor grad, Tensor perm) -> Tensor",
    "permute_edges_backward": "(Tensor grad, Tensor perm) -> Tensor",
    "unpermute_mean_backward": "(Tensor grad, Tensor perm) -> Tensor",
    "unpermute_edges_mean_diagonal_backward": "(Tensor grad, Tensor perm) -> Tensor",
    "frame_apply_backward": "(Tensor grad, Tensor x, Tensor R, Tensor? perm, Tensor? center) -> (Tensor, Tensor)",
    "frame_unapply_mean_backward": "(Tensor grad, Tensor y, Tensor R, Tensor? perm) -> (Tensor, Tensor)",
}

# A network-side kernel of the compiled CPU provider, outside the symmetrization ops: the fused
# vector-neuron layer of the learned distribution's network (lps_fast.nn.vn_layer).
NETWORK_SCHEMAS: Dict[str, str] = {
    "vn_layer": "(Tensor p, Tensor d, Tensor? p_centre, Tensor? d_centre, Tensor? neighbours, Tensor? pool, "
                "Tensor? mask, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var, float eps, "
                "float slope) -> (Tensor, Tensor, Tensor)",
    "vn_layer_backward": "(Tensor grad, Tensor p, Tensor d, Tensor? p_centre, Tensor? d_centre, Tensor? neighbours, "
                         "Tensor selected, Tensor? mask, Tensor weight, Tensor bias, Tensor stats, bool training, "
                         "float eps, float slope) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    # x (..., K) @ w (K, M), the vector-neuron layers' stacked maps (csrc/vn_matmul.cpp), and the
    # gradients: x's (empty unless input_grad) and w's
    "vn_matmul": "(Tensor x, Tensor w) -> Tensor",
    "vn_matmul_backward": "(Tensor grad, Tensor x, Tensor w, bool input_grad) -> (Tensor, Tensor)",
    # the DGCNN's invariant per-node scores (lps_fast.nn.VNDGCNN): frame coordinates, max-pool, head
    "vn_score_head": "(Tensor x, Tensor frame, Tensor pair, Tensor? mask, Tensor weight, Tensor bias) -> Tensor",
    "vn_score_head_backward": "(Tensor grad, Tensor x, Tensor frame, Tensor pair, Tensor? mask, Tensor weight) "
                              "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    # indices (N, n, k) of each node's k nearest nodes by the flattened features of v (N, n, ...),
    # itself first (lps_fast.nn.knn_neighbours; the whole-network op runs the same kernel)
    "vn_knn": "(Tensor v, int k, Tensor? mask) -> Tensor",
    # the whole VNDGCNN in one call each way (csrc/vn_dgcnn.cpp): params in the order of
    # VNDGCNN._whole_network_params, running (mean, var) of each batch norm updated in place,
    # dropout the two keep masks (empty: none); returns frame, scores and the backward's values
    "vn_dgcnn": "(Tensor points, Tensor? mask, Tensor[] params, Tensor(a!)[] running, Tensor[] dropout, "
                "int neighbours, float slope, float eps, float momentum, bool training, bool scores) "
                "-> (Tensor, Tensor, Tensor[])",
    "vn_dgcnn_backward": "(Tensor grad_frame, Tensor grad_scores, Tensor points, Tensor? mask, Tensor[] params, "
                         "Tensor[] dropout, Tensor[] saved, int neighbours, float slope, float eps, bool training, "
                         "bool scores) -> Tensor[]",
}

OP_NAMES = tuple(SCHEMAS)

# Ops whose backward needs another op of the same provider: a provider offers them together.
FAMILIES: Dict[str, tuple] = {
    "permute_nodes": ("permute_nodes", "unpermute_mean"),
    "unpermute_mean": ("permute_nodes", "unpermute_mean"),
    "permute_edges": ("permute_edges", "unpermute_edges_mean", "permute_nodes"),
    "unpermute_edges_mean": ("permute_edges", "unpermute_edges_mean", "permute_nodes"),
    "frame_apply": ("frame_apply", "frame_unapply_mean", "permute_nodes"),
    "frame_unapply_mean": ("frame_apply", "frame_unapply_mean", "permute_nodes"),
    "sinkhorn_sort": ("sinkhorn_sort", "sinkhorn_sort_backward"),
    "permutation_entropy": ("permutation_entropy", "permutation_entropy_backward"),
    "gram_schmidt": ("gram_schmidt", "gram_schmidt_backward"),
}


def qualified(name: str) -> str:
    return f"{NAMESPACE}::{name}"


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels: output shapes and dtypes only. Shared by every provider. Every kernel
# returns a freshly allocated contiguous tensor whatever the input's strides, so the fakes use
# new_empty(shape) (contiguous), never empty_like (which copies a transposed input's strides).


def fake_permute_nodes(x, perm, soft=None):
    return x.new_empty((x.shape[0], perm.shape[1], *x.shape[1:]))


def fake_permute_edges(e, perm, soft=None):
    return e.new_empty((e.shape[0], perm.shape[1], *e.shape[1:]))


def fake_unpermute_mean(y, perm, soft=None):
    return y.new_empty((y.shape[0], *y.shape[2:]))


def fake_unpermute_edges_mean(y, perm, soft=None, diagonal=False):
    if diagonal:
        return y.new_empty((y.shape[0], y.shape[2], *y.shape[4:]))
    return y.new_empty((y.shape[0], *y.shape[2:]))


def fake_frame_apply(x, R, perm=None, center=None, soft=None):
    return x.new_empty((x.shape[0], R.shape[1], *x.shape[1:]))


def fake_frame_unapply_mean(y, R, perm=None, center=None, soft=None):
    return y.new_empty((y.shape[0], *y.shape[2:]))


def fake_sinkhorn_sort(scores, tau, n_iter=20, mask=None):
    batch, k, n = scores.shape
    return scores.new_empty((batch, k, n, n)), scores.new_empty((batch, k, n), dtype=torch.int64)


# Every provider returns contiguous outputs, whatever the input's strides: so do the fakes
# (``empty_like`` would keep a transposed input's strides and fail torch.compile's stride check).


def fake_sinkhorn_sort_backward(grad_soft, scores, tau, n_iter, mask):
    return scores.new_empty(scores.shape)


def fake_permute_nodes_backward(grad, perm):
    return grad.new_empty((grad.shape[0], *grad.shape[2:]))


fake_permute_edges_backward = fake_permute_nodes_backward


def fake_unpermute_mean_backward(grad, perm):
    return grad.new_empty((grad.shape[0], perm.shape[1], *grad.shape[1:]))


def fake_unpermute_edges_mean_diagonal_backward(grad, perm):
    batch, k, n = perm.shape
    return grad.new_empty((batch, k, n, n, *grad.shape[2:]))


def fake_frame_apply_backward(grad, x, R, perm, center):
    return x.new_empty(x.shape), R.new_empty(R.shape)


def fake_frame_unapply_mean_backward(grad, y, R, perm):
    return y.new_empty(y.shape), R.new_empty(R.shape)


def fake_permutation_entropy(soft, mask=None):
    return soft.new_empty(())


def fake_permutation_entropy_backward(grad, soft, mask):
    return soft.new_empty(soft.shape)


def fake_gram_schmidt(V, proper=False):
    return V.new_empty(V.shape)


def fake_gram_schmidt_backward(grad, V, proper):
    return V.new_empty(V.shape)


def fake_vn_knn(v, k, mask):
    return v.new_empty((v.shape[0], v.shape[1], min(k, v.shape[1])), dtype=torch.long)


def fake_vn_matmul(x, w):
    return x.new_empty((*x.shape[:-1], w.shape[1]))


def fake_vn_matmul_backward(grad, x, w, input_grad):
    return x.new_empty(x.shape if input_grad else (0,)), w.new_empty(w.shape)


def fake_vn_layer(p, d, p_centre, d_centre, neighbours, pool, mask, weight, bias, running_mean, running_var, eps,
                  slope):
    selected = (p.new_empty((p.shape[0], p.shape[1], p.shape[3]), dtype=torch.int64) if neighbours is not None
                else p.new_empty((0,), dtype=torch.int64))
    return p.new_empty(p.shape), selected, p.new_empty((2, p.shape[3]))


def fake_vn_layer_backward(grad, p, d, p_centre, d_centre, neighbours, selected, mask, weight, bias, stats, training,
                           eps, slope):
    return (p.new_empty(p.shape), d.new_empty(d.shape),
            p.new_empty(p.shape if p_centre is not None else (0,)),
            d.new_empty(d.shape if d_centre is not None else (0,)),
            weight.new_empty(weight.shape), bias.new_empty(bias.shape))


def fake_vn_score_head(x, frame, pair, mask, weight, bias):
    return x.new_empty(x.shape[:2])


def fake_vn_score_head_backward(grad, x, frame, pair, mask, weight):
    return (x.new_empty(x.shape), frame.new_empty(frame.shape), pair.new_empty(pair.shape),
            weight.new_empty(weight.shape), weight.new_empty((1,)))


def fake_vn_dgcnn(points, mask, params, running, dropout, neighbours, slope, eps, momentum, training, scores):
    N, n, _, _ = points.shape
    C, K = params[0].shape[0], min(neighbours, n)

    def edge(inputs):
        return [points.new_empty((N, n, K), dtype=torch.int64), points.new_empty((N, n, 3, 4 * C)),
                points.new_empty((N, n, C), dtype=torch.int64), points.new_empty((2, C)),
                points.new_empty((inputs, 4 * C))]

    def node(layer, inputs):
        out = layer[0].shape[0] + layer[1].shape[0]
        return [points.new_empty((N * n, 1, 3, out)), points.new_empty((2, layer[0].shape[0])),
                points.new_empty((inputs, out))]

    keep = dropout[0].numel() > 0
    saved = [points.new_empty((0,) if scores else (N, n, 3, C)), points.new_empty((N, n, 3, C) if keep else (0,)),
             points.new_empty((N, C), dtype=torch.int64), points.new_empty((N, 3, C))]
    saved += edge(points.shape[3]) + edge(C)
    frame = points.new_empty((N, 3, 3))
    if not scores:
        return frame, points.new_empty((0,)), saved
    C1, C2 = params[16].shape[0], params[20].shape[0]
    saved += [points.new_empty((N, n, 3, 2 * C)), points.new_empty((N, n, 3, 2 * C)), points.new_empty((N, n, 3, C1)),
              points.new_empty((N, n, 3, C2)), points.new_empty((N, n, 3, 3))]
    saved += node(params[12:14], 2 * C) + node(params[16:18], 2 * C) + node(params[20:22], C1)
    return frame, points.new_empty((N, n)), saved


def fake_vn_dgcnn_backward(grad_frame, grad_scores, points, mask, params, dropout, saved, neighbours, slope, eps,
                           training, scores):
    no_gradient = {4, 9, 10} | (set() if scores else {5, 6, 7, 8})
    return [p.new_empty((0,) if i in no_gradient else p.shape) for i, p in enumerate(params)]


FAKES: Dict[str, Callable] = {
    name: globals()[f"fake_{name}"]
    for name in list(SCHEMAS) + list(BACKWARD_SCHEMAS) + list(CPU_BACKWARD_SCHEMAS) + list(NETWORK_SCHEMAS)
}


# --------------------------------------------------------------------------------------------
# Autograd formulas, written once for every provider.


class OpSet:
    """The ops of one provider: ``OpSet("")`` is the compiled extension, ``OpSet("_triton")``
    the Triton kernels. Backward passes call the same provider's kernels."""

    def __init__(self, suffix: str):
        self.suffix = suffix

    def __getattr__(self, name: str):
        return getattr(getattr(torch.ops, NAMESPACE), name + self.suffix)


def _flat_features(t: torch.Tensor, leading: int) -> torch.Tensor:
    """View ``t`` as ``[*t.shape[:leading], F]`` with all trailing feature dims folded."""
    return t.reshape(*t.shape[:leading], -1)


def _shared_left_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[b, j, i, r] = <a[b, i], b[b, j, r]>`` for a: [B, n, D] shared by the k samples of
    b: [B, k, n, D]: one bmm per graph with the samples folded into the GEMM's N dimension, so
    ``a`` is never copied k times."""
    batch, k, n, depth = b.shape
    product = torch.bmm(a, b.reshape(batch, k * n, depth).transpose(1, 2))  # [B, n, k * n]
    return product.view(batch, a.shape[1], k, n).transpose(1, 2)  # [B, k, n, n]


def _node_soft_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``dS[b, j, i, r] = <a[b, i], b[b, j, r]>`` (a: [B, n, *F], b: [B, k, n, *F])."""
    return _shared_left_gemm(_flat_features(a, 2), _flat_features(b, 3).contiguous())


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inverse[b, j, perm[b, j, r]] = r``: the position of each node, in O(n)."""
    positions = torch.arange(perm.shape[-1], device=perm.device).expand(perm.shape)
    return torch.empty_like(perm).scatter_(-1, perm, positions)


def _edge_soft_grad(ops: "OpSet", a: torch.Tensor, b: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``dS[i, r] = sum_s <a[i, p(s)], b[r, s]> + sum_s <a[p(s), i], b[s, r]>`` per sample.

    ``a``: [B, n, n, *F] (shared by the samples), ``b``: [B, k, n, n, *F]. With u = p(s), q = p^-1
    and r' = p(r) the terms read ``sum_u <a[i, u], P[r', u]>`` and ``sum_u <a[u, i], P[u, r']>``,
    where P[r', u] = b[q(r'), q(u)] is each sample's matrix permuted by its inverse: one pass of
    the provider's permute_edges kernel. Two GEMMs per graph against ``a`` and ``a^T`` (shared by
    the samples, which fold into the GEMM's M dimension) accumulate the transposed result
    [r', i]; a row gather r' = p(r) of that small [B, k, n, n] product finishes it, returned as
    a transposed view.
    """
    batch, k, n = perm.shape
    a = a.reshape(batch, n, n, -1)
    features = a.shape[-1]
    inverse = _inverse_permutation(perm).reshape(batch * k, 1, n)
    permuted = ops.permute_edges(b.reshape(batch * k, n, n, features), inverse, None)
    permuted = permuted.reshape(batch * k, n, n, features)  # [Bk, r', u, F]
    product = torch.bmm(  # [B, (j, r'), i]
        permuted.reshape(batch, k * n, n * features), a.reshape(batch, n, n * features).transpose(1, 2)
    )
    transposed = permuted.transpose(1, 2).reshape(batch, k * n, n * features)  # P[u, r'] at [(j, r'), u]
    product.baddbmm_(transposed, a.transpose(1, 2).reshape(batch, n, n * features).transpose(1, 2))
    rows = ops.permute_nodes(product.reshape(batch * k, n, n), perm.reshape(batch * k, 1, n), None)  # [Bk, 1, r, i]
    return rows.reshape(batch, k, n, n).transpose(2, 3)


def _diagonal_soft_grad(ops: "OpSet", G: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Soft gradient of the diagonal of mean_j H y H^T (without the 1/k).

    ``out[i] = sum_{r,s} H[i,r] y[r,s] H[i,s]``, so ``dH[i, r] = <G[i], y[r, q(i)] + y[q(i), r]>``
    with ``q`` the inverse permutation (the position of node i). With s = q(i) that is
    ``T[r, s] = <y[r, s] + y[s, r], G[p(s)]>`` read at ``[r, q(i)]``: G is gathered to the
    positions (n rows per sample) and y is read in place, where gathering y's columns and rows
    by q wrote two copies of it.
    """
    batch, k, n = perm.shape
    G = G.reshape(batch, n, -1)  # [B, n, F]
    y = y.reshape(batch, k, n, n, -1)
    features = G.shape[-1]
    at = ops.permute_nodes(G, perm, None)  # [b, j, s] = G[p(s)]
    if features <= 4:
        # a few features: one multiply-add per feature and orientation into one buffer, [b, j, r, s]
        # (at PATTERN's size, F = 2, 2 ms against 7 ms for the matmul form below, whose batched
        # (n, F) x (F, 1) products are mostly call overhead)
        by_feature, at_by_feature = y.movedim(-1, 2), at.movedim(-1, 2)  # [b, j, F, r, s], [b, j, F, s]
        contracted = torch.mul(by_feature[:, :, 0], at_by_feature[:, :, 0, None, :])
        for f in range(features):
            if f > 0:
                contracted.addcmul_(by_feature[:, :, f], at_by_feature[:, :, f, None, :])
            contracted.addcmul_(by_feature[:, :, f].transpose(-1, -2), at_by_feature[:, :, f, None, :])
    else:
        # <y[s, r], at[s]> is a matrix-vector product per row s; <y[r, s], at[s]> a broadcast
        by_rows = torch.matmul(y, at[..., None])[..., 0]  # [b, j, s, r]
        contracted = (y * at[:, :, None]).sum(-1) + by_rows.transpose(2, 3)  # [b, j, r, s]
    inverse = _inverse_permutation(perm)
    return torch.gather(contracted.transpose(2, 3), 2, inverse[..., None].expand(batch, k, n, n))  # [b, j, i, r]


def _fused_cpu_backward(ops: "OpSet", grad: torch.Tensor) -> bool:
    """Whether a backward pass runs as its own fused kernel (the compiled CPU provider): the
    frame gradients, the gathers' sums over the samples without a 1/k and a k, and
    unpermute_mean's gather with the 1/k folded in."""
    return ops.suffix == "" and grad.device.type == "cpu"


def _sum_in_float32(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum with at least float32 accumulation: half-precision partial sums lose digits with n."""
    accumulate = torch.promote_types(t.dtype, torch.float32)
    return t.sum(dim=dim, dtype=accumulate).to(t.dtype)


def _without_autocast(backward: Callable) -> Callable:
    """Run a backward formula with autocast off on the devices of its gradients.

    A backward pass called inside ``torch.autocast`` would otherwise run the formulas' GEMMs in
    the autocast dtype while their in-place accumulations (``baddbmm_``) and the kernels keep the
    saved tensors' dtype; the formulas are written for the dtypes of the forward pass.
    """

    def wrapped(ctx, *grads):
        with contextlib.ExitStack() as stack:
            for device in {g.device.type for g in grads if isinstance(g, torch.Tensor)}:
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return backward(ctx, *grads)

    return wrapped


def _kernel_backward(name: str, backward: Callable) -> Callable:
    """The backward formula of op ``name`` as registered: without autocast, and first order only.

    Its formulas run kernels without derivatives of their own, so under ``create_graph=True`` (a
    gradient penalty, say) the gradient would carry no graph and its derivatives would silently
    miss the kernels'; a clear error instead. The reference backend's pure-PyTorch ops and
    composed layers have second derivatives."""

    def first_order(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(f"lps_fast::{name} has no second derivatives (a backward with create_graph=True); "
                               "run it under lps_fast.use_backend('reference'), whose pure-PyTorch path does")
        return backward(ctx, *grads)

    return _without_autocast(first_order)


def _needs_grad(ctx, count: int) -> tuple:
    """``ctx.needs_input_grad`` padded to ``count``: the dispatcher drops trailing arguments that
    equal their defaults (``soft=None``), and those never need a gradient."""
    needs = tuple(ctx.needs_input_grad)
    return needs + (False,) * (count - len(needs))


def register_autograd(ops: OpSet, names=None) -> None:
    """Attach the backward formulas to the public ops ``names`` (default: all) of one provider.

    A provider registers only ops it implements, with every member of their ``FAMILIES``.
    """
    s = ops.suffix
    wanted = set(OP_NAMES if names is None else names)

    def register(name, backward, setup_context):
        if name in wanted:
            torch.library.register_autograd(qualified(name + s), _kernel_backward(name + s, backward),
                                            setup_context=setup_context)

    # ---- permute_nodes: out[j, r] = x[p(r)] --------------------------------------------------
    def setup_permute_nodes(ctx, inputs, output):
        x, perm, soft = inputs
        ctx.k = perm.shape[1]
        ctx.soft_dtype = None if soft is None else soft.dtype
        ctx.save_for_backward(x if soft is not None else None, perm)

    def backward_permute_nodes(ctx, grad):
        x, perm = ctx.saved_tensors
        needs = _needs_grad(ctx, 3)
        grad_x = grad_soft = None
        if needs[0]:
            if _fused_cpu_backward(ops, grad):
                grad_x = ops.permute_nodes_backward(grad, perm)
            else:
                grad_x = ops.unpermute_mean(grad, perm, None) * ctx.k
        if needs[2]:
            grad_soft = _node_soft_grad(x, grad).to(ctx.soft_dtype)
        return grad_x, None, grad_soft

    register("permute_nodes", backward_permute_nodes, setup_permute_nodes)

    # ---- unpermute_mean: out[p(r)] += y[j, r] / k ------------------------------------------
    def setup_unpermute_mean(ctx, inputs, output):
        y, perm, soft = inputs
        ctx.k = y.shape[1]
        ctx.soft_dtype = None if soft is None else soft.dtype
        ctx.save_for_backward(y if soft is not None else None, perm)

    def backward_unpermute_mean(ctx, grad):
        y, perm = ctx.saved_tensors
        needs = _needs_grad(ctx, 3)
        grad_y = grad_soft = None
        if needs[0]:
            if _fused_cpu_backward(ops, grad):
                grad_y = ops.unpermute_mean_backward(grad, perm)
            else:
                grad_y = ops.permute_nodes(grad / ctx.k, perm, None)
        if needs[2]:
            grad_soft = _node_soft_grad(grad / ctx.k, y).to(ctx.soft_dtype)
        return grad_y, None, grad_soft

    register("unpermute_mean", backward_unpermute_mean, setup_unpermute_mean)

    # ---- permute_edges: out[j, r, s] = e[p(r), p(s)] -----------------------------------------
    def setup_permute_edges(ctx, inputs, output):
        e, perm, soft = inputs
        ctx.k = perm.shape[1]
        ctx.soft_dtype = None if soft is None else soft.dtype
        ctx.save_for_backward(e if soft is not None else None, perm)

    def backward_permute_edges(ctx, grad):
        e, perm = ctx.saved_tensors
        needs = _needs_grad(ctx, 3)
        grad_e = grad_soft = None
        if needs[0]:
            if _fused_cpu_backward(ops, grad):
                grad_e = ops.permute_edges_backward(grad, perm)
            else:
                grad_e = ops.unpermute_edges_mean(grad, perm, None, False) * ctx.k
        if needs[2]:
            grad_soft = _edge_soft_grad(ops, e, grad, perm).to(ctx.soft_dtype)
        return grad_e, None, grad_soft

    register("permute_edges", backward_permute_edges, setup_permute_edges)

    # ---- unpermute_edges_mean: out = mean_j H y H^T (or its diagonal) ------------------------
    def setup_unpermute_edges_mean(ctx, inputs, output):
        y, perm, soft, diagonal = inputs
        ctx.k = y.shape[1]
        ctx.diagonal = diagonal
        ctx.y_shape = y.shape
        ctx.soft_dtype = None if soft is None else soft.dtype
        ctx.save_for_backward(y if soft is not None else None, perm)

    def backward_unpermute_edges_mean(ctx, grad):
        y, perm = ctx.saved_tensors
        needs = _needs_grad(ctx, 4)
        grad_y = grad_soft = None
        fused_diagonal = ctx.diagonal and _fused_cpu_backward(ops, grad)
        scaled = grad / ctx.k if needs[2] or (needs[0] and not fused_diagonal) else None
        if needs[0]:
            if fused_diagonal:
                grad_y = ops.unpermute_edges_mean_diagonal_backward(grad, perm)
            elif ctx.diagonal:
                # d/dy of a diagonal is the diagonal: dy[j, r, r] = G[p(r)] / k, zero elsewhere.
                on_diagonal = ops.permute_nodes(scaled, perm, None)  # [B, k, n, *F]
                grad_y = scaled.new_zeros(ctx.y_shape)
                torch.diagonal(grad_y, dim1=2, dim2=3).copy_(on_diagonal.movedim(2, -1))
            else:
                grad_y = ops.permute_edges(scaled, perm, None)
        if needs[2]:
            if ctx.diagonal:
                grad_soft = _diagonal_soft_grad(ops, scaled, y, perm)
            else:
                grad_soft = _edge_soft_grad(ops, scaled, y, perm)
            grad_soft = grad_soft.to(ctx.soft_dtype)
        return grad_y, None, grad_soft, None

    register("unpermute_edges_mean", backward_unpermute_edges_mean, setup_unpermute_edges_mean)

    # ---- frame_apply: out[j, r] = R_j^T (x[p(r)] - c) --------------------------------------
    def setup_frame_apply(ctx, inputs, output):
        x, R, perm, center, soft = inputs
        ctx.k = R.shape[1]
        ctx.has_perm = perm is not None
        ctx.has_center = center is not None
        ctx.soft_dtype = None if soft is None else soft.dtype
        ctx.save_for_backward(x, R, perm, center)

    def backward_frame_apply(ctx, grad):
        x, R, perm, center = ctx.saved_tensors
        needs_x, needs_R, _, needs_center, needs_soft = _needs_grad(ctx, 5)
        grad_x = grad_R = grad_center = grad_soft = None
        summed = None  # sum over the samples of each node's gradient
        if (needs_x or needs_center or needs_R) and _fused_cpu_backward(ops, grad):
            summed, grad_R = ops.frame_apply_backward(grad, x, R, perm, center)
            grad_R = grad_R if needs_R else None
        elif needs_x or needs_center:
            # x[i] - c reaches sample j at position q(i), rotated by R_j^T: the adjoint is the
            # rotate-back-and-scatter of frame_unapply_mean, summed instead of averaged.
            summed = ops.frame_unapply_mean(grad, R, perm, None, None) * ctx.k
        if needs_x:
            grad_x = summed
        if needs_center:
            grad_center = -_sum_in_float32(summed, dim=1)
        if (needs_R and grad_R is None) or needs_soft:
            centered = x if center is None else x - center[:, None]
            if needs_R and grad_R is None:
                # dR_j[a, m] = sum_{r, c} (x[p(r)] - c)[a, c] G[j, r][m, c]
                if perm is None:
                    grad_R = torch.einsum("brac,bjrmc->bjam", centered, grad)
                else:
                    gathered = ops.permute_nodes(centered, perm, None)
                    grad_R = torch.einsum("bjrac,bjrmc->bjam", gathered, grad)
            if needs_soft:
                rotated_back = torch.einsum("bjam,bjrmc->bjrac", R, grad)  # R_j G[j, r]
                grad_soft = _node_soft_grad(centered, rotated_back).to(ctx.soft_dtype)
        return grad_x, grad_R, None, grad_center, grad_soft

    register("frame_apply", backward_frame_apply, setup_frame_apply)

    # ---- frame_unapply_mean: out[p(r)] += R_j y[j, r] / k, + c -----------------------------
    def setup_frame_unapply_mean(ctx, inputs, output):
        y, R, perm, center, soft = inputs
        ctx.k = y.shape[1]
        ctx.soft_dtype = None if soft is None else soft.dtype
        ctx.save_for_backward(y, R, perm)

    def backward_frame_unapply_mean(ctx, grad):
        y, R, perm = ctx.saved_tensors
        needs_y, needs_R, _, needs_center, needs_soft = _needs_grad(ctx, 5)
        grad_y = grad_R = grad_center = grad_soft = None
        fused = (needs_y or needs_R) and _fused_cpu_backward(ops, grad)
        scaled = grad / ctx.k if needs_soft or not fused else None
        if fused:
            grad_y, grad_R = ops.frame_unapply_mean_backward(grad, y, R, perm)
            grad_y = grad_y if needs_y else None
            grad_R = grad_R if needs_R else None
        elif needs_y:
            grad_y = ops.frame_apply(scaled, R, perm, None, None)
        if needs_R and grad_R is None:
            # dR_j[a, m] = sum_{r, c} G[p(r)][a, c] y[j, r][m, c] / k
            if perm is None:
                grad_R = torch.einsum("brac,bjrmc->bjam", scaled, y)
            else:
                grad_R = torch.einsum("bjrac,bjrmc->bjam", ops.permute_nodes(scaled, perm, None), y)
        if needs_center:
            grad_center = _sum_in_float32(grad, dim=1)
        if needs_soft:
            rotated = torch.einsum("bjam,bjrmc->bjrac", R, y)  # R_j y[j, r]
            grad_soft = _node_soft_grad(scaled, rotated).to(ctx.soft_dtype)
        return grad_y, grad_R, None, grad_center, grad_soft

    register("frame_unapply_mean", backward_frame_unapply_mean, setup_frame_unapply_mean)

    # ---- sinkhorn_sort: recomputing backward kernel -----------------------------------------
    def setup_sinkhorn_sort(ctx, inputs, output):
        scores, tau, n_iter, mask = inputs
        ctx.tau, ctx.n_iter = tau, n_iter
        ctx.save_for_backward(scores, mask)

    def backward_sinkhorn_sort(ctx, grad_soft, grad_perm):
        scores, mask = ctx.saved_tensors
        needs = _needs_grad(ctx, 4)
        grad_scores = None
        if needs[0] and grad_soft is not None:
            grad_scores = ops.sinkhorn_sort_backward(grad_soft, scores, ctx.tau, ctx.n_iter, mask)
        return grad_scores, None, None, None

    register("sinkhorn_sort", backward_sinkhorn_sort, setup_sinkhorn_sort)

    # ---- permutation_entropy -----------------------------------------------------------------
    def setup_permutation_entropy(ctx, inputs, output):
        soft, mask = inputs
        ctx.save_for_backward(soft, mask)

    def backward_permutation_entropy(ctx, grad):
        soft, mask = ctx.saved_tensors
        needs = _needs_grad(ctx, 2)
        grad_soft = None
        if needs[0]:
            grad_soft = ops.permutation_entropy_backward(grad, soft, mask)
        return grad_soft, None

    register("permutation_entropy", backward_permutation_entropy, setup_permutation_entropy)

    # ---- gram_schmidt -------------------------------------------------------------------------
    def setup_gram_schmidt(ctx, inputs, output):
        V, proper = inputs
        ctx.proper = proper
        ctx.save_for_backward(V)

    def backward_gram_schmidt(ctx, grad):
        (V,) = ctx.saved_tensors
        needs = _needs_grad(ctx, 2)
        grad_V = None
        if needs[0]:
            grad_V = ops.gram_schmidt_backward(grad, V, ctx.proper)
        return grad_V, None

    register("gram_schmidt", backward_gram_schmidt, setup_gram_schmidt)


# --------------------------------------------------------------------------------------------
# Declaration of the compiled-extension ops (the C++ kernels register against these schemas).

_library: Optional[torch.library.Library] = None


def define_compiled_ops() -> None:
    """Declare ``lps_fast::<op>`` and its fake kernel and autograd (once per process)."""
    global _library
    if _library is not None:
        return
    _library = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name, schema in {**SCHEMAS, **BACKWARD_SCHEMAS, **CPU_BACKWARD_SCHEMAS, **NETWORK_SCHEMAS}.items():
        _library.define(name + schema)
        torch.library.register_fake(qualified(name), FAKES[name], lib=_library)
    register_autograd(OpSet(""))
    register_vn_layer_autograd(lib=_library)
    register_vn_score_head_autograd(_library)
    register_vn_matmul_autograd(_library)


def register_vn_layer_autograd(suffix: str = "", lib: Optional[torch.library.Library] = None) -> None:
    """Gradients of ``vn_layer<suffix>`` (``""``: the compiled CPU kernel, ``"_triton"``) w.r.t. p,
    d, the centre terms and the batch-norm affine parameters, by ``vn_layer_backward<suffix>``
    (the pool direction only selects, and the statistics output is for the running estimates:
    neither carries a gradient)."""
    backward_op = getattr(getattr(torch.ops, NAMESPACE), "vn_layer_backward" + suffix)

    def setup(ctx, inputs, output):
        p, d, p_centre, d_centre, neighbours, pool, mask, weight, bias, running_mean, running_var, eps, slope = inputs
        _, selected, stats = output
        ctx.training = running_mean is None
        ctx.eps, ctx.slope = eps, slope
        ctx.save_for_backward(p, d, p_centre, d_centre, neighbours, mask, weight, bias, selected, stats)

    def backward(ctx, grad, grad_selected, grad_stats):
        p, d, p_centre, d_centre, neighbours, mask, weight, bias, selected, stats = ctx.saved_tensors
        grads = backward_op(grad, p, d, p_centre, d_centre, neighbours, selected, mask, weight, bias, stats,
                            ctx.training, ctx.eps, ctx.slope)
        grad_p, grad_d, grad_pc, grad_dc, grad_weight, grad_bias = grads
        return (grad_p, grad_d, grad_pc if p_centre is not None else None, grad_dc if d_centre is not None else None,
                None, None, None, grad_weight, grad_bias, None, None, None, None)

    torch.library.register_autograd(qualified("vn_layer" + suffix), _kernel_backward("vn_layer" + suffix, backward),
                                    setup_context=setup, lib=lib)


def register_vn_score_head_autograd(lib: torch.library.Library) -> None:
    """Gradients of ``vn_score_head`` w.r.t. the features, the frames, the pair features and the
    head's weight and bias, by ``vn_score_head_backward`` (the mask carries none)."""
    backward_op = getattr(torch.ops, NAMESPACE).vn_score_head_backward

    def setup(ctx, inputs, output):
        x, frame, pair, mask, weight, bias = inputs
        ctx.bias_shape = bias.shape
        ctx.save_for_backward(x, frame, pair, mask, weight)

    def backward(ctx, grad):
        x, frame, pair, mask, weight = ctx.saved_tensors
        grad_x, grad_frame, grad_pair, grad_weight, grad_bias = backward_op(grad, x, frame, pair, mask, weight)
        return grad_x, grad_frame, grad_pair, None, grad_weight, grad_bias.reshape(ctx.bias_shape)

    torch.library.register_autograd(qualified("vn_score_head"), _kernel_backward("vn_score_head", backward),
                                    setup_context=setup, lib=lib)


def register_vn_matmul_autograd(lib: torch.library.Library) -> None:
    """Gradients of ``vn_matmul`` w.r.t. x (where asked) and w, by ``vn_matmul_backward``."""
    backward_op = getattr(torch.ops, NAMESPACE).vn_matmul_backward

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        needs_x, needs_w = ctx.needs_input_grad
        if not (needs_x or needs_w):
            return None, None
        if torch.is_grad_enabled():  # a double backward (create_graph): differentiable products
            rows = x.reshape(-1, w.shape[0])
            return ((grad @ w.t() if needs_x else None),
                    (rows.t() @ grad.reshape(rows.shape[0], w.shape[1]) if needs_w else None))
        grad_x, grad_w = backward_op(grad, x, w, needs_x)
        return (grad_x if needs_x else None), (grad_w if needs_w else None)

    torch.library.register_autograd(qualified("vn_matmul"), _without_autocast(backward), setup_context=setup, lib=lib)


def register_missing_cuda_kernels(reason: str) -> None:
    """Give CUDA tensors a clear error instead of a dispatcher message when no CUDA build loaded."""

    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"lps_fast's CUDA kernels are not available ({reason}); the public functions "
            "lps_fast.<op> route CUDA tensors to Triton or the reference path instead"
        )

    for name in list(SCHEMAS) + list(BACKWARD_SCHEMAS) + list(CPU_BACKWARD_SCHEMAS) + list(NETWORK_SCHEMAS):
        _library.impl(name, refuse, "CUDA")
