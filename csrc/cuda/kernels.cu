// CUDA implementations of the cedm ops. Same checks (../cedm_ops.h) and the same per-element /
// per-row math (../cedm_math.h) as the CPU path; accumulation in float (double for double).
//   elementwise ops: grid-stride loops over storage order (contiguous, or any dense layout the
//                    inputs share, e.g. channels_last, without a copy: dense_operands in
//                    ../cedm_ops.h), per-sample coefficients from sigma[b], b = i / inner
//   edm_loss:        one block per sample, block reduction (deterministic, no atomics)
//   temi_loss:       one block per (head, sample) pair: both directions' streaming logsumexps
//                    and the teacher dot product in one pass over the four rows
//   temi backward:   elementwise over [2, H, B, C] with the saved row statistics
#include <algorithm>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cedm_math.h"
#include "../cedm_ops.h"

namespace cedm {
namespace {

constexpr int kThreads = 256;
constexpr int kRowThreads = 128;  // threads per TEMI row block
constexpr int kWarp = 32;

template <typename T>
using acc_of = at::opmath_type<T>;  // float for half/bfloat16/float, double for double

int grid_for(int64_t n) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 32)));
}

#define CEDM_GRID_LOOP(i, n)                                                          \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);           \
       i += int64_t(gridDim.x) * blockDim.x)

// ---- block reductions (blockDim.x a multiple of 32, <= 1024) ----------------------------------

template <typename T>
__device__ T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ T block_sum(T v, T* shared) {  // result valid in thread 0
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int nw = blockDim.x / kWarp;
  v = threadIdx.x < nw ? shared[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

template <typename T>
__device__ void warp_lse(T& m, T& s) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const T m2 = __shfl_down_sync(0xffffffffu, m, o);
    const T s2 = __shfl_down_sync(0xffffffffu, s, o);
    math::lse_merge(m, s, m2, s2);
  }
}

// logsumexp of the block's streaming (m, s) pairs, broadcast to every thread
template <typename T>
__device__ T block_lse(T m, T s, T* shared_m, T* shared_s) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  warp_lse(m, s);
  __syncthreads();
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / kWarp;
    m = lane < nw ? shared_m[lane] : -std::numeric_limits<T>::infinity();
    s = lane < nw ? shared_s[lane] : T(0);
    warp_lse(m, s);
    if (lane == 0) shared_m[0] = math::lse_value(m, s);
  }
  __syncthreads();
  return shared_m[0];
}

// ---- TEMI ---------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void temi_forward_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ qt,
                                    const acc_t* __restrict__ log_prior, acc_t* __restrict__ dot,
                                    acc_t* __restrict__ lse, int64_t H, int64_t B, int64_t C,
                                    acc_t gamma, acc_t inv_temp) {
  __shared__ acc_t sh_m[kRowThreads / kWarp], sh_s[kRowThreads / kWarp];
  const int64_t p = blockIdx.x;  // pair (h, b)
  const int64_t h = p / B, HB = H * B, view = HB * C;
  const scalar_t* q[2] = {qt + p * C, qt + view + p * C};
  const acc_t* lp = log_prior + h * C;
  const acc_t tiny = std::numeric_limits<acc_t>::min();
  // docs/method.md#temi-loss: q_t^h(x) . q_t^h(x'), averaged over the heads in the epilogue
  acc_t d = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    d += static_cast<acc_t>(q[0][c]) * static_cast<acc_t>(q[1][c]);
  d = block_sum(d, sh_s);
  if (threadIdx.x == 0) dot[p] = d;
  for (int v = 0; v < 2; ++v) {  // student on view v against the teacher on view 1 - v
    const scalar_t* zr = z + v * view + p * C;
    const scalar_t* qo = q[1 - v];
    acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
      math::lse_push(m, s, static_cast<acc_t>(zr[c]) * inv_temp);
    const acc_t lse_s = block_lse(m, s, sh_m, sh_s);
    m = -std::numeric_limits<acc_t>::infinity();
    s = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const acc_t qo_c = static_cast<acc_t>(qo[c]);
      const acc_t la = math::temi_log_a(static_cast<acc_t>(zr[c]) * inv_temp, lse_s,
                                        math::log_(qo_c > tiny ? qo_c : tiny), gamma, lp[c]);
      math::lse_push(m, s, la);
    }
    const acc_t lse_a = block_lse(m, s, sh_m, sh_s);
    if (threadIdx.x == 0) {
      lse[v * HB + p] = lse_s;
      lse[(2 + v) * HB + p] = lse_a;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void temi_backward_kernel(const acc_t* __restrict__ grad_loss,
                                     const scalar_t* __restrict__ z,
                                     const scalar_t* __restrict__ qt,
                                     const acc_t* __restrict__ log_prior,
                                     const acc_t* __restrict__ w, const acc_t* __restrict__ lse,
                                     scalar_t* __restrict__ grad, int64_t H, int64_t B, int64_t C,
                                     acc_t gamma, acc_t inv_temp) {
  const int64_t HB = H * B, view = HB * C, n = 2 * view;
  const acc_t tiny = std::numeric_limits<acc_t>::min();
  CEDM_GRID_LOOP(i, n) {
    const int64_t r = i / C, c = i % C;
    const int64_t v = r / HB, hb = r % HB, h = hb / B, b = hb % B;
    const acc_t lse_s = lse[r], lse_a = lse[2 * HB + r];
    const acc_t u = static_cast<acc_t>(z[i]) * inv_temp;
    const acc_t qo = static_cast<acc_t>(qt[(1 - v) * view + hb * C + c]);
    const acc_t la = math::temi_log_a(u, lse_s, math::log_(qo > tiny ? qo : tiny), gamma,
                                      log_prior[h * C + c]);
    const acc_t coef = grad_loss[h] / static_cast<acc_t>(2 * B) * w[b] * gamma * inv_temp;
    grad[i] = static_cast<scalar_t>(
        math::temi_grad(math::exp_(u - lse_s), math::exp_(la - lse_a), coef));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> temi_loss_cuda(const at::Tensor& student_logits,
                                                              const at::Tensor& teacher_probs,
                                                              const at::Tensor& prior,
                                                              double gamma, double student_temp) {
  check_temi("temi_loss", student_logits, teacher_probs, prior, student_temp);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor z = student_logits.contiguous(), qt = teacher_probs.contiguous();
  const auto acc = acc_type(z.scalar_type());
  const at::Tensor log_prior = prior.to(acc).log().contiguous();
  const int64_t H = z.size(1), B = z.size(2), C = z.size(3);
  const auto opts = z.options().dtype(acc);
  at::Tensor dot = at::empty({H, B}, opts), lse = at::empty({2, 2, H, B}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "temi_loss", [&] {
    using acc_t = acc_of<scalar_t>;
    temi_forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(H * B), kRowThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), qt.const_data_ptr<scalar_t>(),
        log_prior.const_data_ptr<acc_t>(), dot.mutable_data_ptr<acc_t>(),
        lse.mutable_data_ptr<acc_t>(), H, B, C, static_cast<acc_t>(gamma),
        static_cast<acc_t>(1.0 / student_temp));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return temi_epilogue(dot, lse);
}

at::Tensor temi_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                   const at::Tensor& teacher_probs, const at::Tensor& prior,
                                   const at::Tensor& w, const at::Tensor& lse, double gamma,
                                   double student_temp) {
  const char* op = "temi_loss_backward";
  check_temi(op, student_logits, teacher_probs, prior, student_temp);
  check_temi_saved(op, student_logits, grad_loss, w, lse);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const at::Tensor z = student_logits.contiguous(), qt = teacher_probs.contiguous();
  const auto acc = acc_type(z.scalar_type());
  const at::Tensor log_prior = prior.to(acc).log().contiguous();
  const at::Tensor g = grad_loss.to(acc).contiguous(), wc = w.to(acc).contiguous(),
                   lc = lse.to(acc).contiguous();
  const int64_t H = z.size(1), B = z.size(2), C = z.size(3);
  at::Tensor grad = at::empty(z.sizes(), z.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "temi_loss_backward", [&] {
    using acc_t = acc_of<scalar_t>;
    temi_backward_kernel<scalar_t, acc_t><<<grid_for(z.numel()), kThreads, 0, stream>>>(
        g.const_data_ptr<acc_t>(), z.const_data_ptr<scalar_t>(), qt.const_data_ptr<scalar_t>(),
        log_prior.const_data_ptr<acc_t>(), wc.const_data_ptr<acc_t>(), lc.const_data_ptr<acc_t>(),
        grad.mutable_data_ptr<scalar_t>(), H, B, C, static_cast<acc_t>(gamma),
        static_cast<acc_t>(1.0 / student_temp));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

// ---- EDM ----------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void edm_scale_input_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ sigma,
                                       acc_t sigma_data, scalar_t* __restrict__ out, int64_t n,
                                       int64_t inner) {
  CEDM_GRID_LOOP(i, n) {
    const auto c = math::edm_coefficients(sigma[i / inner], sigma_data);
    out[i] = static_cast<scalar_t>(math::edm_scale_input(static_cast<acc_t>(x[i]), c.c_in));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void edm_denoise_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ F,
                                   const acc_t* __restrict__ sigma, acc_t sigma_data,
                                   scalar_t* __restrict__ out, int64_t n, int64_t inner) {
  CEDM_GRID_LOOP(i, n) {
    const auto c = math::edm_coefficients(sigma[i / inner], sigma_data);
    out[i] = static_cast<scalar_t>(math::edm_denoise(static_cast<acc_t>(x[i]),
                                                     static_cast<acc_t>(F[i]), c.c_skip, c.c_out));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void edm_loss_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ F,
                                const scalar_t* __restrict__ y, const acc_t* __restrict__ sigma,
                                acc_t sigma_data, acc_t* __restrict__ out, int64_t inner) {
  __shared__ acc_t sh[kThreads / kWarp];
  const int64_t b = blockIdx.x, base = b * inner;
  const auto c = math::edm_coefficients(sigma[b], sigma_data);
  acc_t s = 0;
  for (int64_t k = threadIdx.x; k < inner; k += blockDim.x) {
    const acc_t r = math::edm_residual(static_cast<acc_t>(x[base + k]), static_cast<acc_t>(F[base + k]),
                                       static_cast<acc_t>(y[base + k]), c.c_skip, c.c_out);
    s += r * r;
  }
  s = block_sum(s, sh);
  if (threadIdx.x == 0) out[b] = c.weight * s;  // lambda(sigma) ||D - y||^2 (EDM eq. 8)
}

template <typename scalar_t, typename acc_t>
__global__ void edm_loss_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ F, const scalar_t* __restrict__ y,
                                         const acc_t* __restrict__ sigma, acc_t sigma_data,
                                         scalar_t* __restrict__ grad_F, int64_t n, int64_t inner) {
  CEDM_GRID_LOOP(i, n) {
    const int64_t b = i / inner;
    const auto c = math::edm_coefficients(sigma[b], sigma_data);
    const acc_t scale = acc_t(2) * grad[b] * c.weight * c.c_out;
    grad_F[i] = static_cast<scalar_t>(math::edm_loss_grad_F(
        static_cast<acc_t>(x[i]), static_cast<acc_t>(F[i]), static_cast<acc_t>(y[i]), c.c_skip,
        c.c_out, scale));
  }
}

at::Tensor edm_scale_input_cuda(const at::Tensor& x_, const at::Tensor& sigma, double sigma_data) {
  check_edm("edm_scale_input", x_, {}, sigma);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = dense_operands({&x_}, true)[0];
  at::Tensor out = empty_like_layout(x);
  if (x.numel() == 0) return out;
  const at::Tensor s = sigma_acc(sigma, acc_type(x.scalar_type()));
  const int64_t n = x.numel(), inner = n / x.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "edm_scale_input", [&] {
    using acc_t = acc_of<scalar_t>;
    edm_scale_input_kernel<scalar_t, acc_t><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), static_cast<acc_t>(sigma_data),
        out.mutable_data_ptr<scalar_t>(), n, inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor edm_denoise_cuda(const at::Tensor& x_, const at::Tensor& F_, const at::Tensor& sigma,
                            double sigma_data) {
  check_edm("edm_denoise", x_, {{"F", &F_}}, sigma);
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto xs = dense_operands({&x_, &F_}, true);
  const at::Tensor &x = xs[0], &F = xs[1];
  at::Tensor out = empty_like_layout(x);
  if (x.numel() == 0) return out;
  const at::Tensor s = sigma_acc(sigma, acc_type(x.scalar_type()));
  const int64_t n = x.numel(), inner = n / x.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "edm_denoise", [&] {
    using acc_t = acc_of<scalar_t>;
    edm_denoise_kernel<scalar_t, acc_t><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), F.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(),
        static_cast<acc_t>(sigma_data), out.mutable_data_ptr<scalar_t>(), n, inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor edm_loss_cuda(const at::Tensor& x_, const at::Tensor& F_, const at::Tensor& y_,
                         const at::Tensor& sigma, double sigma_data) {
  check_edm("edm_loss", x_, {{"F", &F_}, {"y", &y_}}, sigma);
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto xs = dense_operands({&x_, &F_, &y_}, true);
  const at::Tensor &x = xs[0], &F = xs[1], &y = xs[2];
  const auto acc = acc_type(x.scalar_type());
  const int64_t B = x.size(0);
  at::Tensor out = at::empty({B}, x.options().dtype(acc));
  if (B == 0) return out;
  const at::Tensor s = sigma_acc(sigma, acc);
  const int64_t inner = x.numel() / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "edm_loss", [&] {
    using acc_t = acc_of<scalar_t>;
    edm_loss_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), F.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
        s.const_data_ptr<acc_t>(), static_cast<acc_t>(sigma_data), out.mutable_data_ptr<acc_t>(),
        inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor edm_loss_backward_cuda(const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& F_,
                                  const at::Tensor& y_, const at::Tensor& sigma, double sigma_data) {
  const char* op = "edm_loss_backward";
  check_edm(op, x_, {{"F", &F_}, {"y", &y_}}, sigma);
  check_per_sample(op, "grad", grad_, x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto xs = dense_operands({&x_, &F_, &y_}, true);
  const at::Tensor &x = xs[0], &F = xs[1], &y = xs[2];
  const auto acc = acc_type(x.scalar_type());
  at::Tensor grad_F = empty_like_layout(F);
  if (x.numel() == 0) return grad_F;
  const at::Tensor s = sigma_acc(sigma, acc), g = grad_.to(acc).contiguous();
  const int64_t n = x.numel(), inner = n / x.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "edm_loss_backward", [&] {
    using acc_t = acc_of<scalar_t>;
    edm_loss_backward_kernel<scalar_t, acc_t><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), F.const_data_ptr<scalar_t>(),
        y.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), static_cast<acc_t>(sigma_data),
        grad_F.mutable_data_ptr<scalar_t>(), n, inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_F;
}

// ---- Heun ---------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void heun_churn_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ noise,
                                  acc_t coef, scalar_t* __restrict__ out, int64_t n) {
  CEDM_GRID_LOOP(i, n) {
    out[i] = static_cast<scalar_t>(
        math::heun_churn(static_cast<acc_t>(x[i]), static_cast<acc_t>(noise[i]), coef));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void heun_euler_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ d,
                                  acc_t inv_t, acc_t h, scalar_t* __restrict__ out, int64_t n) {
  CEDM_GRID_LOOP(i, n) {
    out[i] = static_cast<scalar_t>(
        math::heun_euler(static_cast<acc_t>(x[i]), static_cast<acc_t>(d[i]), inv_t, h));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void heun_correct_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ d,
                                    const scalar_t* __restrict__ xn, const scalar_t* __restrict__ dn,
                                    acc_t inv_t_hat, acc_t inv_t_next, acc_t h,
                                    scalar_t* __restrict__ out, int64_t n) {
  CEDM_GRID_LOOP(i, n) {
    out[i] = static_cast<scalar_t>(math::heun_correct(
        static_cast<acc_t>(x[i]), static_cast<acc_t>(d[i]), static_cast<acc_t>(xn[i]),
        static_cast<acc_t>(dn[i]), inv_t_hat, inv_t_next, h));
  }
}

at::Tensor heun_churn_cuda(const at::Tensor& x_, const at::Tensor& noise_, double t_cur,
                           double t_hat, double s_noise) {
  check_like("heun_churn", "x", x_, {{"noise", &noise_}});
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto xs = dense_operands({&x_, &noise_}, false);
  const at::Tensor &x = xs[0], &noise = xs[1];
  at::Tensor out = empty_like_layout(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const double coef = churn_coef(t_cur, t_hat, s_noise);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "heun_churn", [&] {
    using acc_t = acc_of<scalar_t>;
    heun_churn_kernel<scalar_t, acc_t><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), noise.const_data_ptr<scalar_t>(), static_cast<acc_t>(coef),
        out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor heun_euler_cuda(const at::Tensor& x_hat_, const at::Tensor& denoised_, double t_hat,
                           double t_next) {
  check_like("heun_euler", "x_hat", x_hat_, {{"denoised", &denoised_}});
  const c10::cuda::CUDAGuard guard(x_hat_.device());
  const auto xs = dense_operands({&x_hat_, &denoised_}, false);
  const at::Tensor &x = xs[0], &d = xs[1];
  at::Tensor out = empty_like_layout(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "heun_euler", [&] {
    using acc_t = acc_of<scalar_t>;
    heun_euler_kernel<scalar_t, acc_t><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), static_cast<acc_t>(1.0 / t_hat),
        static_cast<acc_t>(t_next - t_hat), out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor heun_correct_cuda(const at::Tensor& x_hat_, const at::Tensor& denoised_,
                             const at::Tensor& x_next_, const at::Tensor& denoised_next_,
                             double t_hat, double t_next) {
  check_like("heun_correct", "x_hat", x_hat_,
             {{"denoised", &denoised_}, {"x_next", &x_next_}, {"denoised_next", &denoised_next_}});
  const c10::cuda::CUDAGuard guard(x_hat_.device());
  const auto xs = dense_operands({&x_hat_, &denoised_, &x_next_, &denoised_next_}, false);
  const at::Tensor &x = xs[0], &d = xs[1], &xn = xs[2], &dn = xs[3];
  at::Tensor out = empty_like_layout(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "heun_correct", [&] {
    using acc_t = acc_of<scalar_t>;
    heun_correct_kernel<scalar_t, acc_t><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), xn.const_data_ptr<scalar_t>(),
        dn.const_data_ptr<scalar_t>(), static_cast<acc_t>(1.0 / t_hat),
        static_cast<acc_t>(1.0 / t_next), static_cast<acc_t>(t_next - t_hat),
        out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cedm, CUDA, m) {
  m.impl("temi_loss", &temi_loss_cuda);
  m.impl("temi_loss_backward", &temi_loss_backward_cuda);
  m.impl("edm_scale_input", &edm_scale_input_cuda);
  m.impl("edm_denoise", &edm_denoise_cuda);
  m.impl("edm_loss", &edm_loss_cuda);
  m.impl("edm_loss_backward", &edm_loss_backward_cuda);
  m.impl("heun_churn", &heun_churn_cuda);
  m.impl("heun_euler", &heun_euler_cuda);
  m.impl("heun_correct", &heun_correct_cuda);
}

}  // namespace cedm
