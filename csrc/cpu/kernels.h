// CPU kernels of the cedm ops on raw contiguous buffers, one copy per instruction set:
//   cedm::cpu::base  (kernels_base.cpp, the compiler's default x86-64/aarch64 flags)
//   cedm::cpu::avx2  (kernels_avx2.cpp, AVX2+FMA+F16C; picked at run time when the CPU has them)
//   cedm::cpu::avx512 (kernels_avx512.cpp, AVX-512 F/BW/VL/DQ; preferred where the CPU has it)
// setup.py defines CEDM_HAVE_AVX2 / CEDM_HAVE_AVX512 when it builds those copies (x86-64).
// Each kernel handles an index range [begin, end) so that csrc/ops.cpp can split the work with
// at::parallel_for. acc_t is the accumulation type: double for double, float otherwise.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace cedm {
namespace cpu {

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace cpu
}  // namespace cedm

#define CEDM_DECLARE_CPU_KERNELS(ISA)                                                              \
  namespace cedm {                                                                                 \
  namespace cpu {                                                                                  \
  namespace ISA {                                                                                  \
  /* TEMI forward over (h, b) pairs p = h*B + b: dot[p] = q_t(x).q_t(x'),                          \
     lse[((k*2 + v)*H + h)*B + b] with k = 0: logsumexp(z/T), k = 1: logsumexp(log a). */          \
  template <typename scalar_t>                                                                     \
  void temi_forward(const scalar_t* z, const scalar_t* qt, const acc_t<scalar_t>* log_prior,      \
                    acc_t<scalar_t>* dot, acc_t<scalar_t>* lse, int64_t H, int64_t B, int64_t C,  \
                    acc_t<scalar_t> gamma, acc_t<scalar_t> inv_temp, int64_t begin, int64_t end); \
  /* TEMI backward over rows r = (v*H + h)*B + b: grad wrt the student logits. */                 \
  template <typename scalar_t>                                                                     \
  void temi_backward(const acc_t<scalar_t>* grad_loss, const scalar_t* z, const scalar_t* qt,     \
                     const acc_t<scalar_t>* log_prior, const acc_t<scalar_t>* w,                   \
                     const acc_t<scalar_t>* lse, scalar_t* grad, int64_t H, int64_t B, int64_t C,  \
                     acc_t<scalar_t> gamma, acc_t<scalar_t> inv_temp, int64_t begin, int64_t end); \
  /* EDM, elementwise over flat [begin, end) of x [B, inner] (sigma[B] in acc_t). */              \
  template <typename scalar_t>                                                                     \
  void edm_scale_input(const scalar_t* x, const acc_t<scalar_t>* sigma,                           \
                       acc_t<scalar_t> sigma_data, scalar_t* out, int64_t inner, int64_t begin,   \
                       int64_t end);                                                               \
  template <typename scalar_t>                                                                     \
  void edm_denoise(const scalar_t* x, const scalar_t* F, const acc_t<scalar_t>* sigma,            \
                   acc_t<scalar_t> sigma_data, scalar_t* out, int64_t inner, int64_t begin,       \
                   int64_t end);                                                                   \
  /* EDM loss over samples [begin, end): out[b] = lambda sum (D - y)^2. */                         \
  template <typename scalar_t>                                                                     \
  void edm_loss(const scalar_t* x, const scalar_t* F, const scalar_t* y,                          \
                const acc_t<scalar_t>* sigma, acc_t<scalar_t> sigma_data, acc_t<scalar_t>* out,    \
                int64_t inner, int64_t begin, int64_t end);                                        \
  template <typename scalar_t>                                                                     \
  void edm_loss_backward(const acc_t<scalar_t>* grad, const scalar_t* x, const scalar_t* F,       \
                         const scalar_t* y, const acc_t<scalar_t>* sigma,                          \
                         acc_t<scalar_t> sigma_data, scalar_t* grad_F, int64_t inner,             \
                         int64_t begin, int64_t end);                                              \
  /* Heun, elementwise over flat [begin, end). */                                                  \
  template <typename scalar_t>                                                                     \
  void heun_churn(const scalar_t* x, const scalar_t* noise, acc_t<scalar_t> coef, scalar_t* out,  \
                  int64_t begin, int64_t end);                                                     \
  template <typename scalar_t>                                                                     \
  void heun_euler(const scalar_t* x_hat, const scalar_t* denoised, acc_t<scalar_t> inv_t_hat,     \
                  acc_t<scalar_t> h, scalar_t* out, int64_t begin, int64_t end);                   \
  template <typename scalar_t>                                                                     \
  void heun_correct(const scalar_t* x_hat, const scalar_t* denoised, const scalar_t* x_next,      \
                    const scalar_t* denoised_next, acc_t<scalar_t> inv_t_hat,                      \
                    acc_t<scalar_t> inv_t_next, acc_t<scalar_t> h, scalar_t* out, int64_t begin,  \
                    int64_t end);                                                                  \
  /* GroupNorm + SiLU over samples [begin, end) of x [N, C, HW] (cl: stored [N, HW, C]);         \
     mean, rstd [N, G] in acc_t; the backward writes per-sample dw, db partials [N, C]. */        \
  template <typename scalar_t>                                                                     \
  void gn_silu_forward(const scalar_t* x, const acc_t<scalar_t>* w, const acc_t<scalar_t>* b,     \
                       scalar_t* y, acc_t<scalar_t>* mean, acc_t<scalar_t>* rstd, int64_t C,      \
                       int64_t HW, int64_t G, acc_t<scalar_t> eps, bool cl, int64_t begin,        \
                       int64_t end);                                                               \
  template <typename scalar_t>                                                                     \
  void gn_silu_backward(const scalar_t* dy, const scalar_t* x, const acc_t<scalar_t>* w,          \
                        const acc_t<scalar_t>* b, const acc_t<scalar_t>* mean,                     \
                        const acc_t<scalar_t>* rstd, scalar_t* dx, acc_t<scalar_t>* dw_part,       \
                        acc_t<scalar_t>* db_part, int64_t C, int64_t HW, int64_t G, bool cl,       \
                        int64_t begin, int64_t end);                                               \
  }                                                                                                \
  }                                                                                                \
  }

CEDM_DECLARE_CPU_KERNELS(base)

#if defined(CEDM_HAVE_AVX2)
CEDM_DECLARE_CPU_KERNELS(avx2)
#endif
#if defined(CEDM_HAVE_AVX512)
CEDM_DECLARE_CPU_KERNELS(avx512)
#endif
