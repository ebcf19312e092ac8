"""Triton kernels for ``gram_schmidt`` and its backward (docs/SPEC.md, "Distribution-side ops").

One program handles ``BLOCK`` independent 3 x 3 matrices; each matrix lives in scalars of one
lane (its nine entries as nine ``[BLOCK]`` vectors), so the whole classical Gram-Schmidt, the
normalization, the determinant flip and the hand-derived reverse pass are straight-line
arithmetic in registers. Matrices are flattened to ``[M, 9]`` rows (``V[..., a, col]`` at
``3 a + col``); the nine strided loads of a block hit the same cache lines.

Forward (columns ``v0, v1, v2``)::

    d00 = <u0, u0>,  u0 = v0
    a1 = <v1, u0> / d00,   u1 = v1 - a1 u0
    a2 = <v2, u0> / d00,   d11 = <u1, u1>,   b2 = <v2, u1> / d11,   u2 = v2 - a2 u0 - b2 u1
    e_m = u_m / max(||u_m||, 1e-12)
    (a quotient by d00 or d11 is 0 when that squared length is 0: a zero column projects nothing)
    proper: det = <e0, e1 x e2>,  R = [det e0, e1, e2];  otherwise R = [e0, e1, e2]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lps_fast import _ops

from ._launch import launch, shapes_only

NORM_EPS = tl.constexpr(1e-12)  # the reference's clamp of each column norm
BLOCK_MATRICES = 128


# ---------------------------------------------------------------------------------------------
# Kernels and their 3-vector helpers (a 3-vector is three [BLOCK] tensors)


@triton.jit
def _dot(ax, ay, az, bx, by, bz):
    return ax * bx + ay * by + az * bz


@triton.jit
def _cross(ax, ay, az, bx, by, bz):
    return ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx


@triton.jit
def _load_column(ptr, column: tl.constexpr, mask, ACC: tl.constexpr):
    """Column ``column`` of row-major 3 x 3 matrices at ``ptr`` ([BLOCK] pointers).

    Lanes past the last matrix read the identity, so their (discarded) arithmetic stays finite.
    """
    x = tl.load(ptr + column, mask=mask, other=1.0 if column == 0 else 0.0).to(ACC)
    y = tl.load(ptr + 3 + column, mask=mask, other=1.0 if column == 1 else 0.0).to(ACC)
    z = tl.load(ptr + 6 + column, mask=mask, other=1.0 if column == 2 else 0.0).to(ACC)
    return x, y, z


@triton.jit
def _store_column(ptr, column, x, y, z, mask):
    dtype = ptr.dtype.element_ty
    tl.store(ptr + column, x.to(dtype), mask=mask)
    tl.store(ptr + 3 + column, y.to(dtype), mask=mask)
    tl.store(ptr + 6 + column, z.to(dtype), mask=mask)


@triton.jit
def _quotient(x, squared_length):
    """``x / squared_length``, and 0 when the squared length is 0 (the projection onto a zero
    vector is zero, as in the reference), without evaluating 0 / 0."""
    nonzero = squared_length > 0
    return tl.where(nonzero, x / tl.where(nonzero, squared_length, 1.0), 0.0)


@triton.jit
def _gram_schmidt_kernel(
    V_ptr,  # [M, 9] contiguous
    R_ptr,  # [M, 9] contiguous
    matrices,
    PROPER: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``R[m] = gram_schmidt(V[m])`` for a block of ``BLOCK`` matrices (module docstring)."""
    ACC = tl.float64 if IS_FP64 else tl.float32
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < matrices
    V = V_ptr + index * 9
    v0x, v0y, v0z = _load_column(V, 0, inside, ACC)
    v1x, v1y, v1z = _load_column(V, 1, inside, ACC)
    v2x, v2y, v2z = _load_column(V, 2, inside, ACC)

    d00 = _dot(v0x, v0y, v0z, v0x, v0y, v0z)
    a1 = _quotient(_dot(v1x, v1y, v1z, v0x, v0y, v0z), d00)
    u1x = v1x - a1 * v0x
    u1y = v1y - a1 * v0y
    u1z = v1z - a1 * v0z
    a2 = _quotient(_dot(v2x, v2y, v2z, v0x, v0y, v0z), d00)
    d11 = _dot(u1x, u1y, u1z, u1x, u1y, u1z)
    b2 = _quotient(_dot(v2x, v2y, v2z, u1x, u1y, u1z), d11)
    u2x = v2x - a2 * v0x - b2 * u1x
    u2y = v2y - a2 * v0y - b2 * u1y
    u2z = v2z - a2 * v0z - b2 * u1z

    eps = tl.full([], NORM_EPS, ACC)  # a bare literal would be rounded to float32
    d0 = tl.maximum(tl.sqrt(d00), eps)
    d1 = tl.maximum(tl.sqrt(d11), eps)
    d2 = tl.maximum(tl.sqrt(_dot(u2x, u2y, u2z, u2x, u2y, u2z)), eps)
    e0x, e0y, e0z = v0x / d0, v0y / d0, v0z / d0
    e1x, e1y, e1z = u1x / d1, u1y / d1, u1z / d1
    e2x, e2y, e2z = u2x / d2, u2y / d2, u2z / d2
    if PROPER:
        cx, cy, cz = _cross(e1x, e1y, e1z, e2x, e2y, e2z)
        det = _dot(e0x, e0y, e0z, cx, cy, cz)
        e0x, e0y, e0z = e0x * det, e0y * det, e0z * det
    R = R_ptr + index * 9
    _store_column(R, 0, e0x, e0y, e0z, inside)
    _store_column(R, 1, e1x, e1y, e1z, inside)
    _store_column(R, 2, e2x, e2y, e2z, inside)


@triton.jit
def _normalize_backward(ux, uy, uz, norm, gx, gy, gz):
    """Adjoint of ``e = u / max(||u||, eps)``: ``(g - e <e, g>) / ||u||`` when ``||u|| >= eps``,
    else ``g / eps`` (the clamp passes its gradient inclusively, as autograd's ``clamp_min``;
    the norm's own gradient at ``u = 0`` is 0)."""
    eps = tl.full([], NORM_EPS, norm.dtype)
    above = norm >= eps
    d = tl.maximum(norm, eps)
    # <g, u> / (d^2 ||u||), only where the clamp is inactive (avoids 0/0 at u = 0).
    coefficient = tl.where(above, _dot(gx, gy, gz, ux, uy, uz) / (d * d * tl.where(above, norm, 1.0)), 0.0)
    return gx / d - coefficient * ux, gy / d - coefficient * uy, gz / d - coefficient * uz


@triton.jit
def _gram_schmidt_backward_kernel(
    grad_ptr,  # [M, 9] contiguous: dL/dR
    V_ptr,  # [M, 9] contiguous
    out_ptr,  # [M, 9] contiguous: dL/dV
    matrices,
    PROPER: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``dL/dV`` of ``gram_schmidt`` by reverse mode through the forward's steps.

    With ``g_m`` the columns of the upstream gradient::

        proper: gdet = <g0, e0>;  ge0 = det g0 + gdet (e1 x e2);  ge1 = g1 + gdet (e2 x e0);
                ge2 = g2 + gdet (e0 x e1)   (the cofactor matrix is d det / d R)
        gu_m from ge_m through the normalization (_normalize_backward)
        u2 = v2 - a2 u0 - b2 u1:   gv2 = gu2;  ga2 = -<gu2, u0>;  gb2 = -<gu2, u1>;
                                   gu0 -= a2 gu2;  gu1 -= b2 gu2
        b2 = <v2, u1> / d11:       gv2 += gb2 u1 / d11;  gu1 += gb2 v2 / d11 - 2 gb2 b2 u1 / d11
        a2 = <v2, u0> / d00:       gv2 += ga2 u0 / d00;  gu0 += ga2 v2 / d00;  gd00 = -ga2 a2 / d00
        u1 = v1 - a1 u0:           gv1 = gu1;  ga1 = -<gu1, u0>;  gu0 -= a1 gu1
        a1 = <v1, u0> / d00:       gv1 += ga1 u0 / d00;  gu0 += ga1 v1 / d00;  gd00 -= ga1 a1 / d00
        d00 = <u0, u0>:            gv0 = gu0 + 2 gd00 u0
    """
    ACC = tl.float64 if IS_FP64 else tl.float32
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < matrices
    V = V_ptr + index * 9
    v0x, v0y, v0z = _load_column(V, 0, inside, ACC)
    v1x, v1y, v1z = _load_column(V, 1, inside, ACC)
    v2x, v2y, v2z = _load_column(V, 2, inside, ACC)
    G = grad_ptr + index * 9
    g0x, g0y, g0z = _load_column(G, 0, inside, ACC)
    g1x, g1y, g1z = _load_column(G, 1, inside, ACC)
    g2x, g2y, g2z = _load_column(G, 2, inside, ACC)

    # ---- recompute the forward
    d00 = _dot(v0x, v0y, v0z, v0x, v0y, v0z)
    a1 = _quotient(_dot(v1x, v1y, v1z, v0x, v0y, v0z), d00)
    u1x = v1x - a1 * v0x
    u1y = v1y - a1 * v0y
    u1z = v1z - a1 * v0z
    a2 = _quotient(_dot(v2x, v2y, v2z, v0x, v0y, v0z), d00)
    d11 = _dot(u1x, u1y, u1z, u1x, u1y, u1z)
    b2 = _quotient(_dot(v2x, v2y, v2z, u1x, u1y, u1z), d11)
    u2x = v2x - a2 * v0x - b2 * u1x
    u2y = v2y - a2 * v0y - b2 * u1y
    u2z = v2z - a2 * v0z - b2 * u1z
    n0 = tl.sqrt(d00)
    n1 = tl.sqrt(d11)
    n2 = tl.sqrt(_dot(u2x, u2y, u2z, u2x, u2y, u2z))

    # ---- determinant flip: R0 = det e0, det = <e0, e1 x e2>
    if PROPER:
        eps = tl.full([], NORM_EPS, ACC)
        d0 = tl.maximum(n0, eps)
        d1 = tl.maximum(n1, eps)
        d2 = tl.maximum(n2, eps)
        e0x, e0y, e0z = v0x / d0, v0y / d0, v0z / d0
        e1x, e1y, e1z = u1x / d1, u1y / d1, u1z / d1
        e2x, e2y, e2z = u2x / d2, u2y / d2, u2z / d2
        c12x, c12y, c12z = _cross(e1x, e1y, e1z, e2x, e2y, e2z)
        c20x, c20y, c20z = _cross(e2x, e2y, e2z, e0x, e0y, e0z)
        c01x, c01y, c01z = _cross(e0x, e0y, e0z, e1x, e1y, e1z)
        det = _dot(e0x, e0y, e0z, c12x, c12y, c12z)
        gdet = _dot(g0x, g0y, g0z, e0x, e0y, e0z)
        g0x, g0y, g0z = det * g0x + gdet * c12x, det * g0y + gdet * c12y, det * g0z + gdet * c12z
        g1x, g1y, g1z = g1x + gdet * c20x, g1y + gdet * c20y, g1z + gdet * c20z
        g2x, g2y, g2z = g2x + gdet * c01x, g2y + gdet * c01y, g2z + gdet * c01z

    # ---- normalization of each column
    gu0x, gu0y, gu0z = _normalize_backward(v0x, v0y, v0z, n0, g0x, g0y, g0z)
    gu1x, gu1y, gu1z = _normalize_backward(u1x, u1y, u1z, n1, g1x, g1y, g1z)
    gu2x, gu2y, gu2z = _normalize_backward(u2x, u2y, u2z, n2, g2x, g2y, g2z)

    # ---- u2 = v2 - a2 u0 - b2 u1
    gv2x, gv2y, gv2z = gu2x, gu2y, gu2z
    ga2 = -_dot(gu2x, gu2y, gu2z, v0x, v0y, v0z)
    gb2 = -_dot(gu2x, gu2y, gu2z, u1x, u1y, u1z)
    gu0x -= a2 * gu2x
    gu0y -= a2 * gu2y
    gu0z -= a2 * gu2z
    gu1x -= b2 * gu2x
    gu1y -= b2 * gu2y
    gu1z -= b2 * gu2z

    # ---- b2 = <v2, u1> / d11, d11 = <u1, u1>
    gb2 = _quotient(gb2, d11)
    gv2x += gb2 * u1x
    gv2y += gb2 * u1y
    gv2z += gb2 * u1z
    gd11_twice = -2.0 * gb2 * b2
    gu1x += gb2 * v2x + gd11_twice * u1x
    gu1y += gb2 * v2y + gd11_twice * u1y
    gu1z += gb2 * v2z + gd11_twice * u1z

    # ---- a2 = <v2, u0> / d00
    ga2 = _quotient(ga2, d00)
    gv2x += ga2 * v0x
    gv2y += ga2 * v0y
    gv2z += ga2 * v0z
    gu0x += ga2 * v2x
    gu0y += ga2 * v2y
    gu0z += ga2 * v2z
    gd00 = -ga2 * a2

    # ---- u1 = v1 - a1 u0
    gv1x, gv1y, gv1z = gu1x, gu1y, gu1z
    ga1 = -_dot(gu1x, gu1y, gu1z, v0x, v0y, v0z)
    gu0x -= a1 * gu1x
    gu0y -= a1 * gu1y
    gu0z -= a1 * gu1z

    # ---- a1 = <v1, u0> / d00
    ga1 = _quotient(ga1, d00)
    gv1x += ga1 * v0x
    gv1y += ga1 * v0y
    gv1z += ga1 * v0z
    gu0x += ga1 * v1x
    gu0y += ga1 * v1y
    gu0z += ga1 * v1z
    gd00 -= ga1 * a1

    # ---- d00 = <u0, u0>, u0 = v0
    gv0x = gu0x + 2.0 * gd00 * v0x
    gv0y = gu0y + 2.0 * gd00 * v0y
    gv0z = gu0z + 2.0 * gd00 * v0z

    out = out_ptr + index * 9
    _store_column(out, 0, gv0x, gv0y, gv0z, inside)
    _store_column(out, 1, gv1x, gv1y, gv1z, inside)
    _store_column(out, 2, gv2x, gv2y, gv2z, inside)


# ---------------------------------------------------------------------------------------------
# Host launchers


def _flat(t: torch.Tensor) -> torch.Tensor:
    # 36 bytes per matrix: a contiguous copy of a strided input is cheaper than strided math.
    return t.reshape(-1, 9).contiguous()


def _launch(kernel, inputs, proper: bool, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    matrices = out.numel() // 9
    if matrices == 0 or shapes_only(like, *inputs):
        return out
    block = min(BLOCK_MATRICES, triton.next_power_of_2(int(matrices)))
    grid = (triton.cdiv(matrices, block),)
    launch(
        kernel,
        grid,
        like,
        *inputs,
        out,
        matrices,
        PROPER=proper,
        IS_FP64=like.dtype == torch.float64,
        BLOCK=block,
        num_warps=4 if block >= 128 else 1,
    )
    return out


def gram_schmidt(V: torch.Tensor, proper: bool) -> torch.Tensor:
    return _launch(_gram_schmidt_kernel, (_flat(V),), proper, V)


def gram_schmidt_backward(grad: torch.Tensor, V: torch.Tensor, proper: bool) -> torch.Tensor:
    return _launch(_gram_schmidt_backward_kernel, (_flat(grad), _flat(V)), proper, V)


# ---------------------------------------------------------------------------------------------
# Registered ops (schemas of lps_fast._ops.SCHEMAS and BACKWARD_SCHEMAS)


@torch.library.triton_op(
    "lps_fast::gram_schmidt_triton", mutates_args=(), schema=_ops.SCHEMAS["gram_schmidt"]
)
def gram_schmidt_triton(V: torch.Tensor, proper: bool = False) -> torch.Tensor:
    return gram_schmidt(V, proper)


@torch.library.triton_op(
    "lps_fast::gram_schmidt_backward_triton", mutates_args=(), schema=_ops.BACKWARD_SCHEMAS["gram_schmidt_backward"]
)
def gram_schmidt_backward_triton(grad: torch.Tensor, V: torch.Tensor, proper: bool) -> torch.Tensor:
    return gram_schmidt_backward(grad, V, proper)
