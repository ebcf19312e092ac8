"""Triton kernels for the permutation ops: ``permute_nodes``, ``permute_edges``, ``unpermute_mean``
and ``unpermute_edges_mean`` (docs/SPEC.md, "Ops").

All four are memory-bound gathers. The scatter-means are written as gathers too: a tiny kernel
inverts the permutation (``inverse[b, j, perm[b, j, r]] = r``), then each output row gathers its
``k`` sources through the inverse and sums them in registers. No atomics, so the result is
deterministic, and ``unpermute_edges_mean(..., diagonal=True)`` reads only the ``k n`` diagonal
rows it needs (O(k n F), never O(n^2)).

Tiles are ``[BLOCK_R, BLOCK_S, BLOCK_F]``: output rows ``r``, output columns ``s`` (edges only,
``BLOCK_S = 1`` for nodes) and the flattened feature dim innermost, so the contiguous feature
run of every gathered row is read and written in one coalesced stretch. Node indices are checked
against ``[0, n)`` and out-of-range ones read nothing (their outputs are 0), so an invalid
``perm`` can never make a kernel touch memory outside its tensors.
"""

from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
import triton
import triton.language as tl

from lps_fast import _ops

from ._launch import launch, shapes_only

# Elements per program of the gather kernels: enough bytes in flight per SM for the copy-like
# kernels, small enough to stay in registers. Tests shrink it to reach the multi-block paths.
TILE_ELEMENTS = 4096


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _inverse_permutation_kernel(
    perm_ptr,  # [B * k, n] int64, contiguous
    inverse_ptr,  # [B * k, n] int32, prefilled with -1
    n,
    BLOCK: tl.constexpr,
):
    """``inverse[b, j, perm[b, j, r]] = r`` for every valid ``perm`` value (0 <= perm < n).

    Grid: ``(B * k, cdiv(n, BLOCK))``. Entries no valid index hits keep -1, which the gathers read
    as "no source".
    """
    sample = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = r < n
    node = tl.load(perm_ptr + sample * n + r, mask=inside, other=-1)
    valid = inside & (node >= 0) & (node < n)
    tl.store(inverse_ptr + sample * n + node, r.to(tl.int32), mask=valid)


@triton.jit
def _permute_kernel(
    src_ptr,  # [B, n, (n,) F] strided
    perm_ptr,  # [B * k, n] int64, contiguous
    out_ptr,  # [B, k, n, (n,) F] contiguous
    k,
    n,
    features,
    src_stride_b,
    src_stride_row,
    src_stride_col,
    src_stride_f,
    row_blocks,
    col_blocks,
    EDGES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Per-sample gather from a source shared by the ``k`` samples.

    nodes (``EDGES=False``): ``out[b, j, r, f] = src[b, perm[b, j, r], f]``            (= H^T x)
    edges (``EDGES=True``):  ``out[b, j, r, s, f] = src[b, perm[b, j, r], perm[b, j, s], f]`` (= H^T e H)

    Grid: ``(B * k * row_blocks, col_blocks * cdiv(F, BLOCK_F))``; one program writes a
    ``[BLOCK_R, BLOCK_S, BLOCK_F]`` tile of one sample ``(b, j)``.
    """
    pid = tl.program_id(0).to(tl.int64)
    sample = pid // row_blocks  # b * k + j
    row_block = pid % row_blocks
    batch = sample // k
    pid_f = tl.program_id(1).to(tl.int64)
    col_block = pid_f % col_blocks
    feature_block = pid_f // col_blocks

    r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    f = feature_block * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F]
    r_inside = r < n
    f_inside = f < features
    perm_row = perm_ptr + sample * n
    node_r = tl.load(perm_row + r, mask=r_inside, other=-1)
    r_valid = (node_r >= 0) & (node_r < n)
    src_offset = node_r * src_stride_row  # [BLOCK_R] int64
    if EDGES:
        s = col_block * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        s_inside = s < n
        node_s = tl.load(perm_row + s, mask=s_inside, other=-1)
        s_valid = (node_s >= 0) & (node_s < n)
        offset = src_offset[:, None, None] + (node_s * src_stride_col)[None, :, None]
        valid = r_valid[:, None, None] & s_valid[None, :, None]
        inside = r_inside[:, None, None] & s_inside[None, :, None]
        out_row = (sample * n + r)[:, None, None] * n + s[None, :, None]
    else:
        offset = src_offset[:, None, None]
        valid = r_valid[:, None, None]
        inside = r_inside[:, None, None]
        out_row = (sample * n + r)[:, None, None]
    f3 = f[None, None, :]
    inside = inside & f_inside[None, None, :]
    values = tl.load(
        src_ptr + batch * src_stride_b + offset + f3 * src_stride_f,
        mask=inside & valid,
        other=0,
    )
    tl.store(out_ptr + out_row * features + f3, values, mask=inside)


@triton.jit
def _unpermute_mean_kernel(
    y_ptr,  # [B, k, n, (n,) F] strided
    inverse_ptr,  # [B * k, n] int32: position of node i in sample j, -1 if none
    out_ptr,  # [B, n, (n,) F] contiguous
    k,
    n,
    features,
    y_stride_b,
    y_stride_j,
    y_stride_row,
    y_stride_col,
    y_stride_f,
    row_blocks,
    col_blocks,
    EDGES: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Scatter-mean over the samples, as a gather through the inverse permutation ``q``.

    nodes (``EDGES=False``): ``out[b, i, f] = (1/k) sum_j y[b, j, q_j(i), f]``      (= mean_j H y)
    edges (``EDGES=True``):  ``out[b, i, u, f] = (1/k) sum_j y[b, j, q_j(i), q_j(u), f]`` (= mean_j H y H^T)
    The diagonal of the edge case is the node case with ``y_stride_row = stride(2) + stride(3)``.

    Grid: ``(B * row_blocks, col_blocks * cdiv(F, BLOCK_F))``. Sums in float32 (float64 for
    float64 input), in sample order, so the result is deterministic.
    """
    ACC = tl.float64 if IS_FP64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // row_blocks
    row_block = pid % row_blocks
    pid_f = tl.program_id(1).to(tl.int64)
    col_block = pid_f % col_blocks
    feature_block = pid_f // col_blocks

    i = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    f = feature_block * BLOCK_F + tl.arange(0, BLOCK_F)
    i_inside = i < n
    f_inside = f < features
    if EDGES:
        u = col_block * BLOCK_S + tl.arange(0, BLOCK_S)
        u_inside = u < n
        inside = i_inside[:, None, None] & u_inside[None, :, None] & f_inside[None, None, :]
        out_row = (batch * n + i)[:, None, None] * n + u[None, :, None]
    else:
        inside = i_inside[:, None, None] & f_inside[None, None, :]
        out_row = (batch * n + i)[:, None, None]
    f3 = f[None, None, :]

    acc = tl.zeros([BLOCK_R, BLOCK_S, BLOCK_F], dtype=ACC)
    # The loop counter is int32: step a pointer by the sample stride instead of forming
    # ``j * y_stride_j``, which wraps once it passes 2^31 elements.
    y_sample = y_ptr + batch * y_stride_b
    for j in range(0, k):
        sample = batch * k + j
        inverse_row = inverse_ptr + sample * n
        pos_i = tl.load(inverse_row + i, mask=i_inside, other=-1).to(tl.int64)
        offset = (pos_i * y_stride_row)[:, None, None]
        valid = (pos_i >= 0)[:, None, None]
        if EDGES:
            pos_u = tl.load(inverse_row + u, mask=u_inside, other=-1).to(tl.int64)
            offset = offset + (pos_u * y_stride_col)[None, :, None]
            valid = valid & (pos_u >= 0)[None, :, None]
        values = tl.load(y_sample + offset + f3 * y_stride_f, mask=inside & valid, other=0.0)
        acc += values.to(ACC)
        y_sample += y_stride_j
    tl.store(out_ptr + out_row * features + f3, (acc / k).to(out_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------
# Host launchers


def _product(dims) -> int:
    return functools.reduce(operator.mul, dims, 1)


def _blocks(n: int, features: int, edges: bool):
    """``(BLOCK_R, BLOCK_S, BLOCK_F, num_warps)`` for a tile of about ``TILE_ELEMENTS`` elements."""
    n, features = int(n), int(features)  # block sizes are constexprs: concrete even when traced
    block_f = min(triton.next_power_of_2(max(features, 1)), 256, TILE_ELEMENTS)
    room = max(TILE_ELEMENTS // block_f, 1)
    block_n = triton.next_power_of_2(max(n, 1))
    if edges:
        # Columns first: a row of the edge tile is contiguous in the output.
        block_s = min(block_n, room)
        block_r = min(block_n, max(room // block_s, 1))
    else:
        block_s = 1
        block_r = min(block_n, room)
    # About 16 elements per thread: a few 16-byte accesses each, with 64-bit addresses that
    # still fit in registers without cutting occupancy.
    num_warps = min(max(block_r * block_s * block_f // 512, 1), 8)
    return block_r, block_s, block_f, num_warps


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``(B, k, n)`` int32 inverse of ``perm``: the position of each node, -1 where none."""
    batch, k, n = perm.shape
    perm = perm.contiguous()
    inverse = torch.full((batch, k, n), -1, dtype=torch.int32, device=perm.device)
    if inverse.numel() == 0 or shapes_only(perm):
        return inverse
    block = min(triton.next_power_of_2(int(n)), 1024)
    launch(
        _inverse_permutation_kernel,
        (batch * k, triton.cdiv(n, block)),
        perm,
        perm, inverse, n, BLOCK=block, num_warps=4 if block >= 512 else 1
    )
    return inverse


def _as_kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    # Triton has no bool pointers worth gathering through; adjacency bits move as bytes.
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def permute(src: torch.Tensor, perm: torch.Tensor, edges: bool) -> torch.Tensor:
    """``out[b, j, r(, s)] = src[b, perm[r](, perm[s])]`` for any dtype: ``(B, n, (n,) *F) -> (B, k, n, (n,) *F)``."""
    batch, n = src.shape[0], src.shape[1]
    k = perm.shape[1]
    node_dims = 2 if edges else 1
    trailing = tuple(src.shape[1 + node_dims :])
    features = _product(trailing)
    out = torch.empty((batch, k) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
    if out.numel() == 0 or shapes_only(src, perm):
        return out
    perm = perm.contiguous()
    flat = src.reshape(batch, n, n, features) if edges else src.reshape(batch, n, features)
    flat = _as_kernel_dtype(flat)
    if edges:
        stride_b, stride_row, stride_col, stride_f = flat.stride()
    else:
        stride_b, stride_row, stride_f = flat.stride()
        stride_col = 0
    block_r, block_s, block_f, num_warps = _blocks(n, features, edges)
    row_blocks = triton.cdiv(n, block_r)
    col_blocks = triton.cdiv(n, block_s) if edges else 1
    grid = (batch * k * row_blocks, col_blocks * triton.cdiv(features, block_f))
    launch(
        _permute_kernel,
        grid,
        flat,
        flat,
        perm,
        _as_kernel_dtype(out),
        k,
        n,
        features,
        stride_b,
        stride_row,
        stride_col,
        stride_f,
        row_blocks,
        col_blocks,
        EDGES=edges,
        BLOCK_R=block_r,
        BLOCK_S=block_s,
        BLOCK_F=block_f,
        num_warps=num_warps,
    )
    return out


def unpermute_mean(y: torch.Tensor, perm: torch.Tensor, edges: bool, diagonal: bool = False) -> torch.Tensor:
    """mean_j ``H y`` (nodes), mean_j ``H y H^T`` (edges) or its diagonal, from ``y (B, k, n, (n,) *F)``."""
    batch, k, n = y.shape[0], y.shape[1], y.shape[2]
    node_dims = 2 if edges else 1
    trailing = tuple(y.shape[2 + node_dims :])
    features = _product(trailing)
    out_nodes = (n, n) if edges and not diagonal else (n,)
    out = torch.empty((batch,) + out_nodes + trailing, dtype=y.dtype, device=y.device)
    if out.numel() == 0 or shapes_only(y, perm):
        return out
    inverse = inverse_permutation(perm)
    if edges:
        flat = y.reshape(batch, k, n, n, features)
        stride_b, stride_j, stride_row, stride_col, stride_f = flat.stride()
        if diagonal:
            # y[b, j, q, q] is a node-indexed row with the two node strides summed.
            stride_row, stride_col = stride_row + stride_col, 0
    else:
        flat = y.reshape(batch, k, n, features)
        stride_b, stride_j, stride_row, stride_f = flat.stride()
        stride_col = 0
    two_dimensional = edges and not diagonal
    block_r, block_s, block_f, num_warps = _blocks(n, features, two_dimensional)
    row_blocks = triton.cdiv(n, block_r)
    col_blocks = triton.cdiv(n, block_s) if two_dimensional else 1
    grid = (batch * row_blocks, col_blocks * triton.cdiv(features, block_f))
    launch(
        _unpermute_mean_kernel,
        grid,
        flat,
        flat,
        inverse,
        out,
        k,
        n,
        features,
        stride_b,
        stride_j,
        stride_row,
        stride_col,
        stride_f,
        row_blocks,
        col_blocks,
        EDGES=two_dimensional,
        IS_FP64=y.dtype == torch.float64,
        BLOCK_R=block_r,
        BLOCK_S=block_s,
        BLOCK_F=block_f,
        num_warps=num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Registered ops (schemas of lps_fast._ops.SCHEMAS). The forward value never depends on ``soft``:
# it only carries the straight-through gradient, which the autograd formulas compute.


@torch.library.triton_op(
    "lps_fast::permute_nodes_triton", mutates_args=(), schema=_ops.SCHEMAS["permute_nodes"]
)
def permute_nodes_triton(x: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    return permute(x, perm, edges=False)


@torch.library.triton_op(
    "lps_fast::permute_edges_triton", mutates_args=(), schema=_ops.SCHEMAS["permute_edges"]
)
def permute_edges_triton(e: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    return permute(e, perm, edges=True)


@torch.library.triton_op(
    "lps_fast::unpermute_mean_triton", mutates_args=(), schema=_ops.SCHEMAS["unpermute_mean"]
)
def unpermute_mean_triton(y: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    return unpermute_mean(y, perm, edges=False)


@torch.library.triton_op(
    "lps_fast::unpermute_edges_mean_triton", mutates_args=(), schema=_ops.SCHEMAS["unpermute_edges_mean"]
)
def unpermute_edges_mean_triton(
    y: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None, diagonal: bool = False
) -> torch.Tensor:
    return unpermute_mean(y, perm, edges=True, diagonal=diagonal)
