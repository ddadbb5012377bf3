// Implementation of the CPU kernels declared in kernels.h, compiled once per instruction set:
// the including file defines CEDM_ISA (namespace) and CPU_CAPABILITY (at::vec flavour).
// SIMD through at::vec::Vectorized<acc>; the per-element algebra is in ../cedm_math.h.
// Reduced-precision inputs (bfloat16, float16) are converted to float in chunks/rows first.
#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../cedm_math.h"
#include "kernels.h"

namespace cedm {
namespace cpu {
namespace CEDM_ISA {

using at::vec::Vectorized;

namespace {

// exp: float uses at::vec's inlined polynomial (exp_u20), double uses Sleef (exp_u20 == exp).
template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& v) { return v.exp_u20(); }
template <typename T>
inline Vectorized<T> vlog(const Vectorized<T>& v) { return v.log(); }

#if defined(CPU_CAPABILITY_AVX2)
// logf on 8 lanes, inlined: the Cephes polynomial (max error 1 ulp against double log, checked
// on every 97th positive normal float), about twice the speed of the Sleef call. The TEMI rows
// take one log per element, of the teacher probability clamped to FLT_MIN: inputs are positive
// normal floats (subnormals and 0 would be wrong here); NaN and +inf pass through.
inline __m256 log_ps(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256i xi = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(127)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f800000)));  // [1, 2)
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);  // [sqrt(1/2), sqrt(2)]
  e = _mm256_add_ps(e, _mm256_and_ps(big, one));
  const __m256 f = _mm256_sub_ps(m, one);
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 y = _mm256_set1_ps(7.0376836292E-2f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.1514610310E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.1676998740E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.2420140846E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.4249322787E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.6668057665E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.0000714765E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-2.4999993993E-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(3.3333331174E-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  __m256 r = _mm256_add_ps(f, y);
  r = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), r);
  const __m256 special = _mm256_or_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q),
                                      _mm256_cmp_ps(x, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
  return _mm256_blendv_ps(r, x, special);
}

inline Vectorized<float> vlog(const Vectorized<float>& v) { return Vectorized<float>(log_ps(v)); }
#endif

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  alignas(64) T a[Vectorized<T>::size()];
  v.store(a);
  T s = 0;
  for (int k = 0; k < Vectorized<T>::size(); ++k) s += a[k];
  return s;
}

template <typename T>
inline T hmax(const Vectorized<T>& v) {
  alignas(64) T a[Vectorized<T>::size()];
  v.store(a);
  T m = a[0];
  for (int k = 1; k < Vectorized<T>::size(); ++k) m = (a[k] > m || a[k] != a[k]) ? a[k] : m;
  return m;
}

constexpr int64_t kChunk = 256;  // elements converted at a time for bfloat16/float16

// out[i] = f(in[i]...) for i in [0, n), f generic over Vectorized<acc> (and acc).
template <typename acc, typename F, typename... In>
inline void ew_acc(acc* out, int64_t n, const F& f, const In*... in) {
  using V = Vectorized<acc>;
  constexpr int64_t W = V::size();
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    V r0 = f(V::loadu(in + i)...);
    V r1 = f(V::loadu(in + i + W)...);
    r0.store(out + i);
    r1.store(out + i + W);
  }
  for (; i + W <= n; i += W) f(V::loadu(in + i)...).store(out + i);
  if (i < n) f(V::loadu(in + i, n - i)...).store(out + i, n - i);
}

template <typename scalar_t, typename F, typename... In>
inline void ew(scalar_t* out, int64_t n, const F& f, const In*... in) {
  using acc = acc_t<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    ew_acc<acc>(out, n, f, in...);
  } else {
    constexpr size_t N = sizeof...(In);
    acc buf[N][kChunk];
    acc obuf[kChunk];
    const scalar_t* ins[N] = {in...};
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t m = std::min(kChunk, n - c0);
      for (size_t k = 0; k < N; ++k) at::vec::convert(ins[k] + c0, buf[k], m);
      [&]<size_t... I>(std::index_sequence<I...>) {
        ew_acc<acc>(obuf, m, f, static_cast<const acc*>(buf[I])...);
      }(std::make_index_sequence<N>{});
      at::vec::convert(obuf, out + c0, m);
    }
  }
}

// Split the flat range [begin, end) of a [B, inner] tensor into per-sample segments.
template <typename F>
inline void per_sample(int64_t begin, int64_t end, int64_t inner, const F& f) {
  while (begin < end) {
    const int64_t b = begin / inner;
    const int64_t stop = std::min(end, (b + 1) * inner);
    f(b, begin, stop);
    begin = stop;
  }
}

// Row pointer as acc: the row itself (float/double) or its conversion into buf.
template <typename scalar_t>
inline const acc_t<scalar_t>* as_acc(const scalar_t* p, acc_t<scalar_t>* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return p;
  } else {
    at::vec::convert(p, buf, n);
    return buf;
  }
}

template <typename T>
inline T row_max(const T* p, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V m(-std::numeric_limits<T>::infinity());
  int64_t i = 0;
  for (; i + W <= n; i += W) m = at::vec::maximum(m, V::loadu(p + i));
  if (i < n) m = V::set(m, at::vec::maximum(m, V::loadu(p + i, n - i)), n - i);
  return hmax(m);
}

template <typename T>
inline T row_dot(const T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V s0(0), s1(0);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    s0 = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), s0);
    s1 = at::vec::fmadd(V::loadu(a + i + W), V::loadu(b + i + W), s1);
  }
  for (; i + W <= n; i += W) s0 = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), s0);
  if (i < n) s1 = s1 + V::loadu(a + i, n - i) * V::loadu(b + i, n - i);
  return hsum(s0 + s1);
}

// TEMI row statistics for one direction. u = z / T. Returns lse_s; sets lse_a. la: scratch [C].
template <typename T>
inline T temi_row_stats(const T* z, const T* qt_other, const T* log_prior, T* la, int64_t C,
                        T gamma, T inv_temp, T* lse_a_out) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vinv(inv_temp), vgamma(gamma), vtiny(std::numeric_limits<T>::min());
  // pass 1: logsumexp_c u_c (max of z, then the sum of exponentials)
  const T m1 = row_max(z, C) * inv_temp;
  const V vm1(m1);
  V s0(0), s1(0);
  int64_t i = 0;
  for (; i + 2 * W <= C; i += 2 * W) {
    s0 = s0 + vexp(V::loadu(z + i) * vinv - vm1);
    s1 = s1 + vexp(V::loadu(z + i + W) * vinv - vm1);
  }
  for (; i + W <= C; i += W) s0 = s0 + vexp(V::loadu(z + i) * vinv - vm1);
  if (i < C) s1 = s1 + V::set(V(0), vexp(V::loadu(z + i, C - i) * vinv - vm1), C - i);
  const T lse_s = math::lse_value(m1, hsum(s0 + s1));
  // pass 2: log a_c = gamma (log q_s + log q_t') - log prior, kept in la, and its max
  const V vlse_s(lse_s);
  V m2(-std::numeric_limits<T>::infinity());
  auto log_a = [&](int64_t k, int64_t cnt) {
    const V qt = at::vec::maximum(V::loadu(qt_other + k, cnt), vtiny);  // clamp_min(tiny)
    return math::temi_log_a(V::loadu(z + k, cnt) * vinv, vlse_s, vlog(qt), vgamma,
                            V::loadu(log_prior + k, cnt));
  };
  for (i = 0; i + W <= C; i += W) {
    const V a = log_a(i, W);
    a.store(la + i);
    m2 = at::vec::maximum(m2, a);
  }
  if (i < C) {
    const V a = log_a(i, C - i);
    a.store(la + i, C - i);
    m2 = V::set(m2, at::vec::maximum(m2, a), C - i);
  }
  const T m2s = hmax(m2);
  // pass 3: logsumexp_c log a_c
  T lse_a;
  if (m2s == -std::numeric_limits<T>::infinity()) {
    lse_a = m2s;
  } else {
    const V vm2(m2s);
    V t0(0), t1(0);
    for (i = 0; i + 2 * W <= C; i += 2 * W) {
      t0 = t0 + vexp(V::loadu(la + i) - vm2);
      t1 = t1 + vexp(V::loadu(la + i + W) - vm2);
    }
    for (; i + W <= C; i += W) t0 = t0 + vexp(V::loadu(la + i) - vm2);
    if (i < C) t1 = t1 + V::set(V(0), vexp(V::loadu(la + i, C - i) - vm2), C - i);
    lse_a = math::lse_value(m2s, hsum(t0 + t1));
  }
  *lse_a_out = lse_a;
  return lse_s;
}

}  // namespace

template <typename scalar_t>
void temi_forward(const scalar_t* z, const scalar_t* qt, const acc_t<scalar_t>* log_prior,
                  acc_t<scalar_t>* dot, acc_t<scalar_t>* lse, int64_t H, int64_t B, int64_t C,
                  acc_t<scalar_t> gamma, acc_t<scalar_t> inv_temp, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  const bool convert = !std::is_same_v<scalar_t, acc>;
  std::vector<acc> scratch(static_cast<size_t>(C) * (convert ? 5 : 1));
  acc* la = scratch.data();
  acc* bz0 = la + C;  // conversion buffers (bfloat16/float16 only)
  acc* bz1 = bz0 + C;
  acc* bq0 = bz1 + C;
  acc* bq1 = bq0 + C;
  const int64_t HB = H * B, view = HB * C;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t h = p / B;
    const int64_t off = p * C;  // row (v=0, h, b); view 1 is + view
    const acc* z0 = as_acc(z + off, bz0, C);
    const acc* z1 = as_acc(z + view + off, bz1, C);
    const acc* q0 = as_acc(qt + off, bq0, C);
    const acc* q1 = as_acc(qt + view + off, bq1, C);
    const acc* lp = log_prior + h * C;
    dot[p] = row_dot(q0, q1, C);  // docs/method.md#temi-loss: sum_c q_t^h(c|x) q_t^h(c|x'), averaged over h later
    // student on x against the teacher on x' (v = 0) and the swapped direction (v = 1)
    lse[p] = temi_row_stats(z0, q1, lp, la, C, gamma, inv_temp, &lse[2 * HB + p]);
    lse[HB + p] = temi_row_stats(z1, q0, lp, la, C, gamma, inv_temp, &lse[3 * HB + p]);
  }
}

template <typename scalar_t>
void temi_backward(const acc_t<scalar_t>* grad_loss, const scalar_t* z, const scalar_t* qt,
                   const acc_t<scalar_t>* log_prior, const acc_t<scalar_t>* w,
                   const acc_t<scalar_t>* lse, scalar_t* grad, int64_t H, int64_t B, int64_t C,
                   acc_t<scalar_t> gamma, acc_t<scalar_t> inv_temp, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  using V = Vectorized<acc>;
  constexpr int64_t W = V::size();
  constexpr bool convert = !std::is_same_v<scalar_t, acc>;
  std::vector<acc> scratch(convert ? static_cast<size_t>(C) * 3 : 0);
  acc* bz = scratch.data();
  acc* bq = convert ? bz + C : nullptr;
  acc* bg = convert ? bq + C : nullptr;
  const int64_t HB = H * B, view = HB * C;
  const V vinv(inv_temp), vgamma(gamma), vtiny(std::numeric_limits<acc>::min());
  for (int64_t r = begin; r < end; ++r) {
    const int64_t v = r / HB, hb = r % HB, h = hb / B, b = hb % B;
    const int64_t off = r * C;
    const int64_t other = (1 - v) * view + hb * C;  // teacher on the other view
    const acc* zr = as_acc(z + off, bz, C);
    const acc* qr = as_acc(qt + other, bq, C);
    const acc* lp = log_prior + h * C;
    acc* out;
    if constexpr (convert) out = bg; else out = grad + off;
    // loss[h] = 1/(2B) sum_{v,b} L_row ; dL_row/dz = w gamma / T (q_s - a/S)
    const acc coef = grad_loss[h] / static_cast<acc>(2 * B) * w[b] * gamma * inv_temp;
    const V vlse_s(lse[r]), vlse_a(lse[2 * HB + r]), vcoef(coef);
    auto g = [&](int64_t k, int64_t cnt) {
      const V u = V::loadu(zr + k, cnt) * vinv;
      const V q_s = vexp(u - vlse_s);
      const V qt_o = at::vec::maximum(V::loadu(qr + k, cnt), vtiny);
      const V la = math::temi_log_a(u, vlse_s, vlog(qt_o), vgamma, V::loadu(lp + k, cnt));
      return math::temi_grad(q_s, vexp(la - vlse_a), vcoef);
    };
    int64_t i = 0;
    for (; i + W <= C; i += W) g(i, W).store(out + i);
    if (i < C) g(i, C - i).store(out + i, C - i);
    if constexpr (convert) at::vec::convert(bg, grad + off, C);
  }
}

template <typename scalar_t>
void edm_scale_input(const scalar_t* x, const acc_t<scalar_t>* sigma, acc_t<scalar_t> sigma_data,
                     scalar_t* out, int64_t inner, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  per_sample(begin, end, inner, [&](int64_t b, int64_t lo, int64_t hi) {
    const acc c_in = math::edm_coefficients(sigma[b], sigma_data).c_in;
    ew(out + lo, hi - lo, [&](auto xv) {
      using T = decltype(xv);
      return math::edm_scale_input(xv, T(c_in));
    }, x + lo);
  });
}

template <typename scalar_t>
void edm_denoise(const scalar_t* x, const scalar_t* F, const acc_t<scalar_t>* sigma,
                 acc_t<scalar_t> sigma_data, scalar_t* out, int64_t inner, int64_t begin,
                 int64_t end) {
  per_sample(begin, end, inner, [&](int64_t b, int64_t lo, int64_t hi) {
    const auto c = math::edm_coefficients(sigma[b], sigma_data);
    ew(out + lo, hi - lo, [&](auto xv, auto Fv) {
      using T = decltype(xv);
      return math::edm_denoise(xv, Fv, T(c.c_skip), T(c.c_out));
    }, x + lo, F + lo);
  });
}

template <typename scalar_t>
void edm_loss(const scalar_t* x, const scalar_t* F, const scalar_t* y,
              const acc_t<scalar_t>* sigma, acc_t<scalar_t> sigma_data, acc_t<scalar_t>* out,
              int64_t inner, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  using V = Vectorized<acc>;
  constexpr int64_t W = V::size();
  constexpr bool convert = !std::is_same_v<scalar_t, acc>;
  acc bx[convert ? kChunk : 1], bF[convert ? kChunk : 1], by[convert ? kChunk : 1];
  for (int64_t b = begin; b < end; ++b) {
    const auto c = math::edm_coefficients(sigma[b], sigma_data);
    const V cs(c.c_skip), co(c.c_out);
    V s0(0), s1(0);
    auto block = [&](const acc* xp, const acc* Fp, const acc* yp, int64_t n) {
      int64_t i = 0;
      for (; i + 2 * W <= n; i += 2 * W) {
        const V r0 = math::edm_residual(V::loadu(xp + i), V::loadu(Fp + i), V::loadu(yp + i), cs, co);
        const V r1 = math::edm_residual(V::loadu(xp + i + W), V::loadu(Fp + i + W),
                                        V::loadu(yp + i + W), cs, co);
        s0 = at::vec::fmadd(r0, r0, s0);
        s1 = at::vec::fmadd(r1, r1, s1);
      }
      for (; i + W <= n; i += W) {
        const V r0 = math::edm_residual(V::loadu(xp + i), V::loadu(Fp + i), V::loadu(yp + i), cs, co);
        s0 = at::vec::fmadd(r0, r0, s0);
      }
      if (i < n) {
        const int64_t k = n - i;
        const V r0 = math::edm_residual(V::loadu(xp + i, k), V::loadu(Fp + i, k), V::loadu(yp + i, k), cs, co);
        s1 = s1 + V::set(V(0), r0 * r0, k);
      }
    };
    const int64_t base = b * inner;
    if constexpr (convert) {
      for (int64_t c0 = 0; c0 < inner; c0 += kChunk) {
        const int64_t m = std::min(kChunk, inner - c0);
        at::vec::convert(x + base + c0, bx, m);
        at::vec::convert(F + base + c0, bF, m);
        at::vec::convert(y + base + c0, by, m);
        block(bx, bF, by, m);
      }
    } else {
      block(x + base, F + base, y + base, inner);
    }
    out[b] = c.weight * hsum(s0 + s1);  // lambda(sigma) ||D - y||^2 (EDM eq. 8)
  }
}

template <typename scalar_t>
void edm_loss_backward(const acc_t<scalar_t>* grad, const scalar_t* x, const scalar_t* F,
                       const scalar_t* y, const acc_t<scalar_t>* sigma, acc_t<scalar_t> sigma_data,
                       scalar_t* grad_F, int64_t inner, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  per_sample(begin, end, inner, [&](int64_t b, int64_t lo, int64_t hi) {
    const auto c = math::edm_coefficients(sigma[b], sigma_data);
    const acc scale = acc(2) * grad[b] * c.weight * c.c_out;
    ew(grad_F + lo, hi - lo, [&](auto xv, auto Fv, auto yv) {
      using T = decltype(xv);
      return math::edm_loss_grad_F(xv, Fv, yv, T(c.c_skip), T(c.c_out), T(scale));
    }, x + lo, F + lo, y + lo);
  });
}

template <typename scalar_t>
void heun_churn(const scalar_t* x, const scalar_t* noise, acc_t<scalar_t> coef, scalar_t* out,
                int64_t begin, int64_t end) {
  ew(out + begin, end - begin, [&](auto xv, auto nv) {
    using T = decltype(xv);
    return math::heun_churn(xv, nv, T(coef));
  }, x + begin, noise + begin);
}

template <typename scalar_t>
void heun_euler(const scalar_t* x_hat, const scalar_t* denoised, acc_t<scalar_t> inv_t_hat,
                acc_t<scalar_t> h, scalar_t* out, int64_t begin, int64_t end) {
  ew(out + begin, end - begin, [&](auto xv, auto dv) {
    using T = decltype(xv);
    return math::heun_euler(xv, dv, T(inv_t_hat), T(h));
  }, x_hat + begin, denoised + begin);
}

template <typename scalar_t>
void heun_correct(const scalar_t* x_hat, const scalar_t* denoised, const scalar_t* x_next,
                  const scalar_t* denoised_next, acc_t<scalar_t> inv_t_hat,
                  acc_t<scalar_t> inv_t_next, acc_t<scalar_t> h, scalar_t* out, int64_t begin,
                  int64_t end) {
  ew(out + begin, end - begin, [&](auto xv, auto dv, auto xnv, auto dnv) {
    using T = decltype(xv);
    return math::heun_correct(xv, dv, xnv, dnv, T(inv_t_hat), T(inv_t_next), T(h));
  }, x_hat + begin, denoised + begin, x_next + begin, denoised_next + begin);
}

// GroupNorm + SiLU (each GN-SiLU pair of the DDPM++ blocks, docs/method.md#network): one sample n
// in [begin, end) at a time, as a [R, L] matrix of rows: channels_last [HW, C] (channel = column)
// or contiguous [C, HW] (channel = row).
// Forward: one pass of per-channel sums of (x - K) and (x - K)^2 around a shift K per group (its
// first value: the variance does not cancel when the mean is far from 0), the group statistics
// in acc, then y = silu(x scale[c] + shift[c]) with scale = rstd w, shift = b - mean scale.
// Backward: one pass computes da = dy silu'(a) (a recomputed from x) into a buffer and the
// per-channel sums of da and da x (-> dw, db and the group sums); a second, exp-free pass writes
// dx = alpha[c] da + beta[c] x + gamma[c]. Both work on blocks of rows holding whole groups.
namespace {

// Loads/stores of m <= size() lanes: the counted forms (a copy through a buffer) for tails only.
template <typename acc>
inline Vectorized<acc> ld(const acc* p, int64_t m) {
  return m == Vectorized<acc>::size() ? Vectorized<acc>::loadu(p) : Vectorized<acc>::loadu(p, m);
}
template <typename acc>
inline void st(const Vectorized<acc>& v, acc* p, int64_t m) {
  if (m == Vectorized<acc>::size()) v.store(p); else v.store(p, m);
}

template <typename acc>
inline Vectorized<acc> vsigmoid(const Vectorized<acc>& a) {
  using V = Vectorized<acc>;
  constexpr acc kMax = std::is_same_v<acc, double> ? acc(700) : acc(88);  // exp stays finite
  const V e = vexp(at::vec::clamp(V(acc(0)) - a, V(-kMax), V(kMax)));
  return V(acc(1)) / (V(acc(1)) + e);
}

// da = dy silu'(a), silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)
template <typename acc>
inline Vectorized<acc> silu_grad(const Vectorized<acc>& a, const Vectorized<acc>& dy) {
  using V = Vectorized<acc>;
  const V s = vsigmoid(a);
  return dy * s * (V(acc(1)) + a * (V(acc(1)) - s));
}

// Per-channel value at lanes [i, i + m) of row r: a vector of p[i..] (channels_last) or p[r].
template <typename acc>
inline Vectorized<acc> per_channel(const acc* p, bool cl, int64_t r, int64_t i, int64_t m) {
  return cl ? ld(p + i, m) : Vectorized<acc>(p[r]);
}

// Row r's contribution to the per-channel sums s1[c] += sum u, s2[c] += sum u^2, u = v - K[c]
// (channels_last: one value per channel; contiguous: the whole row is channel r).
template <typename acc>
inline void gn_row_sums(const acc* row, int64_t L, bool cl, int64_t r, const acc* K, acc* s1,
                        acc* s2) {
  using V = Vectorized<acc>;
  constexpr int64_t W = V::size();
  if (cl) {
    for (int64_t c = 0; c < L; c += W) {
      const int64_t m = std::min<int64_t>(W, L - c);
      const V u = ld(row + c, m) - ld(K + c, m);
      st(ld(s1 + c, m) + u, s1 + c, m);
      st(ld(s2 + c, m) + u * u, s2 + c, m);
    }
    return;
  }
  V a(acc(0)), q(acc(0));
  const V k(K[r]);
  int64_t i = 0;
  for (; i + W <= L; i += W) {
    const V u = V::loadu(row + i) - k;
    a = a + u;
    q = q + u * u;
  }
  acc t1 = hsum(a), t2 = hsum(q);
  for (; i < L; ++i) {
    const acc u = row[i] - K[r];
    t1 += u;
    t2 += u * u;
  }
  s1[r] += t1;
  s2[r] += t2;
}

// One sample as [R, L] rows (channels_last: [HW, C]; contiguous: [C, HW]), D channels a group,
// inv_m = 1 / (values in a group), and the blocks of rows that hold whole groups: contiguous, one
// group (D rows, still in the cache for the second pass); channels_last, every row (all groups
// interleave in a row).
template <typename acc>
struct GnShape {
  int64_t D, R, L, block;
  acc inv_m;
};
template <typename acc>
inline GnShape<acc> gn_shape(int64_t C, int64_t HW, int64_t G, bool cl) {
  const int64_t D = C / G;
  return {D, cl ? HW : C, cl ? C : HW, cl ? HW : D, acc(1) / static_cast<acc>(D * HW)};
}

}  // namespace

template <typename scalar_t>
void gn_silu_forward(const scalar_t* x, const acc_t<scalar_t>* w, const acc_t<scalar_t>* b,
                     scalar_t* y, acc_t<scalar_t>* mean, acc_t<scalar_t>* rstd, int64_t C,
                     int64_t HW, int64_t G, acc_t<scalar_t> eps, bool cl, int64_t begin,
                     int64_t end) {
  using acc = acc_t<scalar_t>;
  using V = Vectorized<acc>;
  constexpr int64_t W = V::size();
  constexpr bool convert = !std::is_same_v<scalar_t, acc>;
  const auto [D, R, L, block, inv_m] = gn_shape<acc>(C, HW, G, cl);
  std::vector<acc> buf(L), obuf(L), s1(C), s2(C), K(C), scale(C), shift(C);
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* xn = x + n * C * HW;
    scalar_t* yn = y + n * C * HW;
    for (int64_t c = 0; c < C; ++c) {  // the group's first value: element (c0, 0) of channel c0
      const int64_t c0 = c / D * D;
      K[c] = static_cast<acc>(xn[cl ? c0 : c0 * HW]);
    }
    for (int64_t r0 = 0; r0 < R; r0 += block) {
      const int64_t r1 = r0 + block, g0 = cl ? 0 : r0 / D, g1 = cl ? G : g0 + 1;
      std::fill(s1.begin() + g0 * D, s1.begin() + g1 * D, acc(0));
      std::fill(s2.begin() + g0 * D, s2.begin() + g1 * D, acc(0));
      for (int64_t r = r0; r < r1; ++r)
        gn_row_sums(as_acc(xn + r * L, buf.data(), L), L, cl, r, K.data(), s1.data(), s2.data());
      for (int64_t g = g0; g < g1; ++g) {
        acc t1 = 0, t2 = 0;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          t1 += s1[c];
          t2 += s2[c];
        }
        const acc du = t1 * inv_m;                                 // mean - K
        const acc var = std::max(t2 * inv_m - du * du, acc(0));
        const acc mu = K[g * D] + du, rs = acc(1) / std::sqrt(var + eps);
        mean[n * G + g] = mu;
        rstd[n * G + g] = rs;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          scale[c] = rs * w[c];
          shift[c] = b[c] - mu * scale[c];
        }
      }
      for (int64_t r = r0; r < r1; ++r) {
        const acc* row = as_acc(xn + r * L, buf.data(), L);
        acc* out;
        if constexpr (convert) out = obuf.data(); else out = yn + r * L;
        for (int64_t i = 0; i < L; i += W) {
          const int64_t m = std::min<int64_t>(W, L - i);
          const V a = ld(row + i, m) * per_channel(scale.data(), cl, r, i, m) +
                      per_channel(shift.data(), cl, r, i, m);
          st(a * vsigmoid(a), out + i, m);
        }
        if constexpr (convert) at::vec::convert(obuf.data(), yn + r * L, L);
      }
    }
  }
}

template <typename scalar_t>
void gn_silu_backward(const scalar_t* dy, const scalar_t* x, const acc_t<scalar_t>* w,
                      const acc_t<scalar_t>* b, const acc_t<scalar_t>* mean,
                      const acc_t<scalar_t>* rstd, scalar_t* dx, acc_t<scalar_t>* dw_part,
                      acc_t<scalar_t>* db_part, int64_t C, int64_t HW, int64_t G, bool cl,
                      int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  using V = Vectorized<acc>;
  constexpr int64_t W = V::size();
  constexpr bool convert = !std::is_same_v<scalar_t, acc>;
  const auto [D, R, L, block, inv_m] = gn_shape<acc>(C, HW, G, cl);
  // da of one block of rows in a buffer that stays in the cache between the two passes
  std::vector<acc> bx(L), bdy(L), obuf(L), da_buf(block * L), scale(C), shift(C), sda(C), sdax(C),
      alpha(C), beta(C), gamma(C);
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* xn = x + n * C * HW;
    const scalar_t* dyn = dy + n * C * HW;
    scalar_t* dxn = dx + n * C * HW;
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = rstd[n * G + c / D] * w[c];
      shift[c] = b[c] - mean[n * G + c / D] * scale[c];
    }
    for (int64_t r0 = 0; r0 < R; r0 += block) {
      const int64_t r1 = r0 + block, g0 = cl ? 0 : r0 / D, g1 = cl ? G : g0 + 1;
      std::fill(sda.begin() + g0 * D, sda.begin() + g1 * D, acc(0));
      std::fill(sdax.begin() + g0 * D, sdax.begin() + g1 * D, acc(0));
      for (int64_t r = r0; r < r1; ++r) {
        const acc* xr = as_acc(xn + r * L, bx.data(), L);
        const acc* gr = as_acc(dyn + r * L, bdy.data(), L);
        acc* dar = da_buf.data() + (r - r0) * L;
        V s1(acc(0)), s2(acc(0));
        for (int64_t i = 0; i < L; i += W) {
          const int64_t m = std::min<int64_t>(W, L - i);
          // lanes past m load as 0 (ld of a tail): dy = 0 there, so da = 0
          const V xv = ld(xr + i, m);
          const V da = silu_grad(xv * per_channel(scale.data(), cl, r, i, m) +
                                     per_channel(shift.data(), cl, r, i, m),
                                 ld(gr + i, m));
          st(da, dar + i, m);
          if (cl) {
            st(ld(sda.data() + i, m) + da, sda.data() + i, m);
            st(ld(sdax.data() + i, m) + da * xv, sdax.data() + i, m);
          } else {
            s1 = s1 + da;
            s2 = s2 + da * xv;
          }
        }
        if (!cl) {
          sda[r] += hsum(s1);
          sdax[r] += hsum(s2);
        }
      }
      for (int64_t g = g0; g < g1; ++g) {
        const acc mu = mean[n * G + g], rs = rstd[n * G + g];
        acc S1 = 0, S2 = 0;  // group sums of dxhat and dxhat xhat, dxhat = w da
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          db_part[n * C + c] = sda[c];
          dw_part[n * C + c] = rs * (sdax[c] - mu * sda[c]);  // sum da xhat
          S1 += w[c] * sda[c];
          S2 += w[c] * dw_part[n * C + c];
        }
        // dx = rs (w da - S1/M - xhat S2/M), xhat = (x - mu) rs
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          alpha[c] = rs * w[c];
          beta[c] = -rs * rs * S2 * inv_m;
          gamma[c] = rs * inv_m * (mu * rs * S2 - S1);
        }
      }
      for (int64_t r = r0; r < r1; ++r) {
        const acc* xr = as_acc(xn + r * L, bx.data(), L);
        const acc* dar = da_buf.data() + (r - r0) * L;
        acc* out;
        if constexpr (convert) out = obuf.data(); else out = dxn + r * L;
        for (int64_t i = 0; i < L; i += W) {
          const int64_t m = std::min<int64_t>(W, L - i);
          st(per_channel(alpha.data(), cl, r, i, m) * ld(dar + i, m) +
                 per_channel(beta.data(), cl, r, i, m) * ld(xr + i, m) +
                 per_channel(gamma.data(), cl, r, i, m),
             out + i, m);
        }
        if constexpr (convert) at::vec::convert(obuf.data(), dxn + r * L, L);
      }
    }
  }
}

#define CEDM_INSTANTIATE(scalar_t)                                                                 \
  template void temi_forward<scalar_t>(const scalar_t*, const scalar_t*, const acc_t<scalar_t>*,  \
                                       acc_t<scalar_t>*, acc_t<scalar_t>*, int64_t, int64_t,      \
                                       int64_t, acc_t<scalar_t>, acc_t<scalar_t>, int64_t,        \
                                       int64_t);                                                  \
  template void temi_backward<scalar_t>(const acc_t<scalar_t>*, const scalar_t*, const scalar_t*, \
                                        const acc_t<scalar_t>*, const acc_t<scalar_t>*,           \
                                        const acc_t<scalar_t>*, scalar_t*, int64_t, int64_t,      \
                                        int64_t, acc_t<scalar_t>, acc_t<scalar_t>, int64_t,       \
                                        int64_t);                                                 \
  template void edm_scale_input<scalar_t>(const scalar_t*, const acc_t<scalar_t>*,                \
                                          acc_t<scalar_t>, scalar_t*, int64_t, int64_t, int64_t); \
  template void edm_denoise<scalar_t>(const scalar_t*, const scalar_t*, const acc_t<scalar_t>*,   \
                                      acc_t<scalar_t>, scalar_t*, int64_t, int64_t, int64_t);     \
  template void edm_loss<scalar_t>(const scalar_t*, const scalar_t*, const scalar_t*,             \
                                   const acc_t<scalar_t>*, acc_t<scalar_t>, acc_t<scalar_t>*,     \
                                   int64_t, int64_t, int64_t);                                    \
  template void edm_loss_backward<scalar_t>(const acc_t<scalar_t>*, const scalar_t*,              \
                                            const scalar_t*, const scalar_t*,                     \
                                            const acc_t<scalar_t>*, acc_t<scalar_t>, scalar_t*,   \
                                            int64_t, int64_t, int64_t);                           \
  template void heun_churn<scalar_t>(const scalar_t*, const scalar_t*, acc_t<scalar_t>,           \
                                     scalar_t*, int64_t, int64_t);                                \
  template void heun_euler<scalar_t>(const scalar_t*, const scalar_t*, acc_t<scalar_t>,           \
                                     acc_t<scalar_t>, scalar_t*, int64_t, int64_t);               \
  template void heun_correct<scalar_t>(const scalar_t*, const scalar_t*, const scalar_t*,         \
                                       const scalar_t*, acc_t<scalar_t>, acc_t<scalar_t>,         \
                                       acc_t<scalar_t>, scalar_t*, int64_t, int64_t);               \
  template void gn_silu_forward<scalar_t>(const scalar_t*, const acc_t<scalar_t>*,                \
                                          const acc_t<scalar_t>*, scalar_t*, acc_t<scalar_t>*,    \
                                          acc_t<scalar_t>*, int64_t, int64_t, int64_t,            \
                                          acc_t<scalar_t>, bool, int64_t, int64_t);               \
  template void gn_silu_backward<scalar_t>(const scalar_t*, const scalar_t*,                      \
                                           const acc_t<scalar_t>*, const acc_t<scalar_t>*,        \
                                           const acc_t<scalar_t>*, const acc_t<scalar_t>*,        \
                                           scalar_t*, acc_t<scalar_t>*, acc_t<scalar_t>*,         \
                                           int64_t, int64_t, int64_t, bool, int64_t, int64_t);

CEDM_INSTANTIATE(float)
CEDM_INSTANTIATE(double)
CEDM_INSTANTIATE(c10::BFloat16)
CEDM_INSTANTIATE(c10::Half)
#undef CEDM_INSTANTIATE

}  // namespace CEDM_ISA
}  // namespace cpu
}  // namespace cedm
