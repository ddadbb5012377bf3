// Per-element and per-row math of the cedm ops, shared by the CPU loops (csrc/cpu/) and the CUDA
// kernels (csrc/cuda/). Element functions are templates on T so that the CPU code instantiates
// them with at::vec::Vectorized<acc> (SIMD lanes) and with acc scalars, and the CUDA kernels with
// acc scalars: the CPU tests check the same arithmetic that runs on the GPU. Transcendentals (exp,
// log) are applied by the callers (Sleef/at::vec on CPU, expf/logf on CUDA); these functions only
// hold the algebra. The math is the contract written in cedm/ops.py (ref_* functions).
#pragma once

#include <cmath>
#include <limits>

// Internal linkage (static): each file gets its own copy, compiled for its own target (the AVX2
// kernel file must not share inline functions with the portable ones).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define CEDM_HD static __host__ __device__ __forceinline__
#else
#define CEDM_HD static inline
#endif

namespace cedm {
namespace math {

CEDM_HD float sqrt_(float v) { return sqrtf(v); }
CEDM_HD double sqrt_(double v) { return sqrt(v); }
CEDM_HD float exp_(float v) { return expf(v); }
CEDM_HD double exp_(double v) { return exp(v); }
CEDM_HD float log_(float v) { return logf(v); }
CEDM_HD double log_(double v) { return log(v); }

// ---------------------------------------------------------------------------------------------
// EDM preconditioning (EDM Table 1; docs/method.md#edm-precond), one sample's coefficients.
template <typename T>
struct EdmCoef {
  T c_skip, c_out, c_in, weight;
};

template <typename T>
CEDM_HD EdmCoef<T> edm_coefficients(T sigma, T sigma_data) {
  const T s2 = sigma * sigma, d2 = sigma_data * sigma_data;
  const T r = sqrt_(s2 + d2);
  EdmCoef<T> c;
  c.c_skip = d2 / (s2 + d2);                                    // sigma_d^2 / (sigma^2 + sigma_d^2)
  c.c_out = sigma * sigma_data / r;                             // sigma sigma_d / sqrt(sigma^2 + sigma_d^2)
  c.c_in = T(1) / r;                                            // 1 / sqrt(sigma^2 + sigma_d^2)
  c.weight = (s2 + d2) / ((sigma * sigma_data) * (sigma * sigma_data));  // lambda(sigma)
  return c;
}

// c_in x (EDM eq. 7, network input)
template <typename T>
CEDM_HD T edm_scale_input(T x, T c_in) { return c_in * x; }

// D = c_skip x + c_out F (EDM eq. 7)
template <typename T>
CEDM_HD T edm_denoise(T x, T F, T c_skip, T c_out) { return c_skip * x + c_out * F; }

// D - y, the residual whose weighted square is the EDM loss (EDM eq. 8)
template <typename T>
CEDM_HD T edm_residual(T x, T F, T y, T c_skip, T c_out) { return c_skip * x + c_out * F - y; }

// d/dF of g lambda (D - y)^2: scale = 2 g lambda c_out, per sample
template <typename T>
CEDM_HD T edm_loss_grad_F(T x, T F, T y, T c_skip, T c_out, T scale) {
  return scale * edm_residual(x, F, y, c_skip, c_out);
}

// ---------------------------------------------------------------------------------------------
// Heun sampler step (EDM Algorithm 2).

// x_hat = x + sqrt(t_hat^2 - t_cur^2) S_noise n (line 6); coef = sqrt(...) S_noise
template <typename T>
CEDM_HD T heun_churn(T x, T noise, T coef) { return x + coef * noise; }

// d = (x_hat - D) / t_hat ; x' = x_hat + (t_next - t_hat) d (lines 7-8); inv_t_hat = 1 / t_hat
template <typename T>
CEDM_HD T heun_euler(T x_hat, T denoised, T inv_t_hat, T h) {
  return x_hat + h * ((x_hat - denoised) * inv_t_hat);
}

// x_{i+1} = x_hat + (t_next - t_hat) (d/2 + d'/2), d' = (x' - D') / t_next (lines 9-11)
template <typename T>
CEDM_HD T heun_correct(T x_hat, T denoised, T x_next, T denoised_next, T inv_t_hat, T inv_t_next, T h) {
  const T d = (x_hat - denoised) * inv_t_hat;
  const T d_prime = (x_next - denoised_next) * inv_t_next;
  return x_hat + h * (T(0.5) * d + T(0.5) * d_prime);
}

// ---------------------------------------------------------------------------------------------
// TEMI loss (TEMI Eq. 6-7; docs/method.md#temi-loss), row (v, h, b) of length C, u = z / T the student's scaled logits:
//   log q_s(c)  = u_c - lse_s,            lse_s = logsumexp_c u_c
//   log a_c     = gamma (log q_s(c) + log q_t(c|x')) - log prior(c)
//   L_row       = -w(x,x') lse_a,         lse_a = logsumexp_c log a_c
//   dL_row/dz_c = w gamma / T (q_s(c) - a_c / sum_c' a_c')

template <typename T>
CEDM_HD T temi_log_a(T u, T lse_s, T log_qt_other, T gamma, T log_prior) {
  return gamma * (u - lse_s + log_qt_other) - log_prior;
}

// coef = dloss/dL_row * w gamma / T ; q_s = exp(u - lse_s) ; r = a / S = exp(log_a - lse_a)
template <typename T>
CEDM_HD T temi_grad(T q_s, T r, T coef) { return coef * (q_s - r); }

// Streaming logsumexp: (m, s) represents m + log s. Used by the one-pass CUDA rows.
template <typename T>
CEDM_HD void lse_push(T& m, T& s, T v) {
  if (v > m) {
    s = s * exp_(m - v) + T(1);
    m = v;
  } else if (m > -std::numeric_limits<T>::infinity()) {
    s += exp_(v - m);
  }
}

template <typename T>
CEDM_HD void lse_merge(T& m, T& s, T m2, T s2) {
  if (m2 > m) {
    s = s * exp_(m - m2) + s2;
    m = m2;
  } else if (m2 > -std::numeric_limits<T>::infinity()) {
    s += s2 * exp_(m2 - m);
  }
}

template <typename T>
CEDM_HD T lse_value(T m, T s) { return m + log_(s); }

}  // namespace math
}  // namespace cedm
