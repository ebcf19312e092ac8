"""Triton kernels for ``vn_layer`` (docs/SPEC.md, "The distribution network's fused layer"):
the GPU counterpart of ``csrc/cpu/vn_layer_cpu.cpp``, the same passes over the same entries.

One program handles ``BLOCK_R`` rows (nodes ``(b, i)``) with all channels as ``[BLOCK_R,
BLOCK_C]`` tiles, one per coordinate, and loops over the ``K`` neighbours. An entry's vectors
are read from the per-node tensors (``p[b, j] + p_centre[b, i]``), so no edge tensor exists.

* statistics (training): per-channel sums of ``l`` and ``l^2`` over the real entries, added
  across programs in float64 (atomics: the order of the additions, so the last bits, may vary
  between runs);
* forward: batch norm, the VN leaky ReLU and, for an edge convolution, the max-pool: ``pool @
  out`` is a ``tl.dot`` of the tile with the transposed pool matrix, in IEEE float32 (TF32 would
  change which neighbour wins a near tie);
* backward, pass 1: per-channel sums of ``g_y`` and ``g_y * xhat`` (the entries without
  upstream gradient contribute zero);
* backward, pass 2: each entry's gradients of p and d, added to the node read (atomics: several
  rows read the same node) and to the centre node (this program's own row: a plain store).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lps_fast import _ops

from ._launch import launch, shapes_only

VECTOR_EPS = tl.constexpr(1e-6)  # added to vector lengths and squared direction lengths
BLOCK_ROWS = 16


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _rows(pid, rows, n, mask_ptr, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr):
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # 64-bit offsets from here on
    in_rows = r < rows
    valid = in_rows
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + r, mask=in_rows, other=0) != 0)
    return r, in_rows, valid, r // n, r % n


@triton.jit
def _pool_dot(o, pool_t, IS_FP64: tl.constexpr):
    """``o @ pool^T`` for a tile of entries: ``tl.dot`` in IEEE float32 (TF32 would change which
    neighbour wins a near tie); float64 as a broadcast product and sum (its ``tl.dot`` does not
    lower with every mask pattern)."""
    if IS_FP64:
        return tl.sum(o[:, :, None] * pool_t[None, :, :], axis=1)
    return tl.dot(o, pool_t, input_precision="ieee", out_dtype=o.dtype)


@triton.jit
def _neighbour(r, i, k, K, in_rows, nbr_ptr, HAS_NBR: tl.constexpr):
    j = i
    if HAS_NBR:
        j = tl.load(nbr_ptr + r * K + k, mask=in_rows, other=0).to(tl.int64)
    return j


@triton.jit
def _entry(ptr, centre_ptr, b, i, j, a: tl.constexpr, s0, s1, s2, cs0, cs1, cs2, c, m2, HAS_CENTRE: tl.constexpr):
    """Coordinate ``a`` of an entry's vectors: ``ptr[b, j, a, c] (+ centre_ptr[b, i, a, c])``."""
    x = tl.load(ptr + b[:, None] * s0 + j[:, None] * s1 + a * s2 + c[None, :], mask=m2, other=0.0)
    if HAS_CENTRE:
        x += tl.load(centre_ptr + b[:, None] * cs0 + i[:, None] * cs1 + a * cs2 + c[None, :], mask=m2, other=0.0)
    return x


@triton.jit
def _entry_vectors(ptr, centre_ptr, b, i, j, s0, s1, s2, cs0, cs1, cs2, c, m2, HAS_CENTRE: tl.constexpr):
    """The three coordinates of an entry's vectors, each a ``[BLOCK_R, BLOCK_C]`` tile."""
    return (_entry(ptr, centre_ptr, b, i, j, 0, s0, s1, s2, cs0, cs1, cs2, c, m2, HAS_CENTRE),
            _entry(ptr, centre_ptr, b, i, j, 1, s0, s1, s2, cs0, cs1, cs2, c, m2, HAS_CENTRE),
            _entry(ptr, centre_ptr, b, i, j, 2, s0, s1, s2, cs0, cs1, cs2, c, m2, HAS_CENTRE))


@triton.jit
def _vn_stats_kernel(p_ptr, pc_ptr, nbr_ptr, mask_ptr, sums_ptr, rows, n, K, C,
                     ps0, ps1, ps2, pcs0, pcs1, pcs2,
                     HAS_CENTRE: tl.constexpr, HAS_NBR: tl.constexpr, HAS_MASK: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, in_rows, valid, b, i = _rows(tl.program_id(0), rows, n, mask_ptr, HAS_MASK, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    m2 = valid[:, None] & (c < C)[None, :]
    total = tl.zeros((BLOCK_C,), dtype=tl.float64)
    squares = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for k in range(K):
        j = _neighbour(r, i, k, K, in_rows, nbr_ptr, HAS_NBR)
        px, py, pz = _entry_vectors(p_ptr, pc_ptr, b, i, j, ps0, ps1, ps2, pcs0, pcs1, pcs2, c, m2, HAS_CENTRE)
        length = tl.where(m2, tl.sqrt(px * px + py * py + pz * pz) + VECTOR_EPS, 0.0).to(tl.float64)
        total += tl.sum(length, axis=0)
        squares += tl.sum(length * length, axis=0)
    tl.atomic_add(sums_ptr + c, total, mask=c < C)
    tl.atomic_add(sums_ptr + C + c, squares, mask=c < C)


@triton.jit
def _vn_forward_kernel(p_ptr, d_ptr, pc_ptr, dc_ptr, nbr_ptr, pool_ptr, mask_ptr, scale_ptr, shift_ptr,
                       out_ptr, sel_ptr, keep_ptr, rows, n, K, C,
                       ps0, ps1, ps2, ds0, ds1, ds2, pcs0, pcs1, pcs2, dcs0, dcs1, dcs2,
                       HAS_PC: tl.constexpr, HAS_DC: tl.constexpr, HAS_NBR: tl.constexpr, HAS_MASK: tl.constexpr,
                       SHARED_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, in_rows, valid, b, i = _rows(tl.program_id(0), rows, n, mask_ptr, HAS_MASK, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    # an edge convolution's padded nodes output 0; a per-node layer transforms every row
    live = valid if HAS_NBR else in_rows
    m2 = live[:, None] & cm[None, :]
    dc_cols = c * 0 if SHARED_D else c  # a shared direction: column 0 in every lane
    scale = tl.load(scale_ptr + c, mask=cm, other=0.0)[None, :]
    shift = tl.load(shift_ptr + c, mask=cm, other=0.0)[None, :]
    keep = tl.load(keep_ptr)  # 1 - slope in the data's dtype (a float argument would be float32)
    if HAS_NBR:
        e = tl.arange(0, BLOCK_C)
        # pool_t[e, c] = pool[c, e]
        pool_t = tl.load(pool_ptr + c[None, :] * C + e[:, None], mask=(e < C)[:, None] & cm[None, :], other=0.0)
    best = tl.full((BLOCK_R, BLOCK_C), float("-inf"), dtype=out_ptr.dtype.element_ty)
    which = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int64)
    kx = tl.zeros((BLOCK_R, BLOCK_C), dtype=out_ptr.dtype.element_ty)
    ky = tl.zeros((BLOCK_R, BLOCK_C), dtype=out_ptr.dtype.element_ty)
    kz = tl.zeros((BLOCK_R, BLOCK_C), dtype=out_ptr.dtype.element_ty)
    for k in range(K):
        j = _neighbour(r, i, k, K, in_rows, nbr_ptr, HAS_NBR)
        px, py, pz = _entry_vectors(p_ptr, pc_ptr, b, i, j, ps0, ps1, ps2, pcs0, pcs1, pcs2, c, m2, HAS_PC)
        dx, dy, dz = _entry_vectors(d_ptr, dc_ptr, b, i, j, ds0, ds1, ds2, dcs0, dcs1, dcs2, dc_cols, m2, HAS_DC)
        length = tl.sqrt(px * px + py * py + pz * pz) + VECTOR_EPS
        ratio = scale + shift / length
        qx, qy, qz = px * ratio, py * ratio, pz * ratio
        dot = qx * dx + qy * dy + qz * dz
        dd = dx * dx + dy * dy + dz * dz + VECTOR_EPS
        shrink = tl.where(dot < 0, keep * dot / dd, 0.0)
        ox, oy, oz = qx - shrink * dx, qy - shrink * dy, qz - shrink * dz
        if HAS_NBR:
            fp64: tl.constexpr = out_ptr.dtype.element_ty == tl.float64
            score = ox * _pool_dot(ox, pool_t, fp64) + oy * _pool_dot(oy, pool_t, fp64) + oz * _pool_dot(oz, pool_t, fp64)
            better = (score > best) | (k == 0)  # strictly larger: the first of equal maxima, as argmax
            best = tl.where(better, score, best)
            which = tl.where(better, k, which)
            kx, ky, kz = tl.where(better, ox, kx), tl.where(better, oy, ky), tl.where(better, oz, kz)
        else:
            kx, ky, kz = ox, oy, oz
    out_rows = out_ptr + r[:, None] * 3 * C + c[None, :]
    stored = in_rows[:, None] & cm[None, :]
    tl.store(out_rows, tl.where(m2, kx, 0.0), mask=stored)
    tl.store(out_rows + C, tl.where(m2, ky, 0.0), mask=stored)
    tl.store(out_rows + 2 * C, tl.where(m2, kz, 0.0), mask=stored)
    if HAS_NBR:
        tl.store(sel_ptr + r[:, None] * C + c[None, :], tl.where(m2, which, 0), mask=stored)


@triton.jit
def _vn_backward_kernel(g_ptr, p_ptr, d_ptr, pc_ptr, dc_ptr, nbr_ptr, sel_ptr, mask_ptr, const_ptr, sums_ptr,
                        gp_ptr, gd_ptr, gpc_ptr, gdc_ptr, keep_ptr, rows, n, K, C, D,
                        ps0, ps1, ps2, ds0, ds1, ds2, pcs0, pcs1, pcs2, dcs0, dcs1, dcs2,
                        FULL: tl.constexpr, HAS_PC: tl.constexpr, HAS_DC: tl.constexpr, HAS_NBR: tl.constexpr,
                        HAS_MASK: tl.constexpr, SHARED_D: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """FULL false: pass 1 (the sums of g_y and g_y * xhat into sums_ptr). FULL true: pass 2.
    const_ptr holds six rows of C: mean, invstd, gamma, beta, mean_gx, mean_gxx."""
    r, in_rows, valid, b, i = _rows(tl.program_id(0), rows, n, mask_ptr, HAS_MASK, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    live = valid if HAS_NBR else in_rows  # rows that receive an upstream gradient
    m2 = live[:, None] & cm[None, :]
    dc_cols = c * 0 if SHARED_D else c  # a shared direction: column 0 in every lane
    keep = tl.load(keep_ptr)  # 1 - slope in the data's dtype (a float argument would be float32)
    mean = tl.load(const_ptr + c, mask=cm, other=0.0)[None, :]
    invstd = tl.load(const_ptr + C + c, mask=cm, other=0.0)[None, :]
    gamma = tl.load(const_ptr + 2 * C + c, mask=cm, other=0.0)[None, :]
    beta = tl.load(const_ptr + 3 * C + c, mask=cm, other=0.0)[None, :]
    in_stats = (valid[:, None] & cm[None, :]).to(gamma.dtype)
    mean_gx = tl.load(const_ptr + 4 * C + c, mask=cm, other=0.0)[None, :] * in_stats
    mean_gxx = tl.load(const_ptr + 5 * C + c, mask=cm, other=0.0)[None, :] * in_stats
    g_rows = g_ptr + r[:, None] * 3 * C + c[None, :]
    gx_node = tl.load(g_rows, mask=m2, other=0.0)
    gy_node = tl.load(g_rows + C, mask=m2, other=0.0)
    gz_node = tl.load(g_rows + 2 * C, mask=m2, other=0.0)
    if HAS_NBR:
        chosen = tl.load(sel_ptr + r[:, None] * C + c[None, :], mask=m2, other=-1)
    total = tl.zeros((BLOCK_C,), dtype=tl.float64)
    weighted = tl.zeros((BLOCK_C,), dtype=tl.float64)
    cpx = tl.zeros((BLOCK_R, BLOCK_C), dtype=gamma.dtype)
    cpy = tl.zeros((BLOCK_R, BLOCK_C), dtype=gamma.dtype)
    cpz = tl.zeros((BLOCK_R, BLOCK_C), dtype=gamma.dtype)
    cdx = tl.zeros((BLOCK_R, BLOCK_C), dtype=gamma.dtype)
    cdy = tl.zeros((BLOCK_R, BLOCK_C), dtype=gamma.dtype)
    cdz = tl.zeros((BLOCK_R, BLOCK_C), dtype=gamma.dtype)
    for k in range(K):
        j = _neighbour(r, i, k, K, in_rows, nbr_ptr, HAS_NBR)
        if HAS_NBR:
            hit = chosen == k
            gx, gyv, gz = tl.where(hit, gx_node, 0.0), tl.where(hit, gy_node, 0.0), tl.where(hit, gz_node, 0.0)
        else:
            gx, gyv, gz = gx_node, gy_node, gz_node
        px, py, pz = _entry_vectors(p_ptr, pc_ptr, b, i, j, ps0, ps1, ps2, pcs0, pcs1, pcs2, c, m2, HAS_PC)
        dx, dy, dz = _entry_vectors(d_ptr, dc_ptr, b, i, j, ds0, ds1, ds2, dcs0, dcs1, dcs2, dc_cols, m2, HAS_DC)
        norm = tl.sqrt(px * px + py * py + pz * pz)
        length = norm + VECTOR_EPS
        xhat = (length - mean) * invstd
        y = xhat * gamma + beta
        ratio = y / length
        qx, qy, qz = px * ratio, py * ratio, pz * ratio
        dot = qx * dx + qy * dy + qz * dz
        inv_dd = 1.0 / (dx * dx + dy * dy + dz * dz + VECTOR_EPS)
        gdot = gx * dx + gyv * dy + gz * dz
        bent = tl.where(dot < 0, keep, 0.0)
        along = bent * gdot * inv_dd
        gqx, gqy, gqz = gx - along * dx, gyv - along * dy, gz - along * dz
        gqp = gqx * px + gqy * py + gqz * pz
        g_y = gqp / length
        if FULL:
            a1 = -bent * dot * inv_dd
            a3 = 2 * bent * dot * gdot * inv_dd * inv_dd
            ddx, ddy, ddz = a1 * gx - along * qx + a3 * dx, a1 * gyv - along * qy + a3 * dy, a1 * gz - along * qz + a3 * dz
            gl = -g_y * ratio + invstd * (gamma * g_y - mean_gx - xhat * mean_gxx)
            by_norm = tl.where(norm > 0, gl / tl.where(norm > 0, norm, 1.0), 0.0)
            gpx, gpy, gpz = gqx * ratio + by_norm * px, gqy * ratio + by_norm * py, gqz * ratio + by_norm * pz
            to_p = gp_ptr + b[:, None] * (n * 3 * C) + j[:, None] * (3 * C) + c[None, :]
            tl.atomic_add(to_p, gpx, mask=m2)
            tl.atomic_add(to_p + C, gpy, mask=m2)
            tl.atomic_add(to_p + 2 * C, gpz, mask=m2)
            cpx, cpy, cpz = cpx + gpx, cpy + gpy, cpz + gpz
            if SHARED_D:
                to_d = gd_ptr + b * (n * 3) + j * 3
                tl.atomic_add(to_d, tl.sum(tl.where(m2, ddx, 0.0), axis=1), mask=live)
                tl.atomic_add(to_d + 1, tl.sum(tl.where(m2, ddy, 0.0), axis=1), mask=live)
                tl.atomic_add(to_d + 2, tl.sum(tl.where(m2, ddz, 0.0), axis=1), mask=live)
            else:
                to_d = gd_ptr + b[:, None] * (n * 3 * C) + j[:, None] * (3 * C) + c[None, :]
                tl.atomic_add(to_d, ddx, mask=m2)
                tl.atomic_add(to_d + C, ddy, mask=m2)
                tl.atomic_add(to_d + 2 * C, ddz, mask=m2)
            cdx, cdy, cdz = cdx + ddx, cdy + ddy, cdz + ddz
        else:
            total += tl.sum(tl.where(m2, g_y, 0.0).to(tl.float64), axis=0)
            weighted += tl.sum(tl.where(m2, g_y * xhat, 0.0).to(tl.float64), axis=0)
    if FULL:
        if HAS_PC:
            to_pc = gpc_ptr + r[:, None] * (3 * C) + c[None, :]
            tl.store(to_pc, tl.where(m2, cpx, 0.0), mask=in_rows[:, None] & cm[None, :])
            tl.store(to_pc + C, tl.where(m2, cpy, 0.0), mask=in_rows[:, None] & cm[None, :])
            tl.store(to_pc + 2 * C, tl.where(m2, cpz, 0.0), mask=in_rows[:, None] & cm[None, :])
        if HAS_DC:
            if SHARED_D:
                to_dc = gdc_ptr + r * 3
                tl.store(to_dc, tl.sum(tl.where(m2, cdx, 0.0), axis=1), mask=in_rows)
                tl.store(to_dc + 1, tl.sum(tl.where(m2, cdy, 0.0), axis=1), mask=in_rows)
                tl.store(to_dc + 2, tl.sum(tl.where(m2, cdz, 0.0), axis=1), mask=in_rows)
            else:
                to_dc = gdc_ptr + r[:, None] * (3 * C) + c[None, :]
                tl.store(to_dc, tl.where(m2, cdx, 0.0), mask=in_rows[:, None] & cm[None, :])
                tl.store(to_dc + C, tl.where(m2, cdy, 0.0), mask=in_rows[:, None] & cm[None, :])
                tl.store(to_dc + 2 * C, tl.where(m2, cdz, 0.0), mask=in_rows[:, None] & cm[None, :])
    else:
        tl.atomic_add(sums_ptr + c, total, mask=cm)
        tl.atomic_add(sums_ptr + C + c, weighted, mask=cm)


# ---------------------------------------------------------------------------------------------
# Host launchers


def _vectors(t):
    """(N, n, 3, C) with a unit last stride (column blocks of a matmul output keep their strides)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


class _Layer:
    """A launch's tensors in the layouts the kernels read, and its sizes."""

    def __init__(self, p, d, p_centre, d_centre, neighbours, mask):
        self.p, self.d, self.p_centre, self.d_centre = (_vectors(t) for t in (p, d, p_centre, d_centre))
        self.nbr = None if neighbours is None else neighbours.contiguous()
        self.mask = None if mask is None else mask.contiguous()
        self.N, self.n, _, self.C = p.shape
        self.K = neighbours.shape[2] if neighbours is not None else 1
        self.rows = self.N * self.n


def _strides(t):
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)


def _or(t, placeholder):
    """Absent optional tensors are passed as a placeholder pointer the kernel never reads."""
    return placeholder if t is None else t


def _block_c(C: int) -> int:
    return max(16, triton.next_power_of_2(int(C)))


def _keep(slope: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((1,), 1.0 - slope, dtype=like.dtype, device=like.device)


def _count(mask, rows: int, K: int, like: torch.Tensor) -> torch.Tensor:
    nodes = mask.sum() if mask is not None else torch.tensor(rows, device=like.device)
    return (nodes * K).to(torch.float64)


def vn_layer(p, d, p_centre, d_centre, neighbours, pool, mask, weight, bias, running_mean, running_var, eps, slope):
    L = _Layer(p, d, p_centre, d_centre, neighbours, mask)
    p, d, p_centre, d_centre, nbr, mask_c = L.p, L.d, L.p_centre, L.d_centre, L.nbr, L.mask
    N, n, K, C, rows = L.N, L.n, L.K, L.C, L.rows
    training = running_mean is None
    out = torch.empty((N, n, 3, C), dtype=p.dtype, device=p.device)
    selected = (torch.zeros((N, n, C), dtype=torch.int64, device=p.device) if neighbours is not None
                else torch.empty((0,), dtype=torch.int64, device=p.device))
    grid = (triton.cdiv(max(rows, 1), BLOCK_ROWS),)
    block_c = _block_c(C)
    if training:
        sums = torch.zeros((2, C), dtype=torch.float64, device=p.device)
        if rows > 0 and C > 0 and not shapes_only(p, d):
            launch(_vn_stats_kernel, grid, p, p, _or(p_centre, p), _or(nbr, p), _or(mask_c, p), sums, rows, n, K, C,
                   *_strides(p), *_strides(p_centre), HAS_CENTRE=p_centre is not None,
                   HAS_NBR=nbr is not None, HAS_MASK=mask_c is not None, BLOCK_R=BLOCK_ROWS, BLOCK_C=block_c)
        count = _count(mask_c, rows, K, p).clamp_min(1.0)
        mean = sums[0] / count
        var = (sums[1] / count - mean * mean).clamp_min(0.0)
    else:
        mean, var = running_mean.to(torch.float64), running_var.to(torch.float64)
    scale = torch.rsqrt(var + eps) * weight.to(torch.float64)
    shift = (bias.to(torch.float64) - mean * scale).to(p.dtype)
    scale = scale.to(p.dtype)
    stats = torch.stack([mean, var]).to(p.dtype)
    if rows > 0 and C > 0 and not shapes_only(p, d):
        launch(_vn_forward_kernel, grid, p, p, d, _or(p_centre, p), _or(d_centre, p), _or(nbr, selected),
               p if pool is None else pool.contiguous(), _or(mask_c, p), scale, shift, out, selected,
               _keep(slope, p), rows, n, K, C, *_strides(p), *_strides(d), *_strides(p_centre), *_strides(d_centre),
               HAS_PC=p_centre is not None, HAS_DC=d_centre is not None, HAS_NBR=nbr is not None,
               HAS_MASK=mask_c is not None, SHARED_D=d.shape[3] == 1 and C > 1, BLOCK_R=BLOCK_ROWS, BLOCK_C=block_c)
    return out, selected, stats


def vn_layer_backward(grad, p, d, p_centre, d_centre, neighbours, selected, mask, weight, bias, stats, training,
                      eps, slope):
    L = _Layer(p, d, p_centre, d_centre, neighbours, mask)
    p, d, p_centre, d_centre, nbr, mask_c = L.p, L.d, L.p_centre, L.d_centre, L.nbr, L.mask
    N, n, K, C, rows = L.N, L.n, L.K, L.C, L.rows
    grad = grad.to(p.dtype).contiguous()
    grad_p = torch.zeros((N, n, 3, C), dtype=p.dtype, device=p.device)
    grad_d = torch.zeros(tuple(d.shape), dtype=p.dtype, device=p.device)
    grad_pc = torch.zeros_like(grad_p) if p_centre is not None else p.new_empty((0,))
    grad_dc = torch.zeros_like(grad_d) if d_centre is not None else p.new_empty((0,))
    sel = selected.contiguous()
    mean, var = stats[0].to(torch.float64), stats[1].to(torch.float64)
    invstd = torch.rsqrt(var + eps)
    gamma, beta = weight.to(torch.float64), bias.to(torch.float64)
    zeros = torch.zeros_like(mean)
    consts = torch.stack([mean, invstd, gamma, beta, zeros, zeros]).to(p.dtype).contiguous()
    sums = torch.zeros((2, C), dtype=torch.float64, device=p.device)
    grid = (triton.cdiv(max(rows, 1), BLOCK_ROWS),)
    common = dict(HAS_PC=p_centre is not None, HAS_DC=d_centre is not None, HAS_NBR=nbr is not None,
                  HAS_MASK=mask_c is not None, SHARED_D=d.shape[3] == 1 and C > 1, BLOCK_R=BLOCK_ROWS,
                  BLOCK_C=_block_c(C))
    strides = (*_strides(p), *_strides(d), *_strides(p_centre), *_strides(d_centre))
    launchable = rows > 0 and C > 0 and not shapes_only(p, d, grad)
    keep = _keep(slope, p)
    if launchable:
        launch(_vn_backward_kernel, grid, p, grad, p, d, _or(p_centre, p), _or(d_centre, p), _or(nbr, sel), sel,
               _or(mask_c, p), consts, sums, grad_p, grad_d, grad_pc, grad_dc, keep, rows, n, K, C, d.shape[3],
               *strides, FULL=False,
               **common)
    grad_weight, grad_bias = sums[1].to(weight.dtype, copy=True), sums[0].to(bias.dtype, copy=True)
    if training:
        count = _count(mask_c, rows, K, p).clamp_min(1.0)
        consts = torch.stack([mean, invstd, gamma, beta, sums[0] * gamma / count,
                              sums[1] * gamma / count]).to(p.dtype).contiguous()
    if launchable:
        launch(_vn_backward_kernel, grid, p, grad, p, d, _or(p_centre, p), _or(d_centre, p), _or(nbr, sel), sel,
               _or(mask_c, p), consts, sums, grad_p, grad_d, grad_pc, grad_dc, keep, rows, n, K, C, d.shape[3],
               *strides, FULL=True,
               **common)
    return grad_p, grad_d, grad_pc, grad_dc, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Registered ops (schemas of lps_fast._ops.NETWORK_SCHEMAS)


@torch.library.triton_op("lps_fast::vn_layer_triton", mutates_args=(), schema=_ops.NETWORK_SCHEMAS["vn_layer"])
def vn_layer_triton(p, d, p_centre, d_centre, neighbours, pool, mask, weight, bias, running_mean, running_var, eps,
                    slope):
    return vn_layer(p, d, p_centre, d_centre, neighbours, pool, mask, weight, bias, running_mean, running_var, eps,
                    slope)


@torch.library.triton_op("lps_fast::vn_layer_backward_triton", mutates_args=(),
                         schema=_ops.NETWORK_SCHEMAS["vn_layer_backward"])
def vn_layer_backward_triton(grad, p, d, p_centre, d_centre, neighbours, selected, mask, weight, bias, stats, training,
                             eps, slope):
    return vn_layer_backward(grad, p, d, p_centre, d_centre, neighbours, selected, mask, weight, bias, stats, training,
                             eps, slope)
