// Host-side helpers shared by the CPU (ops.cpp) and CUDA (cuda/kernels.cu) implementations:
// argument checks with messages that name the argument, and the small epilogues computed with
// ATen ops on [H, B]-sized tensors.
#pragma once

#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace cedm {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// float64 -> float64, everything else -> float32 (the accumulation / reduction dtype)
at::ScalarType acc_type(at::ScalarType t);

// TEMI: student_logits [2,H,B,C] float, teacher_probs same shape/dtype/device, prior [H,C].
void check_temi(const char* op, const at::Tensor& student_logits, const at::Tensor& teacher_probs,
                const at::Tensor& prior, double student_temp);
// TEMI backward extras: grad_loss [H], w [B], lse [2,2,H,B] on the device of the logits.
void check_temi_saved(const char* op, const at::Tensor& student_logits, const at::Tensor& grad_loss,
                      const at::Tensor& w, const at::Tensor& lse);
// x [B,...] float; `like_x` have x's shape/dtype/device; sigma float with B values, same device.
void check_edm(const char* op, const at::Tensor& x, std::initializer_list<NamedTensor> like_x,
               const at::Tensor& sigma);
// x float; `like_x` have x's shape/dtype/device (first name is x's own name).
void check_like(const char* op, const char* x_name, const at::Tensor& x,
                std::initializer_list<NamedTensor> like_x);
// A per-sample vector (grad of edm_loss): B values, same device as x.
void check_per_sample(const char* op, const char* name, const at::Tensor& v, const at::Tensor& x);

// Layout of the elementwise EDM / Heun ops. When all `ts` share one dense, non-overlapping layout
// (the same strides: contiguous, channels_last, any permutation) and, if `per_sample`, every
// sample of dim 0 is one block of numel/B consecutive elements in memory (b = offset / inner),
// the kernels can run over storage order: the tensors are returned as they are. Otherwise they
// are returned contiguous (a copy). Outputs are made with `empty_like_layout` so that they keep
// the layout of the first operand.
bool shares_dense_layout(std::initializer_list<const at::Tensor*> ts, bool per_sample);
std::vector<at::Tensor> dense_operands(std::initializer_list<const at::Tensor*> ts, bool per_sample);
// An uninitialised tensor of x's shape, dtype, device and strides (x dense, non-overlapping).
at::Tensor empty_like_layout(const at::Tensor& x);

// sigma as a contiguous [B] tensor of the accumulation dtype
at::Tensor sigma_acc(const at::Tensor& sigma, at::ScalarType acc);

// TEMI: w = mean_h dot[h, b]; loss[h] = -mean_{v,b} w[b] lse_a[v,h,b] -> (loss [H], w [B], lse)
std::tuple<at::Tensor, at::Tensor, at::Tensor> temi_epilogue(const at::Tensor& dot,
                                                            const at::Tensor& lse);

// sqrt(max(t_hat^2 - t_cur^2, 0)) * s_noise (EDM Alg. 2, line 6)
double churn_coef(double t_cur, double t_hat, double s_noise);

}  // namespace cedm
