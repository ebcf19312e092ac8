// Classical Gram-Schmidt on the columns of a 3 x 3 matrix and its hand-derived reverse mode,
// shared by the CPU and CUDA kernels (host and device code). Matrices are row-major:
// m[a * 3 + c] is row a, column c; column c is the vector (m[c], m[3 + c], m[6 + c]).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define LPS_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LPS_FAST_HOST_DEVICE inline
#endif

namespace lps_fast {
namespace gram_schmidt_math {

template <typename T>
struct Vec3 {
  T x, y, z;
};

template <typename T>
LPS_FAST_HOST_DEVICE Vec3<T> column(const T* m, int c) {
  return {m[c], m[3 + c], m[6 + c]};
}
template <typename T>
LPS_FAST_HOST_DEVICE void set_column(T* m, int c, Vec3<T> v) {
  m[c] = v.x;
  m[3 + c] = v.y;
  m[6 + c] = v.z;
}
template <typename T>
LPS_FAST_HOST_DEVICE T dot(Vec3<T> a, Vec3<T> b) {
  return a.x * b.x + a.y * b.y + a.z * b.z;
}
template <typename T>
LPS_FAST_HOST_DEVICE Vec3<T> axpy(T alpha, Vec3<T> a, Vec3<T> b) {  // alpha a + b
  return {alpha * a.x + b.x, alpha * a.y + b.y, alpha * a.z + b.z};
}
template <typename T>
LPS_FAST_HOST_DEVICE Vec3<T> scale(T alpha, Vec3<T> a) {
  return {alpha * a.x, alpha * a.y, alpha * a.z};
}
template <typename T>
LPS_FAST_HOST_DEVICE Vec3<T> cross(Vec3<T> a, Vec3<T> b) {
  return {a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x};
}

// Intermediate values of the forward pass that the backward pass needs.
template <typename T>
struct Forward {
  Vec3<T> v[3];  // input columns
  Vec3<T> u[3];  // orthogonalized columns
  T length[3];   // ||u_c||
  T divisor[3];  // max(||u_c||, eps)
  Vec3<T> e[3];  // normalized columns
  T det;         // det [e0 e1 e2] (proper frames)
};

// proj(u, v) = (<v, u> / <u, u>) u, and 0 when u = 0 (a degenerate input: a zero or repeated
// column projects nothing instead of giving 0 / 0 = NaN).
template <typename T>
LPS_FAST_HOST_DEVICE Vec3<T> project(Vec3<T> u, Vec3<T> v) {
  const T q = dot(u, u);
  return scale(q > T(0) ? dot(v, u) / q : T(0), u);
}

template <typename T>
LPS_FAST_HOST_DEVICE void forward(const T* V, bool proper, Forward<T>& f, T* R) {
  const T eps = T(1e-12);
  for (int c = 0; c < 3; ++c) f.v[c] = column(V, c);
  f.u[0] = f.v[0];
  f.u[1] = axpy(T(-1), project(f.u[0], f.v[1]), f.v[1]);
  f.u[2] = axpy(T(-1), project(f.u[1], f.v[2]), axpy(T(-1), project(f.u[0], f.v[2]), f.v[2]));
  for (int c = 0; c < 3; ++c) {
    using std::sqrt;  // float overload on the host, CUDA's on the device
    f.length[c] = sqrt(dot(f.u[c], f.u[c]));
    f.divisor[c] = f.length[c] > eps ? f.length[c] : eps;
    f.e[c] = scale(T(1) / f.divisor[c], f.u[c]);
  }
  f.det = dot(f.e[0], cross(f.e[1], f.e[2]));
  set_column(R, 0, proper ? scale(f.det, f.e[0]) : f.e[0]);
  set_column(R, 1, f.e[1]);
  set_column(R, 2, f.e[2]);
}

// Reverse mode of proj(u, v) with upstream g: accumulates into gu and gv.
template <typename T>
LPS_FAST_HOST_DEVICE void project_backward(Vec3<T> u, Vec3<T> v, Vec3<T> g, Vec3<T>& gu, Vec3<T>& gv) {
  const T s = dot(v, u), q = dot(u, u), gu_dot = dot(g, u);
  if (!(q > T(0))) return;  // the zero projection of a zero u: constant, no gradient
  // p = (s / q) u: dp/du = (s / q) I + u (v^T / q) - 2 s u u^T / q^2; dp/dv = u u^T / q
  gu = axpy(s / q, g, gu);
  gu = axpy(gu_dot / q, v, gu);
  gu = axpy(T(-2) * s * gu_dot / (q * q), u, gu);
  gv = axpy(gu_dot / q, u, gv);
}

template <typename T>
LPS_FAST_HOST_DEVICE void backward(const Forward<T>& f, const T* G, bool proper, T* grad_V) {
  Vec3<T> ge[3] = {column(G, 0), column(G, 1), column(G, 2)};
  if (proper) {
    // R0 = det e0 with det = e0 . (e1 x e2): d det / d e_c is the cofactor column.
    const T g_det = dot(ge[0], f.e[0]);
    ge[0] = scale(f.det, ge[0]);
    ge[0] = axpy(g_det, cross(f.e[1], f.e[2]), ge[0]);
    ge[1] = axpy(g_det, cross(f.e[2], f.e[0]), ge[1]);
    ge[2] = axpy(g_det, cross(f.e[0], f.e[1]), ge[2]);
  }
  // e = u / max(||u||, eps): the clamp blocks the gradient through the norm below eps.
  const T eps = T(1e-12);
  Vec3<T> gu[3];
  for (int c = 0; c < 3; ++c) {
    if (f.length[c] >= eps) {
      gu[c] = scale(T(1) / f.length[c], axpy(-dot(f.e[c], ge[c]), f.e[c], ge[c]));
    } else {
      gu[c] = scale(T(1) / eps, ge[c]);
    }
  }
  Vec3<T> gv[3] = {{T(0), T(0), T(0)}, {T(0), T(0), T(0)}, {T(0), T(0), T(0)}};
  // u2 = v2 - proj(u0, v2) - proj(u1, v2)
  gv[2] = gu[2];
  const Vec3<T> minus_g2 = scale(T(-1), gu[2]);
  project_backward(f.u[0], f.v[2], minus_g2, gu[0], gv[2]);
  project_backward(f.u[1], f.v[2], minus_g2, gu[1], gv[2]);
  // u1 = v1 - proj(u0, v1)
  gv[1] = gu[1];
  project_backward(f.u[0], f.v[1], scale(T(-1), gu[1]), gu[0], gv[1]);
  // u0 = v0
  gv[0] = gu[0];
  for (int c = 0; c < 3; ++c) set_column(grad_V, c, gv[c]);
}

}  // namespace gram_schmidt_math
}  // namespace lps_fast
