// cedm fused ops: schemas (TORCH_LIBRARY), argument checks, CPU implementations
// (at::parallel_for over the kernels of cpu/, AVX2 or portable picked at run time) and the Python
// module cedm._C. The elementwise EDM / Heun kernels run over storage order, so inputs that share
// one dense layout (channels_last included) need no copy and the outputs keep it. The math is the contract of cedm/ops.py (its ref_* functions); autograd and fake
// (meta) implementations are registered from Python in cedm/ops.py.
#include <Python.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cedm_ops.h"
#include "cpu/kernels.h"

namespace cedm {

// ------------------------------------------------------------------------------------------------
// Checks

namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " must be a tensor, got None");
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  check_defined(op, name, t);
  TORCH_CHECK_TYPE(is_float(t), op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                  const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

}  // namespace

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_temi(const char* op, const at::Tensor& z, const at::Tensor& qt, const at::Tensor& prior,
                double student_temp) {
  check_float(op, "student_logits", z);
  TORCH_CHECK_VALUE(z.dim() == 4 && z.size(0) == 2, op,
                    ": student_logits must have shape [2, H, B, C] (views, heads, batch, "
                    "clusters), got ", shape_str(z.sizes()));
  TORCH_CHECK_VALUE(z.numel() > 0, op, ": student_logits must not be empty, got shape ",
                    shape_str(z.sizes()));
  check_float(op, "teacher_probs", qt);
  TORCH_CHECK_VALUE(qt.sizes() == z.sizes(), op,
                    ": teacher_probs must have the shape of student_logits [2, H, B, C] = ",
                    shape_str(z.sizes()), ", got ", shape_str(qt.sizes()));
  TORCH_CHECK_TYPE(qt.scalar_type() == z.scalar_type(), op,
                   ": teacher_probs must have the dtype of student_logits (", z.scalar_type(),
                   "), got ", qt.scalar_type());
  check_device(op, "teacher_probs", qt, "student_logits", z);
  check_float(op, "prior", prior);
  TORCH_CHECK_VALUE(prior.dim() == 2 && prior.size(0) == z.size(1) && prior.size(1) == z.size(3),
                    op, ": prior must have shape [H, C] = [", z.size(1), ", ", z.size(3),
                    "], got ", shape_str(prior.sizes()));
  check_device(op, "prior", prior, "student_logits", z);
  TORCH_CHECK_VALUE(student_temp > 0, op, ": student_temp must be > 0, got ", student_temp);
}

void check_temi_saved(const char* op, const at::Tensor& z, const at::Tensor& grad_loss,
                      const at::Tensor& w, const at::Tensor& lse) {
  const int64_t H = z.size(1), B = z.size(2);
  check_float(op, "grad_loss", grad_loss);
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == H, op,
                    ": grad_loss must have shape [H] = [", H, "], got ",
                    shape_str(grad_loss.sizes()));
  check_device(op, "grad_loss", grad_loss, "student_logits", z);
  check_float(op, "w", w);
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == B, op, ": w must have shape [B] = [", B,
                    "], got ", shape_str(w.sizes()));
  check_device(op, "w", w, "student_logits", z);
  check_float(op, "lse", lse);
  TORCH_CHECK_VALUE(lse.dim() == 4 && lse.size(0) == 2 && lse.size(1) == 2 && lse.size(2) == H &&
                        lse.size(3) == B,
                    op, ": lse must have shape [2, 2, H, B] = [2, 2, ", H, ", ", B, "], got ",
                    shape_str(lse.sizes()));
  check_device(op, "lse", lse, "student_logits", z);
}

void check_like(const char* op, const char* x_name, const at::Tensor& x,
                std::initializer_list<NamedTensor> like_x) {
  check_float(op, x_name, x);
  for (const auto& [name, t] : like_x) {
    check_defined(op, name, *t);
    TORCH_CHECK_VALUE(t->sizes() == x.sizes(), op, ": ", name, " must have the shape of ",
                      x_name, " ", shape_str(x.sizes()), ", got ", shape_str(t->sizes()));
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), op, ": ", name,
                     " must have the dtype of ", x_name, " (", x.scalar_type(), "), got ",
                     t->scalar_type());
    check_device(op, name, *t, x_name, x);
  }
}

void check_edm(const char* op, const at::Tensor& x, std::initializer_list<NamedTensor> like_x,
               const at::Tensor& sigma) {
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have a batch dimension [B, ...], got a scalar");
  check_like(op, "x", x, like_x);
  check_float(op, "sigma", sigma);
  TORCH_CHECK_VALUE(sigma.numel() == x.size(0) && (sigma.dim() == 1 || sigma.dim() == x.dim()),
                    op, ": sigma must have one noise level per sample, shape [B] = [", x.size(0),
                    "], got ", shape_str(sigma.sizes()));
  check_device(op, "sigma", sigma, "x", x);
}

void check_per_sample(const char* op, const char* name, const at::Tensor& v, const at::Tensor& x) {
  check_float(op, name, v);
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == x.size(0), op, ": ", name,
                    " must have shape [B] = [", x.size(0), "], got ", shape_str(v.sizes()));
  check_device(op, name, v, "x", x);
}

bool shares_dense_layout(std::initializer_list<const at::Tensor*> ts, bool per_sample) {
  const at::Tensor& x = **ts.begin();
  if (!x.is_non_overlapping_and_dense()) return false;
  for (const at::Tensor* t : ts) {
    if (t->strides() != x.strides()) return false;
  }
  if (per_sample && x.dim() >= 1 && x.size(0) > 1 && x.numel() > 0) {
    return x.stride(0) == x.numel() / x.size(0);  // batch outermost: sample b = one block
  }
  return true;
}

std::vector<at::Tensor> dense_operands(std::initializer_list<const at::Tensor*> ts,
                                       bool per_sample) {
  const bool keep = shares_dense_layout(ts, per_sample);
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const at::Tensor* t : ts) out.push_back(keep ? *t : t->contiguous());
  return out;
}

at::Tensor empty_like_layout(const at::Tensor& x) {
  return at::empty_strided(x.sizes(), x.strides(), x.options());
}

at::Tensor sigma_acc(const at::Tensor& sigma, at::ScalarType acc) {
  return sigma.reshape({-1}).to(acc).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> temi_epilogue(const at::Tensor& dot,
                                                            const at::Tensor& lse) {
  // docs/method.md#temi-loss: w(x,x') = 1/H sum_h sum_c q_t^h(c|x) q_t^h(c|x')
  at::Tensor w = dot.mean(0);
  // L^h = -w lse_a, symmetrised over the views and averaged over the batch
  at::Tensor loss = -(lse.select(0, 1) * w).mean(at::IntArrayRef{0, 2});
  return {loss, w, lse};
}

double churn_coef(double t_cur, double t_hat, double s_noise) {
  return std::sqrt(std::max(t_hat * t_hat - t_cur * t_cur, 0.0)) * s_noise;
}

// ------------------------------------------------------------------------------------------------
// CPU implementations

namespace {

enum class Isa { Base, Avx2, Avx512 };

// The widest copy the CPU runs; CEDM_CPU_ISA=base|avx2 caps it (tests of the narrower copies).
Isa detect_isa() {
  const char* env = std::getenv("CEDM_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "base") == 0) return Isa::Base;
  const bool cap_avx2 = env != nullptr && std::strcmp(env, "avx2") == 0;
#if defined(CEDM_HAVE_AVX2)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
#if defined(CEDM_HAVE_AVX512)
  if (avx2 && !cap_avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    return Isa::Avx512;
  }
#endif
  if (avx2) return Isa::Avx2;
#endif
  (void)cap_avx2;
  return Isa::Base;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

#if defined(CEDM_HAVE_AVX512)
#define CEDM_CPU(fn, ...)                                                          \
  do {                                                                             \
    switch (cpu_isa()) {                                                           \
      case Isa::Avx512: cpu::avx512::fn(__VA_ARGS__); break;                       \
      case Isa::Avx2: cpu::avx2::fn(__VA_ARGS__); break;                           \
      default: cpu::base::fn(__VA_ARGS__);                                         \
    }                                                                              \
  } while (0)
#elif defined(CEDM_HAVE_AVX2)
#define CEDM_CPU(fn, ...)                                                           \
  do {                                                                              \
    if (cpu_isa() == Isa::Avx2) cpu::avx2::fn(__VA_ARGS__); else cpu::base::fn(__VA_ARGS__); \
  } while (0)
#else
#define CEDM_CPU(fn, ...) cpu::base::fn(__VA_ARGS__)
#endif

constexpr int64_t kGrain = 32768;  // elements per task, as at::internal::GRAIN_SIZE

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, work_per_item));
}

// at::parallel_for over [begin, end) in chunks of `grain` that the threads take in turn (an
// atomic counter) instead of one fixed share each: on a shared machine a thread that is not
// scheduled for a while then delays the op by one chunk, not by half of it. Every chunk writes
// its own outputs, so the result does not depend on which thread ran it.
template <typename F>
void parallel_chunks(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      f(begin + c * grain, std::min(end, begin + (c + 1) * grain));
    }
  });
}

#define CEDM_DISPATCH(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, name, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor, at::Tensor> temi_loss_cpu(const at::Tensor& student_logits,
                                                             const at::Tensor& teacher_probs,
                                                             const at::Tensor& prior,
                                                             double gamma, double student_temp) {
  check_temi("temi_loss", student_logits, teacher_probs, prior, student_temp);
  const at::Tensor z = student_logits.contiguous(), qt = teacher_probs.contiguous();
  const auto acc = acc_type(z.scalar_type());
  const at::Tensor log_prior = prior.to(acc).log().contiguous();  // log prior^h(c)
  const int64_t H = z.size(1), B = z.size(2), C = z.size(3);
  const auto opts = z.options().dtype(acc);
  at::Tensor dot = at::empty({H, B}, opts), lse = at::empty({2, 2, H, B}, opts);
  CEDM_DISPATCH(z.scalar_type(), "temi_loss", [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* qp = qt.const_data_ptr<scalar_t>();
    const acc_t* lp = log_prior.const_data_ptr<acc_t>();
    acc_t* dp = dot.mutable_data_ptr<acc_t>();
    acc_t* sp = lse.mutable_data_ptr<acc_t>();
    const auto g = static_cast<acc_t>(gamma), inv_t = static_cast<acc_t>(1.0 / student_temp);
    parallel_chunks(0, H * B, grain_for(8 * C), [&](int64_t p0, int64_t p1) {
      CEDM_CPU(temi_forward<scalar_t>, zp, qp, lp, dp, sp, H, B, C, g, inv_t, p0, p1);
    });
  });
  return temi_epilogue(dot, lse);
}

at::Tensor temi_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                  const at::Tensor& teacher_probs, const at::Tensor& prior,
                                  const at::Tensor& w, const at::Tensor& lse, double gamma,
                                  double student_temp) {
  const char* op = "temi_loss_backward";
  check_temi(op, student_logits, teacher_probs, prior, student_temp);
  check_temi_saved(op, student_logits, grad_loss, w, lse);
  const at::Tensor z = student_logits.contiguous(), qt = teacher_probs.contiguous();
  const auto acc = acc_type(z.scalar_type());
  const at::Tensor log_prior = prior.to(acc).log().contiguous();
  const at::Tensor g = grad_loss.to(acc).contiguous(), wc = w.to(acc).contiguous(),
                   lc = lse.to(acc).contiguous();
  const int64_t H = z.size(1), B = z.size(2), C = z.size(3);
  at::Tensor grad = at::empty(z.sizes(), z.options());
  CEDM_DISPATCH(z.scalar_type(), "temi_loss_backward", [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* qp = qt.const_data_ptr<scalar_t>();
    const acc_t* lp = log_prior.const_data_ptr<acc_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* wp = wc.const_data_ptr<acc_t>();
    const acc_t* sp = lc.const_data_ptr<acc_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    const auto ga = static_cast<acc_t>(gamma), inv_t = static_cast<acc_t>(1.0 / student_temp);
    parallel_chunks(0, 2 * H * B, grain_for(4 * C), [&](int64_t r0, int64_t r1) {
      CEDM_CPU(temi_backward<scalar_t>, gp, zp, qp, lp, wp, sp, out, H, B, C, ga, inv_t, r0, r1);
    });
  });
  return grad;
}

at::Tensor edm_scale_input_cpu(const at::Tensor& x_, const at::Tensor& sigma, double sigma_data) {
  check_edm("edm_scale_input", x_, {}, sigma);
  const at::Tensor x = dense_operands({&x_}, true)[0];
  at::Tensor out = empty_like_layout(x);
  if (x.numel() == 0) return out;
  const at::Tensor s = sigma_acc(sigma, acc_type(x.scalar_type()));
  const int64_t inner = x.numel() / x.size(0);
  CEDM_DISPATCH(x.scalar_type(), "edm_scale_input", [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* sp = s.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const auto sd = static_cast<acc_t>(sigma_data);
    parallel_chunks(0, x.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      CEDM_CPU(edm_scale_input<scalar_t>, xp, sp, sd, op, inner, i0, i1);
    });
  });
  return out;
}

at::Tensor edm_denoise_cpu(const at::Tensor& x_, const at::Tensor& F_, const at::Tensor& sigma,
                           double sigma_data) {
  check_edm("edm_denoise", x_, {{"F", &F_}}, sigma);
  const auto xs = dense_operands({&x_, &F_}, true);
  const at::Tensor &x = xs[0], &F = xs[1];
  at::Tensor out = empty_like_layout(x);
  if (x.numel() == 0) return out;
  const at::Tensor s = sigma_acc(sigma, acc_type(x.scalar_type()));
  const int64_t inner = x.numel() / x.size(0);
  CEDM_DISPATCH(x.scalar_type(), "edm_denoise", [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* fp = F.const_data_ptr<scalar_t>();
    const acc_t* sp = s.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const auto sd = static_cast<acc_t>(sigma_data);
    parallel_chunks(0, x.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      CEDM_CPU(edm_denoise<scalar_t>, xp, fp, sp, sd, op, inner, i0, i1);
    });
  });
  return out;
}

at::Tensor edm_loss_cpu(const at::Tensor& x_, const at::Tensor& F_, const at::Tensor& y_,
                        const at::Tensor& sigma, double sigma_data) {
  check_edm("edm_loss", x_, {{"F", &F_}, {"y", &y_}}, sigma);
  const auto xs = dense_operands({&x_, &F_, &y_}, true);
  const at::Tensor &x = xs[0], &F = xs[1], &y = xs[2];
  const auto acc = acc_type(x.scalar_type());
  const int64_t B = x.size(0);
  at::Tensor out = at::empty({B}, x.options().dtype(acc));
  if (B == 0) return out;
  const at::Tensor s = sigma_acc(sigma, acc);
  const int64_t inner = x.numel() / B;
  CEDM_DISPATCH(x.scalar_type(), "edm_loss", [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* fp = F.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const acc_t* sp = s.const_data_ptr<acc_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    const auto sd = static_cast<acc_t>(sigma_data);
    parallel_chunks(0, B, grain_for(inner), [&](int64_t b0, int64_t b1) {
      CEDM_CPU(edm_loss<scalar_t>, xp, fp, yp, sp, sd, op, inner, b0, b1);
    });
  });
  return out;
}

at::Tensor edm_loss_backward_cpu(const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& F_,
                                 const at::Tensor& y_, const at::Tensor& sigma, double sigma_data) {
  const char* op = "edm_loss_backward";
  check_edm(op, x_, {{"F", &F_}, {"y", &y_}}, sigma);
  check_per_sample(op, "grad", grad_, x_);
  const auto xs = dense_operands({&x_, &F_, &y_}, true);
  const at::Tensor &x = xs[0], &F = xs[1], &y = xs[2];
  const auto acc = acc_type(x.scalar_type());
  at::Tensor grad_F = empty_like_layout(F);
  if (x.numel() == 0) return grad_F;
  const at::Tensor s = sigma_acc(sigma, acc), g = grad_.to(acc).contiguous();
  const int64_t inner = x.numel() / x.size(0);
  CEDM_DISPATCH(x.scalar_type(), "edm_loss_backward", [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* fp = F.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const acc_t* sp = s.const_data_ptr<acc_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    scalar_t* out = grad_F.mutable_data_ptr<scalar_t>();
    const auto sd = static_cast<acc_t>(sigma_data);
    parallel_chunks(0, x.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      CEDM_CPU(edm_loss_backward<scalar_t>, gp, xp, fp, yp, sp, sd, out, inner, i0, i1);
    });
  });
  return grad_F;
}

at::Tensor heun_churn_cpu(const at::Tensor& x_, const at::Tensor& noise_, double t_cur,
                          double t_hat, double s_noise) {
  check_like("heun_churn", "x", x_, {{"noise", &noise_}});
  const auto xs = dense_operands({&x_, &noise_}, false);
  const at::Tensor &x = xs[0], &noise = xs[1];
  at::Tensor out = empty_like_layout(x);
  const double coef = churn_coef(t_cur, t_hat, s_noise);
  CEDM_DISPATCH(x.scalar_type(), "heun_churn", [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* np = noise.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    parallel_chunks(0, x.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      CEDM_CPU(heun_churn<scalar_t>, xp, np, static_cast<acc_t>(coef), op, i0, i1);
    });
  });
  return out;
}

at::Tensor heun_euler_cpu(const at::Tensor& x_hat_, const at::Tensor& denoised_, double t_hat,
                          double t_next) {
  check_like("heun_euler", "x_hat", x_hat_, {{"denoised", &denoised_}});
  const auto xs = dense_operands({&x_hat_, &denoised_}, false);
  const at::Tensor &x = xs[0], &d = xs[1];
  at::Tensor out = empty_like_layout(x);
  CEDM_DISPATCH(x.scalar_type(), "heun_euler", [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const auto inv = static_cast<acc_t>(1.0 / t_hat), h = static_cast<acc_t>(t_next - t_hat);
    parallel_chunks(0, x.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      CEDM_CPU(heun_euler<scalar_t>, xp, dp, inv, h, op, i0, i1);
    });
  });
  return out;
}

at::Tensor heun_correct_cpu(const at::Tensor& x_hat_, const at::Tensor& denoised_,
                            const at::Tensor& x_next_, const at::Tensor& denoised_next_,
                            double t_hat, double t_next) {
  check_like("heun_correct", "x_hat", x_hat_,
             {{"denoised", &denoised_}, {"x_next", &x_next_}, {"denoised_next", &denoised_next_}});
  const auto xs = dense_operands({&x_hat_, &denoised_, &x_next_, &denoised_next_}, false);
  const at::Tensor &x = xs[0], &d = xs[1], &xn = xs[2], &dn = xs[3];
  at::Tensor out = empty_like_layout(x);
  CEDM_DISPATCH(x.scalar_type(), "heun_correct", [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const scalar_t* xnp = xn.const_data_ptr<scalar_t>();
    const scalar_t* dnp = dn.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const auto inv_h = static_cast<acc_t>(1.0 / t_hat), inv_n = static_cast<acc_t>(1.0 / t_next),
               h = static_cast<acc_t>(t_next - t_hat);
    parallel_chunks(0, x.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      CEDM_CPU(heun_correct<scalar_t>, xp, dp, xnp, dnp, inv_h, inv_n, h, op, i0, i1);
    });
  });
  return out;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
namespace {

// GroupNorm + SiLU: x [N, C, *] (4-d channels_last runs as it is, other layouts contiguous),
// weight and bias [C] (any float dtype; used in acc), C divisible by groups.
void check_group_norm(const char* op, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& bias, int64_t groups) {
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must have shape [N, C, ...], got ", shape_str(x.sizes()));
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(groups > 0 && C % groups == 0, op, ": the ", C,
                    " channels of x must split into groups (", groups, ")");
  for (const auto& [name, t] : {NamedTensor{"weight", &weight}, NamedTensor{"bias", &bias}}) {
    check_float(op, name, *t);
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have shape [C] = [",
                      C, "], got ", shape_str(t->sizes()));
    check_device(op, name, *t, "x", x);
  }
}

bool gn_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(const at::Tensor& x_,
                                                                   const at::Tensor& weight,
                                                                   const at::Tensor& bias,
                                                                   int64_t groups, double eps) {
  check_group_norm("group_norm_silu", x_, weight, bias, groups);
  const bool cl = gn_channels_last(x_);
  const at::Tensor x = cl ? x_ : x_.contiguous();
  const auto acc = acc_type(x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), HW = N * C != 0 ? x.numel() / (N * C) : 0;
  at::Tensor y = empty_like_layout(x);
  at::Tensor mean = at::empty({N, groups}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({N, groups}, x.options().dtype(acc));
  if (x.numel() == 0) return {y, mean.fill_(0), rstd.fill_(0)};
  const at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  CEDM_DISPATCH(x.scalar_type(), "group_norm_silu", [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    const auto e = static_cast<acc_t>(eps);
    parallel_chunks(0, N, 1, [&](int64_t n0, int64_t n1) {
      CEDM_CPU(gn_silu_forward<scalar_t>, xp, wp, bp, yp, mp, rp, C, HW, groups, e, cl, n0, n1);
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean_, const at::Tensor& rstd_, int64_t groups) {
  const char* op = "group_norm_silu_backward";
  check_group_norm(op, x_, weight, bias, groups);
  check_like(op, "x", x_, {{"grad", &grad_}});
  const int64_t N = x_.size(0), C = x_.size(1), HW = N * C != 0 ? x_.numel() / (N * C) : 0;
  for (const auto& [name, t] : {NamedTensor{"mean", &mean_}, NamedTensor{"rstd", &rstd_}}) {
    check_float(op, name, *t);
    TORCH_CHECK_VALUE(t->numel() == N * groups, op, ": ", name, " must have N * groups = ",
                      N * groups, " values, got ", shape_str(t->sizes()));
    check_device(op, name, *t, "x", x_);
  }
  const bool cl = gn_channels_last(x_);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_.contiguous(fmt), grad = grad_.contiguous(fmt);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor grad_x = empty_like_layout(x);
  at::Tensor dw = at::zeros({N, C}, x.options().dtype(acc)), db = at::zeros({N, C}, x.options().dtype(acc));
  if (x.numel() > 0) {
    const at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
    const at::Tensor mean = mean_.reshape({-1}).to(acc).contiguous();
    const at::Tensor rstd = rstd_.reshape({-1}).to(acc).contiguous();
    CEDM_DISPATCH(x.scalar_type(), "group_norm_silu_backward", [&] {
      using acc_t = cpu::acc_t<scalar_t>;
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const acc_t* wp = w.const_data_ptr<acc_t>();
      const acc_t* bp = b.const_data_ptr<acc_t>();
      const acc_t* mp = mean.const_data_ptr<acc_t>();
      const acc_t* rp = rstd.const_data_ptr<acc_t>();
      scalar_t* out = grad_x.mutable_data_ptr<scalar_t>();
      acc_t* dwp = dw.mutable_data_ptr<acc_t>();
      acc_t* dbp = db.mutable_data_ptr<acc_t>();
      parallel_chunks(0, N, 1, [&](int64_t n0, int64_t n1) {
        CEDM_CPU(gn_silu_backward<scalar_t>, gp, xp, wp, bp, mp, rp, out, dwp, dbp, C, HW, groups,
                 cl, n0, n1);
      });
    });
  }
  // per-sample partials summed in sample order: the same result for any thread count
  return {grad_x, dw.sum(0).to(weight.scalar_type()), db.sum(0).to(bias.scalar_type())};
}

// ------------------------------------------------------------------------------------------------
// Registration

TORCH_LIBRARY(cedm, m) {
  m.set_python_module("cedm.ops");  // register_fake / register_autograd live there
  m.def("temi_loss(Tensor student_logits, Tensor teacher_probs, Tensor prior, float gamma, "
        "float student_temp) -> (Tensor loss, Tensor w, Tensor lse)");
  m.def("temi_loss_backward(Tensor grad_loss, Tensor student_logits, Tensor teacher_probs, "
        "Tensor prior, Tensor w, Tensor lse, float gamma, float student_temp) -> Tensor");
  m.def("edm_scale_input(Tensor x, Tensor sigma, float sigma_data) -> Tensor");
  m.def("edm_denoise(Tensor x, Tensor F, Tensor sigma, float sigma_data) -> Tensor");
  m.def("edm_loss(Tensor x, Tensor F, Tensor y, Tensor sigma, float sigma_data) -> Tensor");
  m.def("edm_loss_backward(Tensor grad, Tensor x, Tensor F, Tensor y, Tensor sigma, "
        "float sigma_data) -> Tensor");
  m.def("heun_churn(Tensor x, Tensor noise, float t_cur, float t_hat, float s_noise) -> Tensor");
  m.def("heun_euler(Tensor x_hat, Tensor denoised, float t_hat, float t_next) -> Tensor");
  m.def("heun_correct(Tensor x_hat, Tensor denoised, Tensor x_next, Tensor denoised_next, "
        "float t_hat, float t_next) -> Tensor");
  m.def("group_norm_silu(Tensor x, Tensor weight, Tensor bias, int groups, float eps) -> "
        "(Tensor y, Tensor mean, Tensor rstd)");
  m.def("group_norm_silu_backward(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor mean, "
        "Tensor rstd, int groups) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(cedm, CPU, m) {
  m.impl("temi_loss", &temi_loss_cpu);
  m.impl("temi_loss_backward", &temi_loss_backward_cpu);
  m.impl("edm_scale_input", &edm_scale_input_cpu);
  m.impl("edm_denoise", &edm_denoise_cpu);
  m.impl("edm_loss", &edm_loss_cpu);
  m.impl("edm_loss_backward", &edm_loss_backward_cpu);
  m.impl("heun_churn", &heun_churn_cpu);
  m.impl("heun_euler", &heun_euler_cpu);
  m.impl("heun_correct", &heun_correct_cpu);
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace cedm

// ------------------------------------------------------------------------------------------------
// Python module cedm._C: importing it runs the registrations above.

namespace {

PyObject* cedm_cpu_isa(PyObject*, PyObject*) {
  const auto isa = cedm::cpu_isa();
  return PyUnicode_FromString(isa == cedm::Isa::Avx512 ? "avx512"
                              : isa == cedm::Isa::Avx2 ? "avx2" : "base");
}

PyObject* cedm_has_cuda(PyObject*, PyObject*) {
#if defined(CEDM_WITH_CUDA)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef cedm_methods[] = {
    {"cpu_isa", cedm_cpu_isa, METH_NOARGS,
     "Instruction set of the CPU kernels in use: 'avx512', 'avx2' or 'base' (CEDM_CPU_ISA=base or "
     "avx2 caps it)."},
    {"has_cuda", cedm_has_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef cedm_module = {PyModuleDef_HEAD_INIT, "_C",
                           "cedm fused kernels; importing registers torch.ops.cedm.*", -1,
                           cedm_methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&cedm_module); }
