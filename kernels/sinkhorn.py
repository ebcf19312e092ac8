"""Triton kernels for ``sinkhorn_sort`` and ``permutation_entropy``, forward and backward
(docs/SPEC.md "Distribution-side ops"; docs/DESIGN.md "Sinkhorn in dual potentials" and
"Permutation entropy gradient").

One program owns one ``(b, j)`` matrix. The ``n x n`` matrix is never materialized: the kernels
walk it in full-width row tiles ``[BLOCK_I, BLOCK_N]`` (``BLOCK_N >= n``), so that every row
reduction finishes inside one tile while column reductions accumulate in ``[BLOCK_N]`` register
vectors across tiles. Per-node vectors that must be re-read by row block (normalized scores,
row potentials, score adjoints) go through a small per-matrix scratch buffer in global memory
(O(n) floats, cache resident), with a block barrier between the phase that writes a vector
and the phase that reads it.

Sinkhorn, with ``s`` the normalized scores and ``t[r] = s[perm[r]]`` (the sorted scores)::

    L0[i, r] = -|s[i] - t[r]| / tau                  (recomputed per tile, never stored)
    U_t[i]   = logsumexp_r (L0 - V_{t-1})[i, :]       V_0 = 0
    V_t[r]   = logsumexp_i (L0 - U_t)[:, r]
    soft     = exp(L0 - U_T - V_T)                    (0 on every pair touching padding)

Row step and column step of one iteration share one pass over the tiles: a tile's ``U_t`` rows
are complete as soon as the tile is, and feed the column log-sum-exp (an online max-and-sum in
registers) right away. The backward recomputes the potentials of every iteration into scratch
(``2 n_iter n`` floats per matrix) and runs the adjoint recursion of docs/DESIGN.md backwards
through them, folding each ``dL0`` contribution into the score adjoints immediately.
"""

from __future__ import annotations

import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from lps_fast import _ops

from ._launch import launch, shapes_only

# Constants of the reference (lps_fast/reference/sinkhorn.py), as constexprs the kernels can read.
NORM_EPS = tl.constexpr(1e-12)
MASKED_NORM_EPS = tl.constexpr(1e-6)
ENTROPY_CLAMP = tl.constexpr(1e-12)
LOG_FLOOR = tl.constexpr(-100.0)

# Elements of one [BLOCK_I, BLOCK_N] tile. The backward keeps more tiles live (L0, its sign,
# two exponentials, the upstream gradient), so it walks half as many rows at a time.
# Tests shrink these to reach the multi-tile paths at small n.
TILE_ELEMENTS = 4096
BACKWARD_TILE_ELEMENTS = 2048

# Scratch layout per matrix, in units of n: s, t, dU, ds, dt, then U slots, then V slots.
_S = tl.constexpr(0)
_T = tl.constexpr(1)
_DU = tl.constexpr(2)
_DS = tl.constexpr(3)
_DT = tl.constexpr(4)
_FIXED = tl.constexpr(5)


# ---------------------------------------------------------------------------------------------
# Shared device helpers


@triton.jit
def _real_nodes(mask_ptr, batch, n, i, HAS_MASK: tl.constexpr):
    """True for node indices ``i`` that exist (< n) and are not padding."""
    real = i < n
    if HAS_MASK:
        real = real & (tl.load(mask_ptr + batch * n + i, mask=i < n, other=0) != 0)
    return real


@triton.jit
def _prepare(
    scores_ptr,  # [B * k, n] contiguous
    mask_ptr,  # [B, n] uint8 contiguous
    order_ptr,  # perm out [B * k, n] int64 (WRITE_PERM) or rank out [B * k, n] int32
    scratch,  # this matrix's scratch
    sample,
    batch,
    n,
    HAS_MASK: tl.constexpr,
    WRITE_PERM: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Steps 1-2: normalize, rank, and lay out ``s`` and ``t`` in scratch.

    ``s = x / max(||x||, eps)`` over real nodes (padded: 0), rounded to the input dtype as the
    reference stores it, so that ranks (and ties) are those of the reference. The descending
    stable sort is a rank count: ``rank[i] = #{m : key[m] > key[i] or (key[m] == key[i] and
    m < i)}`` with padded keys ``-inf`` (they sort last, in index order) and NaN keys ``+inf``
    (ranks stay a permutation whatever the input). Returns ``(norm, denominator, n_real)``.
    """
    # tl.full keeps a float64 epsilon exact (a bare literal is rounded to float32)
    eps = tl.full([], MASKED_NORM_EPS if HAS_MASK else NORM_EPS, ACC)
    in_dtype = scores_ptr.dtype.element_ty
    m = tl.arange(0, BLOCK_N)
    inside = m < n
    real = _real_nodes(mask_ptr, batch, n, m, HAS_MASK)
    x = tl.load(scores_ptr + sample * n + m, mask=real, other=0.0).to(ACC)
    norm = tl.sqrt(tl.sum(x * x, axis=0))
    denominator = tl.maximum(norm.to(in_dtype).to(ACC), eps)
    s = (x / denominator).to(in_dtype).to(ACC)
    tl.store(scratch + _S * n + m, s, mask=inside)
    key_m = tl.where(real, s, float("-inf"))
    key_m = tl.where(key_m != key_m, float("inf"), key_m)
    tl.debug_barrier()
    for i0 in range(0, n, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_inside = i < n
        s_i = tl.load(scratch + _S * n + i, mask=i_inside, other=0.0)
        key_i = tl.where(_real_nodes(mask_ptr, batch, n, i, HAS_MASK), s_i, float("-inf"))
        key_i = tl.where(key_i != key_i, float("inf"), key_i)
        ahead = (key_m[None, :] > key_i[:, None]) | ((key_m[None, :] == key_i[:, None]) & (m[None, :] < i[:, None]))
        rank = tl.sum((ahead & inside[None, :]).to(tl.int32), axis=1)
        if WRITE_PERM:
            tl.store(order_ptr + sample * n + rank, i.to(tl.int64), mask=i_inside)
        else:
            tl.store(order_ptr + sample * n + i, rank, mask=i_inside)
        tl.store(scratch + _T * n + rank, s_i, mask=i_inside)  # t[rank[i]] = s[i]
    tl.debug_barrier()
    n_real = tl.sum(real.to(tl.int32), axis=0)
    return norm, denominator, n_real


@triton.jit
def _log_kernel_tile(scratch, t, n, i, inv_tau):
    """``(L0, s[i] - t[r])`` for a row block ``i`` and all positions r, with
    ``L0[i, r] = -|s[i] - t[r]| / tau``."""
    s_i = tl.load(scratch + _S * n + i, mask=i < n, other=0.0)
    difference = s_i[:, None] - t[None, :]
    return -tl.abs(difference) * inv_tau, difference


@triton.jit
def _slope(difference, inv_tau):
    """``dL0/ds[i] = -sign(s[i] - t[r]) / tau`` (``sign(0) = 0``, as autograd's ``abs``)."""
    return tl.where(difference > 0, -inv_tau, tl.where(difference < 0, inv_tau, 0.0))


@triton.jit
def _potentials(
    scratch,
    mask_ptr,
    batch,
    n,
    n_real,
    n_iter,
    inv_tau,
    slots,
    HAS_MASK: tl.constexpr,
    SAVE_ALL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Step 4 in dual potentials. Writes ``U_t`` to the U slots of scratch (slot ``t - 1`` with
    ``SAVE_ALL``, else slot 0 each time) and, with ``SAVE_ALL``, ``V_t`` to the V slots.
    Returns ``(t, V_T)`` as ``[BLOCK_N]`` vectors."""
    r = tl.arange(0, BLOCK_N)
    r_inside = r < n
    real_r = r < n_real  # real nodes sort first
    t = tl.load(scratch + _T * n + r, mask=r_inside, other=0.0)
    u_slots = scratch + _FIXED * n
    v_slots = u_slots + slots * n
    V = tl.zeros([BLOCK_N], dtype=ACC)
    for iteration in range(0, n_iter):
        column_max = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
        column_sum = tl.zeros([BLOCK_N], dtype=ACC)
        for i0 in range(0, n, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            real_i = _real_nodes(mask_ptr, batch, n, i, HAS_MASK)
            valid = real_i[:, None] & real_r[None, :]
            log_kernel, difference = _log_kernel_tile(scratch, t, n, i, inv_tau)
            # row step: U_t[i] = logsumexp_r (L0 - V_{t-1})
            a = tl.where(valid, log_kernel - V[None, :], float("-inf"))
            row_max = tl.where(real_i, tl.max(a, axis=1), 0.0)
            row_sum = tl.sum(tl.exp(a - row_max[:, None]), axis=1)
            U = tl.where(real_i, row_max + tl.log(tl.where(real_i, row_sum, 1.0)), 0.0)
            if SAVE_ALL:
                tl.store(u_slots + iteration * n + i, U, mask=i < n)
            else:
                tl.store(u_slots + i, U, mask=i < n)
            # column step, streamed: V_t[r] = logsumexp_i (L0 - U_t)
            b = tl.where(valid, log_kernel - U[:, None], float("-inf"))
            new_max = tl.maximum(column_max, tl.max(b, axis=0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            column_sum = column_sum * tl.exp(column_max - shift) + tl.sum(tl.exp(b - shift[None, :]), axis=0)
            column_max = new_max
        V = tl.where(real_r, column_max + tl.log(tl.where(real_r, column_sum, 1.0)), 0.0)
        if SAVE_ALL:
            tl.store(v_slots + iteration * n + r, V, mask=r_inside)
    tl.debug_barrier()
    return t, V


# ---------------------------------------------------------------------------------------------
# Sinkhorn kernels


@triton.jit
def _sinkhorn_sort_kernel(
    scores_ptr,  # [B * k, n] contiguous
    mask_ptr,  # [B, n] uint8 contiguous (unused without HAS_MASK)
    soft_ptr,  # [B * k, n, n] contiguous out
    perm_ptr,  # [B * k, n] int64 out
    scratch_ptr,  # [B * k, scratch_stride] float32/float64
    k,
    n,
    tau_high,
    tau_low,
    n_iter,
    scratch_stride,
    HAS_MASK: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``soft, perm = sinkhorn_sort(scores)`` for the matrix ``(b, j) = divmod(program, k)``.

    scores ``[B, k, n]`` -> soft ``[B, k, n, n]`` (node i x position r), perm ``[B, k, n]``.
    Grid: ``(B * k,)``.
    """
    ACC = tl.float64 if IS_FP64 else tl.float32
    inv_tau = 1.0 / (tl.cast(tau_high, ACC) + tl.cast(tau_low, ACC))
    sample = tl.program_id(0).to(tl.int64)
    batch = sample // k
    scratch = scratch_ptr + sample * scratch_stride
    norm, denominator, n_real = _prepare(
        scores_ptr, mask_ptr, perm_ptr, scratch, sample, batch, n, HAS_MASK, True, ACC, BLOCK_I, BLOCK_N
    )
    t, V = _potentials(scratch, mask_ptr, batch, n, n_real, n_iter, inv_tau, 1, HAS_MASK, False, ACC, BLOCK_I, BLOCK_N)
    r = tl.arange(0, BLOCK_N)
    real_r = r < n_real
    soft_matrix = soft_ptr + sample * n * n
    for i0 in range(0, n, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        real_i = _real_nodes(mask_ptr, batch, n, i, HAS_MASK)
        valid = real_i[:, None] & real_r[None, :]
        log_kernel, difference = _log_kernel_tile(scratch, t, n, i, inv_tau)
        U = tl.load(scratch + _FIXED * n + i, mask=(i < n) & (n_iter > 0), other=0.0)
        soft = tl.where(valid, tl.exp(log_kernel - U[:, None] - V[None, :]), 0.0)
        tl.store(
            soft_matrix + i.to(tl.int64)[:, None] * n + r[None, :],
            soft.to(soft_ptr.dtype.element_ty),
            mask=(i < n)[:, None] & (r < n)[None, :],
        )


@triton.jit
def _sinkhorn_sort_backward_kernel(
    grad_ptr,  # [B, k, n, n] strided: dL/dsoft
    scores_ptr,  # [B * k, n] contiguous
    mask_ptr,  # [B, n] uint8 contiguous (unused without HAS_MASK)
    out_ptr,  # [B * k, n] contiguous out: dL/dscores
    rank_ptr,  # [B * k, n] int32 scratch
    scratch_ptr,  # [B * k, scratch_stride]
    k,
    n,
    grad_stride_b,
    grad_stride_j,
    grad_stride_i,
    grad_stride_r,
    tau_high,
    tau_low,
    n_iter,
    slots,
    scratch_stride,
    HAS_MASK: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``dL/dscores`` of ``sinkhorn_sort`` through all ``n_iter`` iterations. Grid: ``(B * k,)``.

    After recomputing ``s``, ``t``, ranks and every ``U_t``, ``V_t`` (T = n_iter)::

        dL = G * soft:        dU_T = -sum_r dL,  dV_T = -sum_i dL,  dL0 += dL
        for t = T .. 1:
          column step (P = exp(L0 - U_t - V_t)):      dL0 += dV_t[r] P;  dU_t -= sum_r dV_t[r] P
          row step    (Q = exp(L0 - U_t - V_{t-1})):  dL0 += dU_t[i] Q;  dV_{t-1} = -sum_i dU_t[i] Q
        ds[i] += sum_r dL0 c,  dt[r] -= sum_i dL0 c,  c = -sign(s[i] - t[r]) / tau
        ds[perm[r]] += dt[r]; then through s = x / max(||x||, eps): (ds - s <s, ds>) / ||x||
        when ||x|| >= eps, else ds / eps; 0 on padded nodes.
    """
    ACC = tl.float64 if IS_FP64 else tl.float32
    inv_tau = 1.0 / (tl.cast(tau_high, ACC) + tl.cast(tau_low, ACC))
    sample = tl.program_id(0).to(tl.int64)
    batch = sample // k
    j = sample % k
    scratch = scratch_ptr + sample * scratch_stride
    norm, denominator, n_real = _prepare(
        scores_ptr, mask_ptr, rank_ptr, scratch, sample, batch, n, HAS_MASK, False, ACC, BLOCK_I, BLOCK_N
    )
    t, V_last = _potentials(
        scratch, mask_ptr, batch, n, n_real, n_iter, inv_tau, slots, HAS_MASK, True, ACC, BLOCK_I, BLOCK_N
    )
    r = tl.arange(0, BLOCK_N)
    r_inside = r < n
    real_r = r < n_real
    u_slots = scratch + _FIXED * n
    v_slots = u_slots + slots * n
    grad_matrix = grad_ptr + batch * grad_stride_b + j * grad_stride_j

    # ---- the output: dL = G * soft
    dV = tl.zeros([BLOCK_N], dtype=ACC)
    dt = tl.zeros([BLOCK_N], dtype=ACC)
    for i0 in range(0, n, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        real_i = _real_nodes(mask_ptr, batch, n, i, HAS_MASK)
        valid = real_i[:, None] & real_r[None, :]
        log_kernel, difference = _log_kernel_tile(scratch, t, n, i, inv_tau)
        slope = _slope(difference, inv_tau)
        U = tl.load(u_slots + (n_iter - 1) * n + i, mask=(i < n) & (n_iter > 0), other=0.0)
        soft = tl.where(valid, tl.exp(log_kernel - U[:, None] - V_last[None, :]), 0.0)
        G = tl.load(
            grad_matrix + (i.to(tl.int64) * grad_stride_i)[:, None] + (r.to(tl.int64) * grad_stride_r)[None, :],
            mask=valid,
            other=0.0,
        ).to(ACC)
        d_log = G * soft
        d_scores = d_log * slope
        tl.store(scratch + _DU * n + i, -tl.sum(d_log, axis=1), mask=i < n)
        tl.store(scratch + _DS * n + i, tl.sum(d_scores, axis=1), mask=i < n)
        dV -= tl.sum(d_log, axis=0)
        dt -= tl.sum(d_scores, axis=0)
    tl.debug_barrier()

    # ---- the iterations, last first
    for step in range(0, n_iter):
        slot = n_iter - 1 - step  # U_t, V_t with t = slot + 1
        V_t = tl.load(v_slots + slot * n + r, mask=r_inside, other=0.0)
        V_before = tl.load(v_slots + (slot - 1) * n + r, mask=r_inside & (slot > 0), other=0.0)
        dU_output = tl.where(step == 0, 1.0, 0.0)  # dU_T starts with the output's share
        dV_before = tl.zeros([BLOCK_N], dtype=ACC)
        for i0 in range(0, n, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            real_i = _real_nodes(mask_ptr, batch, n, i, HAS_MASK)
            valid = real_i[:, None] & real_r[None, :]
            log_kernel, difference = _log_kernel_tile(scratch, t, n, i, inv_tau)
            slope = _slope(difference, inv_tau)
            U = tl.load(u_slots + slot * n + i, mask=i < n, other=0.0)
            shifted = log_kernel - U[:, None]
            column_adjoint = dV[None, :] * tl.where(valid, tl.exp(shifted - V_t[None, :]), 0.0)
            dU = -tl.sum(column_adjoint, axis=1)
            dU += dU_output * tl.load(scratch + _DU * n + i, mask=i < n, other=0.0)
            row_adjoint = dU[:, None] * tl.where(valid, tl.exp(shifted - V_before[None, :]), 0.0)
            dV_before -= tl.sum(row_adjoint, axis=0)
            d_scores = (column_adjoint + row_adjoint) * slope
            ds = tl.load(scratch + _DS * n + i, mask=i < n, other=0.0)
            tl.store(scratch + _DS * n + i, ds + tl.sum(d_scores, axis=1), mask=i < n)
            dt -= tl.sum(d_scores, axis=0)
        dV = dV_before
        tl.debug_barrier()

    # ---- sorted scores back onto their nodes, then the normalization
    tl.store(scratch + _DT * n + r, dt, mask=r_inside)
    tl.debug_barrier()
    m = tl.arange(0, BLOCK_N)
    inside = m < n
    real = _real_nodes(mask_ptr, batch, n, m, HAS_MASK)
    rank = tl.load(rank_ptr + sample * n + m, mask=inside, other=0)
    ds = tl.load(scratch + _DS * n + m, mask=inside, other=0.0)
    ds += tl.load(scratch + _DT * n + rank, mask=inside, other=0.0)
    ds = tl.where(real, ds, 0.0)
    x = tl.load(scores_ptr + sample * n + m, mask=real, other=0.0).to(ACC)
    above = norm >= tl.full([], MASKED_NORM_EPS if HAS_MASK else NORM_EPS, ACC)
    # d/dx of x / max(||x||, eps): the ||x|| path is live only when the clamp is not.
    through_norm = tl.sum(ds * x, axis=0) / (denominator * denominator * tl.where(above, norm, 1.0))
    dx = ds / denominator - tl.where(above, through_norm, 0.0) * x
    dx = tl.where(real, dx, 0.0)
    tl.store(out_ptr + sample * n + m, dx.to(out_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------
# Permutation entropy kernels


@triton.jit
def _entropy_terms(x):
    """``x * l(x)`` and ``g(x) = -(l(x) + [log x >= -100])`` with ``l(x) = max(log x, -100)``."""
    log_x = tl.log(x)
    floored = tl.maximum(log_x, LOG_FLOOR)
    return x * floored, -(floored + tl.where(log_x >= LOG_FLOOR, 1.0, 0.0))


@triton.jit
def _entropy_tile(soft_matrix, mask_ptr, batch, n, i, r, stride_i, stride_r, HAS_MASK: tl.constexpr, ACC: tl.constexpr):
    """A row block of ``a = max(S, 1e-12)`` on real pairs (0 elsewhere), its validity and raw values."""
    real_i = _real_nodes(mask_ptr, batch, n, i, HAS_MASK)
    real_r = _real_nodes(mask_ptr, batch, n, r, HAS_MASK)
    valid = real_i[:, None] & real_r[None, :]
    offsets = (i.to(tl.int64) * stride_i)[:, None] + (r.to(tl.int64) * stride_r)[None, :]
    S = tl.load(soft_matrix + offsets, mask=valid, other=0.0).to(ACC)
    clamped = tl.where(valid, tl.maximum(S, tl.full([], ENTROPY_CLAMP, ACC)), 0.0)
    return clamped, valid, S


@triton.jit
def _column_sums(
    soft_matrix,
    mask_ptr,
    batch,
    n,
    stride_i,
    stride_r,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Column sums ``c_r = sum_i a[i, r]`` of the clamped real entries (1 where a column is empty)."""
    r = tl.arange(0, BLOCK_N)
    column_sum = tl.zeros([BLOCK_N], dtype=ACC)
    for i0 in range(0, n, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        clamped, valid, S = _entropy_tile(soft_matrix, mask_ptr, batch, n, i, r, stride_i, stride_r, HAS_MASK, ACC)
        column_sum += tl.sum(clamped, axis=0)
    return tl.where(column_sum > 0, column_sum, 1.0)


@triton.jit
def _permutation_entropy_kernel(
    soft_ptr,  # [B, k, n, n] strided
    mask_ptr,  # [B, n] uint8 contiguous (unused without HAS_MASK)
    partial_ptr,  # [B * k] float32/float64 out: this matrix's share of the mean
    k,
    n,
    stride_b,
    stride_j,
    stride_i,
    stride_r,
    batch_size,
    HAS_MASK: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``partial[b, j] = -sum_{real pairs} (p l(p) + q l(q)) / (B k n_real_b)``, with
    ``p = a / colsum``, ``q = a / rowsum``; the launcher adds the ``B k`` partials in order.
    Two passes over the rows: column sums, then both entropies. Grid: ``(B * k,)``."""
    ACC = tl.float64 if IS_FP64 else tl.float32
    sample = tl.program_id(0).to(tl.int64)
    batch = sample // k
    j = sample % k
    soft_matrix = soft_ptr + batch * stride_b + j * stride_j
    r = tl.arange(0, BLOCK_N)
    column_sum = _column_sums(soft_matrix, mask_ptr, batch, n, stride_i, stride_r, HAS_MASK, ACC, BLOCK_I, BLOCK_N)
    total = tl.zeros([BLOCK_N], dtype=ACC)
    for i0 in range(0, n, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        clamped, valid, S = _entropy_tile(soft_matrix, mask_ptr, batch, n, i, r, stride_i, stride_r, HAS_MASK, ACC)
        row_sum = tl.sum(clamped, axis=1)
        q = tl.where(valid, clamped / tl.where(row_sum > 0, row_sum, 1.0)[:, None], 1.0)
        p = tl.where(valid, clamped / column_sum[None, :], 1.0)
        q_term, g_q = _entropy_terms(q)
        p_term, g_p = _entropy_terms(p)
        total += tl.sum(tl.where(valid, p_term + q_term, 0.0), axis=0)
    n_real = tl.sum(_real_nodes(mask_ptr, batch, n, r, HAS_MASK).to(ACC), axis=0)
    scale = 1.0 / (batch_size * k * tl.maximum(n_real, 1.0))
    tl.store(partial_ptr + sample, -tl.sum(total, axis=0) * scale)


@triton.jit
def _permutation_entropy_backward_kernel(
    grad_ptr,  # [] upstream gradient of the scalar
    soft_ptr,  # [B, k, n, n] strided
    mask_ptr,  # [B, n] uint8 contiguous (unused without HAS_MASK)
    out_ptr,  # [B, k, n, n] contiguous out
    k,
    n,
    stride_b,
    stride_j,
    stride_i,
    stride_r,
    batch_size,
    HAS_MASK: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``dE/dS[i, r] = scale [S >= 1e-12] ((g(p) - sum_m g(p[m, r]) p[m, r]) / c_r
    + (g(q) - sum_s g(q[i, s]) q[i, s]) / w_i)`` on real pairs, 0 elsewhere, with
    ``scale = grad / (B k n_real_b)`` (docs/DESIGN.md). Passes: column sums ``c``; the column
    terms ``sum_m g(p) p``; the gradient (row sums and row terms complete inside each tile).
    Grid: ``(B * k,)``."""
    ACC = tl.float64 if IS_FP64 else tl.float32
    sample = tl.program_id(0).to(tl.int64)
    batch = sample // k
    j = sample % k
    soft_matrix = soft_ptr + batch * stride_b + j * stride_j
    r = tl.arange(0, BLOCK_N)
    column_sum = _column_sums(soft_matrix, mask_ptr, batch, n, stride_i, stride_r, HAS_MASK, ACC, BLOCK_I, BLOCK_N)
    column_term = tl.zeros([BLOCK_N], dtype=ACC)
    for i0 in range(0, n, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        clamped, valid, S = _entropy_tile(soft_matrix, mask_ptr, batch, n, i, r, stride_i, stride_r, HAS_MASK, ACC)
        p = tl.where(valid, clamped / column_sum[None, :], 1.0)
        p_term, g_p = _entropy_terms(p)
        column_term += tl.sum(tl.where(valid, g_p * p, 0.0), axis=0)
    n_real = tl.sum(_real_nodes(mask_ptr, batch, n, r, HAS_MASK).to(ACC), axis=0)
    scale = tl.load(grad_ptr).to(ACC) / (batch_size * k * tl.maximum(n_real, 1.0))
    out_matrix = out_ptr + sample * n * n
    for i0 in range(0, n, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        clamped, valid, S = _entropy_tile(soft_matrix, mask_ptr, batch, n, i, r, stride_i, stride_r, HAS_MASK, ACC)
        row_sum = tl.sum(clamped, axis=1)
        row_sum = tl.where(row_sum > 0, row_sum, 1.0)
        q = tl.where(valid, clamped / row_sum[:, None], 1.0)
        p = tl.where(valid, clamped / column_sum[None, :], 1.0)
        q_term, g_q = _entropy_terms(q)
        p_term, g_p = _entropy_terms(p)
        row_term = tl.sum(tl.where(valid, g_q * q, 0.0), axis=1)
        grad = (g_p - column_term[None, :]) / column_sum[None, :] + (g_q - row_term[:, None]) / row_sum[:, None]
        grad = tl.where(valid & (S >= tl.full([], ENTROPY_CLAMP, ACC)), grad * scale, 0.0)
        tl.store(
            out_matrix + i.to(tl.int64)[:, None] * n + r[None, :],
            grad.to(out_ptr.dtype.element_ty),
            mask=(i < n)[:, None] & (r < n)[None, :],
        )


# ---------------------------------------------------------------------------------------------
# Host launchers


def _split(value: float) -> Tuple[float, float]:
    """``value`` as two float32 numbers whose sum keeps about 48 bits: Triton passes Python
    floats as float32, which would cost float64 inputs half their precision in ``1 / tau``."""
    value = float(value)  # a traced SymFloat specializes here
    high = struct.unpack("f", struct.pack("f", value))[0]
    return high, value - high


def _tile(n: int, elements: int):
    """``(BLOCK_I, BLOCK_N, num_warps)``: full-width row tiles of about ``elements`` entries."""
    block_n = triton.next_power_of_2(max(int(n), 1))
    block_i = max(1, min(block_n, elements // block_n))
    # About 16 tile entries per thread and live temporary.
    num_warps = min(max(block_i * block_n // 512, 1), 8)
    return block_i, block_n, num_warps


def _mask_arg(mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like if mask is None else mask.contiguous().view(torch.uint8)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinkhorn_sort(
    scores: torch.Tensor, tau: float, n_iter: int, mask: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, k, n = scores.shape
    soft = torch.empty((batch, k, n, n), dtype=scores.dtype, device=scores.device)
    perm = torch.empty((batch, k, n), dtype=torch.int64, device=scores.device)
    if perm.numel() == 0 or shapes_only(scores):
        return soft, perm
    scores = scores.contiguous()
    scratch_stride = (_FIXED.value + 2) * n
    scratch = torch.empty((batch * k, scratch_stride), dtype=_accumulator_dtype(scores.dtype), device=scores.device)
    block_i, block_n, num_warps = _tile(n, TILE_ELEMENTS)
    launch(
        _sinkhorn_sort_kernel,
        (batch * k,),
        scores,
        scores,
        _mask_arg(mask, scores),
        soft,
        perm,
        scratch,
        k,
        n,
        *_split(tau),
        n_iter,
        scratch_stride,
        HAS_MASK=mask is not None,
        IS_FP64=scores.dtype == torch.float64,
        BLOCK_I=block_i,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return soft, perm


def sinkhorn_sort_backward(
    grad_soft: torch.Tensor, scores: torch.Tensor, tau: float, n_iter: int, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    batch, k, n = scores.shape
    grad = torch.empty((batch, k, n), dtype=scores.dtype, device=scores.device)
    if grad.numel() == 0 or shapes_only(grad_soft, scores):
        return grad
    scores = scores.contiguous()
    slots = max(n_iter, 1)
    scratch_stride = (_FIXED.value + 2 * slots) * n
    scratch = torch.empty((batch * k, scratch_stride), dtype=_accumulator_dtype(scores.dtype), device=scores.device)
    ranks = torch.empty((batch, k, n), dtype=torch.int32, device=scores.device)
    block_i, block_n, num_warps = _tile(n, BACKWARD_TILE_ELEMENTS)
    launch(
        _sinkhorn_sort_backward_kernel,
        (batch * k,),
        scores,
        grad_soft,
        scores,
        _mask_arg(mask, scores),
        grad,
        ranks,
        scratch,
        k,
        n,
        *grad_soft.stride(),
        *_split(tau),
        n_iter,
        slots,
        scratch_stride,
        HAS_MASK=mask is not None,
        IS_FP64=scores.dtype == torch.float64,
        BLOCK_I=block_i,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return grad


def permutation_entropy(soft: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    batch, k, n, _ = soft.shape
    partial = torch.zeros((batch * k,), dtype=_accumulator_dtype(soft.dtype), device=soft.device)
    if batch * k * n > 0 and not shapes_only(soft):
        block_i, block_n, num_warps = _tile(n, TILE_ELEMENTS)
        launch(
            _permutation_entropy_kernel,
            (batch * k,),
            soft,
            soft,
            _mask_arg(mask, soft),
            partial,
            k,
            n,
            *soft.stride(),
            batch,
            HAS_MASK=mask is not None,
            IS_FP64=soft.dtype == torch.float64,
            BLOCK_I=block_i,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    # B k partials summed by torch in a fixed order: deterministic, and no atomics.
    return partial.sum().to(soft.dtype)


def permutation_entropy_backward(grad: torch.Tensor, soft: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    batch, k, n, _ = soft.shape
    out = torch.empty((batch, k, n, n), dtype=soft.dtype, device=soft.device)
    if out.numel() == 0 or shapes_only(grad, soft):
        return out
    block_i, block_n, num_warps = _tile(n, BACKWARD_TILE_ELEMENTS)
    launch(
        _permutation_entropy_backward_kernel,
        (batch * k,),
        soft,
        grad.reshape(()).contiguous(),
        soft,
        _mask_arg(mask, soft),
        out,
        k,
        n,
        *soft.stride(),
        batch,
        HAS_MASK=mask is not None,
        IS_FP64=soft.dtype == torch.float64,
        BLOCK_I=block_i,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Registered ops (schemas of lps_fast._ops.SCHEMAS and BACKWARD_SCHEMAS)


@torch.library.triton_op(
    "lps_fast::sinkhorn_sort_triton", mutates_args=(), schema=_ops.SCHEMAS["sinkhorn_sort"]
)
def sinkhorn_sort_triton(
    scores: torch.Tensor, tau: float, n_iter: int = 20, mask: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    return sinkhorn_sort(scores, tau, n_iter, mask)


@torch.library.triton_op(
    "lps_fast::sinkhorn_sort_backward_triton", mutates_args=(), schema=_ops.BACKWARD_SCHEMAS["sinkhorn_sort_backward"]
)
def sinkhorn_sort_backward_triton(
    grad_soft: torch.Tensor, scores: torch.Tensor, tau: float, n_iter: int, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    return sinkhorn_sort_backward(grad_soft, scores, tau, n_iter, mask)


@torch.library.triton_op(
    "lps_fast::permutation_entropy_triton", mutates_args=(), schema=_ops.SCHEMAS["permutation_entropy"]
)
def permutation_entropy_triton(soft: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return permutation_entropy(soft, mask)


@torch.library.triton_op(
    "lps_fast::permutation_entropy_backward_triton",
    mutates_args=(),
    schema=_ops.BACKWARD_SCHEMAS["permutation_entropy_backward"],
)
def permutation_entropy_backward_triton(
    grad: torch.Tensor, soft: torch.Tensor, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    return permutation_entropy_backward(grad, soft, mask)
