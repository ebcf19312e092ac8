"""Triton kernels for the frame ops: ``frame_apply`` and ``frame_unapply_mean`` (docs/SPEC.md, "Ops").

Each kernel fuses everything the op does to a point-feature tile: the centering, the node
permutation (a gather, or a gather through the inverse permutation for the scatter-mean), the
3 x 3 rotation and, for ``frame_unapply_mean``, the mean over the ``k`` samples and the re-added
center. The nine entries of ``R[b, j]`` are scalars of the program; the tile is
``[BLOCK_R, BLOCK_C]`` (nodes x channels, channels innermost) for each of the three vector
components, so every row read is contiguous in the channel dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lps_fast import _ops

from ._launch import launch, shapes_only
from .permute import inverse_permutation

TILE_ELEMENTS = 2048  # per vector component; three components live in registers at once


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _frame_apply_kernel(
    x_ptr,  # [B, n, 3, C] strided
    R_ptr,  # [B, k, 3, 3] strided
    perm_ptr,  # [B * k, n] int64, contiguous (unused without HAS_PERM)
    center_ptr,  # [B, 3, C] strided (unused without HAS_CENTER)
    out_ptr,  # [B, k, n, 3, C] contiguous
    k,
    n,
    channels,
    x_stride_b,
    x_stride_n,
    x_stride_a,
    x_stride_c,
    R_stride_b,
    R_stride_j,
    R_stride_a,
    R_stride_m,
    center_stride_b,
    center_stride_a,
    center_stride_c,
    row_blocks,
    HAS_PERM: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[b, j, r, m, c] = sum_a R[b, j, a, m] (x[b, p(r), a, c] - center[b, a, c])``.

    ``p = perm[b, j]`` or the identity. Grid: ``(B * k * row_blocks, cdiv(C, BLOCK_C))``.
    """
    ACC = tl.float64 if IS_FP64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    sample = pid // row_blocks
    row_block = pid % row_blocks
    batch = sample // k
    j = sample % k
    r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c.to(tl.int64)  # strided channel offsets may pass 2^31 in large non-contiguous inputs
    r_inside = r < n
    c_inside = c < channels
    if HAS_PERM:
        node = tl.load(perm_ptr + sample * n + r, mask=r_inside, other=-1)
        valid = (node >= 0) & (node < n)
    else:
        node = r.to(tl.int64)
        valid = r_inside
    inside = r_inside[:, None] & c_inside[None, :]
    load_mask = valid[:, None] & c_inside[None, :]
    x_row = x_ptr + batch * x_stride_b + (node * x_stride_n)[:, None] + (c * x_stride_c)[None, :]
    x0 = tl.load(x_row, mask=load_mask, other=0.0).to(ACC)
    x1 = tl.load(x_row + x_stride_a, mask=load_mask, other=0.0).to(ACC)
    x2 = tl.load(x_row + x_stride_a + x_stride_a, mask=load_mask, other=0.0).to(ACC)
    if HAS_CENTER:
        center_row = center_ptr + batch * center_stride_b + c * center_stride_c
        x0 -= tl.load(center_row, mask=c_inside, other=0.0).to(ACC)[None, :]
        x1 -= tl.load(center_row + center_stride_a, mask=c_inside, other=0.0).to(ACC)[None, :]
        x2 -= tl.load(center_row + center_stride_a + center_stride_a, mask=c_inside, other=0.0).to(ACC)[None, :]
    rotation = R_ptr + batch * R_stride_b + j * R_stride_j
    out_row = out_ptr + ((sample * n + r) * 3 * channels)[:, None] + c[None, :]
    dtype = out_ptr.dtype.element_ty
    for m in tl.static_range(3):
        column = rotation + m * R_stride_m  # R[:, m]
        r0 = tl.load(column).to(ACC)
        r1 = tl.load(column + R_stride_a).to(ACC)
        r2 = tl.load(column + 2 * R_stride_a).to(ACC)
        value = r0 * x0 + r1 * x1 + r2 * x2
        tl.store(out_row + m * channels, value.to(dtype), mask=inside)


@triton.jit
def _frame_unapply_mean_kernel(
    y_ptr,  # [B, k, n, 3, C] strided
    R_ptr,  # [B, k, 3, 3] strided
    inverse_ptr,  # [B * k, n] int32 (unused without HAS_PERM)
    center_ptr,  # [B, 3, C] strided (unused without HAS_CENTER)
    out_ptr,  # [B, n, 3, C] contiguous
    k,
    n,
    channels,
    y_stride_b,
    y_stride_j,
    y_stride_n,
    y_stride_m,
    y_stride_c,
    R_stride_b,
    R_stride_j,
    R_stride_a,
    R_stride_m,
    center_stride_b,
    center_stride_a,
    center_stride_c,
    row_blocks,
    HAS_PERM: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[b, i, a, c] = (1/k) sum_j sum_m R[b, j, a, m] y[b, j, q_j(i), m, c] + center[b, a, c]``.

    ``q_j`` is the inverse of ``perm[b, j]`` (the identity without perm). Grid:
    ``(B * row_blocks, cdiv(C, BLOCK_C))``; samples are summed in order in registers.
    """
    ACC = tl.float64 if IS_FP64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // row_blocks
    row_block = pid % row_blocks
    i = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c.to(tl.int64)
    i_inside = i < n
    c_inside = c < channels
    inside = i_inside[:, None] & c_inside[None, :]
    acc0 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    # The loop counter is int32: step pointers by the sample strides instead of forming
    # ``j * stride``, which wraps once it passes 2^31 elements.
    y_sample = y_ptr + batch * y_stride_b
    rotation = R_ptr + batch * R_stride_b
    for j in range(0, k):
        sample = batch * k + j
        if HAS_PERM:
            position = tl.load(inverse_ptr + sample * n + i, mask=i_inside, other=-1).to(tl.int64)
            valid = position >= 0
        else:
            position = i.to(tl.int64)
            valid = i_inside
        load_mask = valid[:, None] & c_inside[None, :]
        y_row = y_sample + (position * y_stride_n)[:, None] + (c * y_stride_c)[None, :]
        y0 = tl.load(y_row, mask=load_mask, other=0.0).to(ACC)
        y1 = tl.load(y_row + y_stride_m, mask=load_mask, other=0.0).to(ACC)
        y2 = tl.load(y_row + y_stride_m + y_stride_m, mask=load_mask, other=0.0).to(ACC)
        acc0 += (
            tl.load(rotation).to(ACC) * y0
            + tl.load(rotation + R_stride_m).to(ACC) * y1
            + tl.load(rotation + 2 * R_stride_m).to(ACC) * y2
        )
        row1 = rotation + R_stride_a
        acc1 += (
            tl.load(row1).to(ACC) * y0
            + tl.load(row1 + R_stride_m).to(ACC) * y1
            + tl.load(row1 + 2 * R_stride_m).to(ACC) * y2
        )
        row2 = rotation + 2 * R_stride_a
        acc2 += (
            tl.load(row2).to(ACC) * y0
            + tl.load(row2 + R_stride_m).to(ACC) * y1
            + tl.load(row2 + 2 * R_stride_m).to(ACC) * y2
        )
        y_sample += y_stride_j
        rotation += R_stride_j
    acc0 = acc0 / k
    acc1 = acc1 / k
    acc2 = acc2 / k
    if HAS_CENTER:
        center_row = center_ptr + batch * center_stride_b + c * center_stride_c
        acc0 += tl.load(center_row, mask=c_inside, other=0.0).to(ACC)[None, :]
        acc1 += tl.load(center_row + center_stride_a, mask=c_inside, other=0.0).to(ACC)[None, :]
        acc2 += tl.load(center_row + center_stride_a + center_stride_a, mask=c_inside, other=0.0).to(ACC)[None, :]
    out_row = out_ptr + ((batch * n + i) * 3 * channels)[:, None] + c[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(out_row, acc0.to(dtype), mask=inside)
    tl.store(out_row + channels, acc1.to(dtype), mask=inside)
    tl.store(out_row + 2 * channels, acc2.to(dtype), mask=inside)


# ---------------------------------------------------------------------------------------------
# Host launchers


def _blocks(n: int, channels: int):
    n, channels = int(n), int(channels)  # block sizes are constexprs: concrete even when traced
    block_c = min(triton.next_power_of_2(max(channels, 1)), 128, TILE_ELEMENTS)
    block_r = min(triton.next_power_of_2(max(n, 1)), max(TILE_ELEMENTS // block_c, 1))
    # Three components (and three accumulators) per element: about 8 elements per thread.
    num_warps = min(max(block_r * block_c // 256, 1), 8)
    return block_r, block_c, num_warps


def _center_args(center: Optional[torch.Tensor], like: torch.Tensor):
    if center is None:
        return like, (0, 0, 0)
    return center, center.stride()


def frame_apply(
    x: torch.Tensor, R: torch.Tensor, perm: Optional[torch.Tensor], center: Optional[torch.Tensor]
) -> torch.Tensor:
    batch, n, _, channels = x.shape
    k = R.shape[1]
    out = torch.empty((batch, k, n, 3, channels), dtype=x.dtype, device=x.device)
    if out.numel() == 0 or shapes_only(x, R):
        return out
    perm_arg = x if perm is None else perm.contiguous()
    center_arg, center_strides = _center_args(center, x)
    block_r, block_c, num_warps = _blocks(n, channels)
    row_blocks = triton.cdiv(n, block_r)
    grid = (batch * k * row_blocks, triton.cdiv(channels, block_c))
    launch(
        _frame_apply_kernel,
        grid,
        x,
        x,
        R,
        perm_arg,
        center_arg,
        out,
        k,
        n,
        channels,
        *x.stride(),
        *R.stride(),
        *center_strides,
        row_blocks,
        HAS_PERM=perm is not None,
        HAS_CENTER=center is not None,
        IS_FP64=x.dtype == torch.float64,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


def frame_unapply_mean(
    y: torch.Tensor, R: torch.Tensor, perm: Optional[torch.Tensor], center: Optional[torch.Tensor]
) -> torch.Tensor:
    batch, k, n, _, channels = y.shape
    out = torch.empty((batch, n, 3, channels), dtype=y.dtype, device=y.device)
    if out.numel() == 0 or shapes_only(y, R):
        return out
    inverse = y if perm is None else inverse_permutation(perm)
    center_arg, center_strides = _center_args(center, y)
    block_r, block_c, num_warps = _blocks(n, channels)
    row_blocks = triton.cdiv(n, block_r)
    grid = (batch * row_blocks, triton.cdiv(channels, block_c))
    launch(
        _frame_unapply_mean_kernel,
        grid,
        y,
        y,
        R,
        inverse,
        center_arg,
        out,
        k,
        n,
        channels,
        *y.stride(),
        *R.stride(),
        *center_strides,
        row_blocks,
        HAS_PERM=perm is not None,
        HAS_CENTER=center is not None,
        IS_FP64=y.dtype == torch.float64,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Registered ops (schemas of lps_fast._ops.SCHEMAS); ``soft`` only carries the ST gradient.


@torch.library.triton_op("lps_fast::frame_apply_triton", mutates_args=(), schema=_ops.SCHEMAS["frame_apply"])
def frame_apply_triton(
    x: torch.Tensor,
    R: torch.Tensor,
    perm: Optional[torch.Tensor] = None,
    center: Optional[torch.Tensor] = None,
    soft: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return frame_apply(x, R, perm, center)


@torch.library.triton_op(
    "lps_fast::frame_unapply_mean_triton", mutates_args=(), schema=_ops.SCHEMAS["frame_unapply_mean"]
)
def frame_unapply_mean_triton(
    y: torch.Tensor,
    R: torch.Tensor,
    perm: Optional[torch.Tensor] = None,
    center: Optional[torch.Tensor] = None,
    soft: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return frame_unapply_mean(y, R, perm, center)
