"""Fused ops facade: the C++/CUDA extension (csrc/, `cedm._C`) with pure-PyTorch references.

Each public function dispatches to `torch.ops.cedm.<op>` when the extension is built
(`make build-ext`) and otherwise to the `ref_*` reference below, saying once on stderr that it
fell back. `CEDM_OPS=reference` forces the references (benchmarks, tests).

Layouts and dtypes (the contract the kernels implement):
  temi_loss(student_logits [2,H,B,C], teacher_probs [2,H,B,C], prior [H,C], gamma, student_temp)
      -> loss [H]. View v of the pair is index v on dim 0 (x = 0, x' = 1). Gradient flows to
      student_logits only. Reductions accumulate in float32 (float64 for float64 inputs) and
      return float32 (float64 for float64 inputs).
  edm_scale_input(x [B,...], sigma [B], sigma_data) -> c_in(sigma) * x             (x.dtype)
  edm_denoise(x [B,...], F [B,...], sigma [B], sigma_data) -> c_skip x + c_out F   (x.dtype)
  edm_loss(x [B,...], F [B,...], y [B,...], sigma [B], sigma_data)
      -> [B] per-sample lambda(sigma) * sum_pixels (c_skip x + c_out F - y)^2, D never stored.
  heun_churn(x, noise, t_cur, t_hat, s_noise) -> x + sqrt(t_hat^2 - t_cur^2) * s_noise * noise
  heun_euler(x_hat, denoised, t_hat, t_next) -> x_hat + (t_next - t_hat) * (x_hat - denoised) / t_hat
  heun_correct(x_hat, denoised, x_next, denoised_next, t_hat, t_next)
      -> x_hat + (t_next - t_hat) * (d + d') / 2,  d = (x_hat - denoised) / t_hat,
                                                  d' = (x_next - denoised_next) / t_next
  group_norm_silu(x [N,C,...], weight [C], bias [C], groups, eps) -> silu(GroupNorm(x)) (x.dtype,
      statistics in float32, float64 for float64 x): the GN-SiLU pairs of the network. CPU only:
      on other devices (and without the extension) it is ATen's group_norm and silu.

The compiled ops (torch.ops.cedm.*, csrc/) take the same arguments. Differences from the facade:
  torch.ops.cedm.temi_loss returns (loss [H], w [B], lse [2,2,H,B]): w(x,x') and the row
      log-normalisers (lse[0] = logsumexp_c z/T, lse[1] = logsumexp_c log a_c per view, head,
      sample), saved for torch.ops.cedm.temi_loss_backward(grad_loss, student_logits,
      teacher_probs, prior, w, lse, gamma, student_temp) -> grad wrt student_logits.
  torch.ops.cedm.edm_loss_backward(grad [B], x, F, y, sigma, sigma_data) -> grad wrt F.
  Tensors of one op share dtype and device (sigma and prior: any float dtype). The EDM and Heun
  ops run over storage order, without a copy, when their tensor inputs share one dense layout
  (the same strides: channels_last, any permutation; for the EDM ops with the batch dimension
  outermost), and their outputs then keep that layout; other inputs are made contiguous first and
  the outputs are contiguous (`_layout_like`). The TEMI outputs are contiguous.
  torch.ops.cedm.group_norm_silu returns (y, mean [N,G], rstd [N,G]) for
      torch.ops.cedm.group_norm_silu_backward(grad, x, weight, bias, mean, rstd, groups)
      -> (grad_x, grad_weight, grad_bias); 4-d channels_last x runs without a copy and y, grad_x
      keep that layout, other layouts are made contiguous.
  Autograd (registered below): temi_loss -> student_logits only; edm_scale_input,
  edm_denoise, edm_loss -> x, F, y and sigma; group_norm_silu -> x, weight, bias. The heun_* ops
  (sampling) have no autograd.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import torch

_EXT = None          # the loaded extension module, or None
_EXT_ERROR = None    # why it could not be loaded (ImportError text), once tried
_WARNED = False
_FORCE_REFERENCE = False  # set by reference_ops()


def _import_extension():
    """Import cedm._C once (registers torch.ops.cedm.*) and its Python side (fake, autograd)."""
    global _EXT, _EXT_ERROR
    if _EXT is None and _EXT_ERROR is None:
        try:
            from cedm import _C  # noqa: F401  (registers torch.ops.cedm.*)
        except ImportError as e:
            _EXT_ERROR = str(e)
        else:
            _register_python_side()
            _EXT = _C
    return _EXT


def _load_extension() -> bool:
    if _FORCE_REFERENCE or os.environ.get("CEDM_OPS", "").lower() == "reference":
        return False
    return _import_extension() is not None


def extension_available() -> bool:
    """True when the compiled kernels (cedm._C) are loaded."""
    return _load_extension()


@contextlib.contextmanager
def reference_ops():
    """Within this block every op runs its PyTorch reference, as CEDM_OPS=reference does for a
    whole process (the baselines of benchmarks/, timed in the same process as the kernels)."""
    global _FORCE_REFERENCE
    saved, _FORCE_REFERENCE = _FORCE_REFERENCE, True
    try:
        yield
    finally:
        _FORCE_REFERENCE = saved


def _fallback_note() -> None:
    global _WARNED
    if _FORCE_REFERENCE:
        return
    if not _WARNED and os.environ.get("CEDM_OPS", "").lower() != "reference":
        built = any(Path(__file__).parent.glob("_C*.so"))
        why = (f"could not be loaded ({_EXT_ERROR})" if built
               else "not built (run `make build-ext`)")
        print(f"cedm: note: fused kernels {why}; using the PyTorch reference ops", file=sys.stderr)
    _WARNED = True


# ----------------------------------------------------------------------------------------------
# EDM preconditioning coefficients (EDM Table 1; docs/method.md#edm-precond)

def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """c_skip, c_out, c_in, c_noise for noise level sigma (EDM preconditioning)."""
    s2, d2 = sigma * sigma, sigma_data * sigma_data
    c_skip = d2 / (s2 + d2)                        # sigma_d^2 / (sigma^2 + sigma_d^2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()  # sigma sigma_d / sqrt(sigma^2 + sigma_d^2)
    c_in = 1 / (s2 + d2).sqrt()                    # 1 / sqrt(sigma^2 + sigma_d^2)
    c_noise = sigma.log() / 4                      # ln(sigma) / 4
    return c_skip, c_out, c_in, c_noise


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (EDM loss weight)."""
    return (sigma * sigma + sigma_data ** 2) / (sigma * sigma_data) ** 2


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# References (pure PyTorch, eager). These define the math the kernels must match.

def ref_temi_loss(student_logits, teacher_probs, prior, gamma: float = 0.6, student_temp: float = 0.1):
    """TEMI multi-head loss per head (TEMI Eq. 6-7; docs/method.md#temi-loss):

    w(x,x')  = 1/H sum_j sum_c q_t^j(c|x) q_t^j(c|x')                     (no gradient)
    L^i      = -w log sum_c (q_s^i(c|x) q_t^i(c|x'))^gamma / prior^i(c)
    symmetrised over the two views, averaged over the batch -> [H].
    """
    acc = _acc_dtype(student_logits)
    z = student_logits.to(acc)
    qt = teacher_probs.to(acc).detach()
    p = prior.to(acc).detach()
    w = (qt[0] * qt[1]).sum(-1).mean(0)                                  # [B]
    log_qs = torch.log_softmax(z / student_temp, dim=-1)                 # [2,H,B,C]
    log_qt_other = qt.flip(0).clamp_min(torch.finfo(acc).tiny).log()     # teacher on the other view
    log_a = gamma * (log_qs + log_qt_other) - p.log()[None, :, None, :]  # log (q_s q_t)^g / prior
    loss = -w[None, None, :] * torch.logsumexp(log_a, dim=-1)            # [2,H,B]
    return loss.mean(dim=(0, 2))


def ref_edm_scale_input(x, sigma, sigma_data: float = 0.5):
    _, _, c_in, _ = edm_coefficients(sigma.to(_acc_dtype(x)), sigma_data)
    return (_bcast(c_in, x) * x).to(x.dtype)


def ref_edm_denoise(x, F, sigma, sigma_data: float = 0.5):
    """D(x; sigma) = c_skip x + c_out F (EDM eq. 7)."""
    c_skip, c_out, _, _ = edm_coefficients(sigma.to(_acc_dtype(x)), sigma_data)
    return (_bcast(c_skip, x) * x + _bcast(c_out, x) * F).to(x.dtype)


def ref_edm_loss(x, F, y, sigma, sigma_data: float = 0.5):
    """Per-sample lambda(sigma) * ||D(x; sigma) - y||^2 summed over pixels (EDM eq. 8)."""
    acc = _acc_dtype(x)
    s = sigma.to(acc)
    c_skip, c_out, _, _ = edm_coefficients(s, sigma_data)
    D = _bcast(c_skip, x) * x.to(acc) + _bcast(c_out, x) * F.to(acc)
    return edm_weight(s, sigma_data) * (D - y.to(acc)).square().flatten(1).sum(1)


def ref_heun_churn(x, noise, t_cur: float, t_hat: float, s_noise: float = 1.0):
    """x_hat = x + sqrt(t_hat^2 - t_cur^2) S_noise n (EDM Alg. 2, line 6)."""
    return x + math.sqrt(max(t_hat * t_hat - t_cur * t_cur, 0.0)) * s_noise * noise


def ref_heun_euler(x_hat, denoised, t_hat: float, t_next: float):
    """Euler step: d = (x_hat - D)/t_hat, x' = x_hat + (t_next - t_hat) d (EDM Alg. 2, lines 7-8)."""
    d = (x_hat - denoised) / t_hat
    return x_hat + (t_next - t_hat) * d


def ref_heun_correct(x_hat, denoised, x_next, denoised_next, t_hat: float, t_next: float):
    """2nd-order correction: x_{i+1} = x_hat + (t_next - t_hat)(d + d')/2 (EDM Alg. 2, lines 9-11)."""
    d = (x_hat - denoised) / t_hat
    d_prime = (x_next - denoised_next) / t_next
    return x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)


def ref_group_norm_silu(x, weight, bias, groups: int, eps: float = 1e-5):
    """silu(GroupNorm(x)): each GroupNorm of the DDPM++ blocks feeds a SiLU (EDM networks.py)."""
    return torch.nn.functional.silu(torch.nn.functional.group_norm(x, groups, weight, bias, eps))


# ----------------------------------------------------------------------------------------------
# Public facade

def _dispatch(name):
    if _load_extension():
        return getattr(torch.ops.cedm, name)
    _fallback_note()
    return globals()["ref_" + name]


def temi_loss(student_logits, teacher_probs, prior, gamma: float = 0.6, student_temp: float = 0.1):
    if _load_extension():  # the op also returns w [B] and the row logsumexps for its backward
        return torch.ops.cedm.temi_loss(student_logits, teacher_probs, prior, float(gamma),
                                        float(student_temp))[0]
    _fallback_note()
    return ref_temi_loss(student_logits, teacher_probs, prior, float(gamma), float(student_temp))


def edm_scale_input(x, sigma, sigma_data: float = 0.5):
    return _dispatch("edm_scale_input")(x, sigma, float(sigma_data))


def edm_denoise(x, F, sigma, sigma_data: float = 0.5):
    return _dispatch("edm_denoise")(x, F, sigma, float(sigma_data))


def edm_loss(x, F, y, sigma, sigma_data: float = 0.5):
    return _dispatch("edm_loss")(x, F, y, sigma, float(sigma_data))


def group_norm_silu(x, weight, bias, groups: int, eps: float = 1e-5):
    """silu(GroupNorm(x)): the fused CPU kernel (statistics in one pass, the output in a second;
    the backward in two passes with one exp) on a CPU; ATen's group_norm + silu elsewhere."""
    if x.device.type == "cpu":
        if _load_extension():
            return torch.ops.cedm.group_norm_silu(x, weight, bias, int(groups), float(eps))[0]
        _fallback_note()
    return ref_group_norm_silu(x, weight, bias, int(groups), float(eps))


def heun_churn(x, noise, t_cur: float, t_hat: float, s_noise: float = 1.0):
    return _dispatch("heun_churn")(x, noise, float(t_cur), float(t_hat), float(s_noise))


def heun_euler(x_hat, denoised, t_hat: float, t_next: float):
    return _dispatch("heun_euler")(x_hat, denoised, float(t_hat), float(t_next))


def heun_correct(x_hat, denoised, x_next, denoised_next, t_hat: float, t_next: float):
    return _dispatch("heun_correct")(x_hat, denoised, x_next, denoised_next, float(t_hat), float(t_next))


# ----------------------------------------------------------------------------------------------
# Python side of the extension: fake (meta) kernels for torch.compile / FakeTensor, and autograd.
# The ops themselves (schemas, CPU/CUDA kernels, argument checks) are in csrc/.

def _check_devices(op, ref_name, ref, **tensors):
    for name, t in tensors.items():
        torch._check(t.device == ref.device,
                     lambda name=name, t=t: f"{op}: {name} must be on the device of {ref_name} ({ref.device}), "
                                            f"got {t.device}")


def _edm_sigma_grads(sigma, sigma_data):
    """d/dsigma of (c_skip, c_out, c_in, lambda), in the accumulation dtype of sigma."""
    s2, d2 = sigma * sigma, sigma_data * sigma_data
    r2 = s2 + d2
    r3 = r2 * r2.sqrt()
    return (-2 * sigma * d2 / (r2 * r2),     # c_skip = d2 / r2
            sigma_data * d2 / r3,            # c_out = sigma sd / sqrt(r2)
            -sigma / r3,                     # c_in = 1 / sqrt(r2)
            -2 / (sigma * sigma * sigma))    # lambda = 1/sd^2 + 1/sigma^2


def _dense(t) -> bool:
    """c10's is_non_overlapping_and_dense: the dims of size >= 2, by increasing stride, tile
    memory without gaps or overlaps."""
    need = 1
    for st, n in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n >= 2):
        if st != need:
            return False
        need *= n
    return True


def _layout_like(x, *others, per_sample: bool):
    """Output of an elementwise EDM / Heun op, as csrc/ops.cpp makes it (shares_dense_layout):
    x's strides when x and `others` share one dense layout (per_sample: each sample one block of
    memory), else contiguous."""
    keep = _dense(x) and all(t.stride() == x.stride() for t in others)
    if keep and per_sample and x.dim() >= 1 and x.shape[0] > 1 and x.numel() > 0:
        keep = x.stride(0) == x.numel() // x.shape[0]
    if keep:
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return x.new_empty(x.shape)


def _gn_layout(x):
    """Output layout of the GroupNorm ops (csrc/ops.cpp gn_channels_last): 4-d channels_last x
    keeps its strides, anything else is contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(x, memory_format=torch.channels_last)
    return x.new_empty(x.shape)


def _sum_inner(t):
    return t.flatten(1).sum(1)


def _register_python_side() -> None:
    lib = torch.library

    # -- fake kernels: shapes, dtypes and layouts of the real ones --
    @lib.register_fake("cedm::temi_loss")
    def _(student_logits, teacher_probs, prior, gamma, student_temp):
        _check_devices("temi_loss", "student_logits", student_logits,
                       teacher_probs=teacher_probs, prior=prior)
        _, H, B, _ = student_logits.shape
        acc = _acc_dtype(student_logits)
        new = student_logits.new_empty
        return new((H,), dtype=acc), new((B,), dtype=acc), new((2, 2, H, B), dtype=acc)

    @lib.register_fake("cedm::temi_loss_backward")
    def _(grad_loss, student_logits, teacher_probs, prior, w, lse, gamma, student_temp):
        _check_devices("temi_loss_backward", "student_logits", student_logits,
                       teacher_probs=teacher_probs, prior=prior, grad_loss=grad_loss, w=w, lse=lse)
        return student_logits.new_empty(student_logits.shape)

    @lib.register_fake("cedm::edm_scale_input")
    def _(x, sigma, sigma_data):
        _check_devices("edm_scale_input", "x", x, sigma=sigma)
        return _layout_like(x, per_sample=True)

    @lib.register_fake("cedm::edm_denoise")
    def _(x, F, sigma, sigma_data):
        _check_devices("edm_denoise", "x", x, F=F, sigma=sigma)
        return _layout_like(x, F, per_sample=True)

    @lib.register_fake("cedm::edm_loss")
    def _(x, F, y, sigma, sigma_data):
        _check_devices("edm_loss", "x", x, F=F, y=y, sigma=sigma)
        return x.new_empty((x.shape[0],), dtype=_acc_dtype(x))

    @lib.register_fake("cedm::edm_loss_backward")
    def _(grad, x, F, y, sigma, sigma_data):
        _check_devices("edm_loss_backward", "x", x, F=F, y=y, sigma=sigma, grad=grad)
        return _layout_like(x, F, y, per_sample=True)

    @lib.register_fake("cedm::heun_churn")
    def _(x, noise, t_cur, t_hat, s_noise):
        _check_devices("heun_churn", "x", x, noise=noise)
        return _layout_like(x, noise, per_sample=False)

    @lib.register_fake("cedm::heun_euler")
    def _(x_hat, denoised, t_hat, t_next):
        _check_devices("heun_euler", "x_hat", x_hat, denoised=denoised)
        return _layout_like(x_hat, denoised, per_sample=False)

    @lib.register_fake("cedm::heun_correct")
    def _(x_hat, denoised, x_next, denoised_next, t_hat, t_next):
        _check_devices("heun_correct", "x_hat", x_hat, denoised=denoised, x_next=x_next,
                       denoised_next=denoised_next)
        return _layout_like(x_hat, denoised, x_next, denoised_next, per_sample=False)

    @lib.register_fake("cedm::group_norm_silu")
    def _(x, weight, bias, groups, eps):
        _check_devices("group_norm_silu", "x", x, weight=weight, bias=bias)
        stat = x.new_empty((x.shape[0], groups), dtype=_acc_dtype(x))
        return _gn_layout(x), stat, stat.new_empty(stat.shape)

    @lib.register_fake("cedm::group_norm_silu_backward")
    def _(grad, x, weight, bias, mean, rstd, groups):
        _check_devices("group_norm_silu_backward", "x", x, grad=grad, weight=weight, bias=bias,
                       mean=mean, rstd=rstd)
        return _gn_layout(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape)

    # -- autograd --
    # TEMI: gradient to the student logits only (teacher and prior are constants, docs/method.md#temi-loss).
    def temi_setup(ctx, inputs, output):
        student_logits, teacher_probs, prior, gamma, student_temp = inputs
        _, w, lse = output
        ctx.save_for_backward(student_logits, teacher_probs, prior, w, lse)
        ctx.gamma, ctx.student_temp = gamma, student_temp
        ctx.mark_non_differentiable(w, lse)

    def temi_backward(ctx, grad_loss, _grad_w, _grad_lse):
        student_logits, teacher_probs, prior, w, lse = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.cedm.temi_loss_backward(grad_loss, student_logits, teacher_probs, prior,
                                                     w, lse, ctx.gamma, ctx.student_temp)
        return grad, None, None, None, None

    lib.register_autograd("cedm::temi_loss", temi_backward, setup_context=temi_setup)

    # EDM: gradients to x, F (and y), and to sigma through the closed-form coefficient derivatives.
    def scale_setup(ctx, inputs, output):
        x, sigma, sigma_data = inputs
        ctx.save_for_backward(x, sigma)
        ctx.sigma_data = sigma_data

    def scale_backward(ctx, grad):
        x, sigma = ctx.saved_tensors
        gx = gs = None
        if ctx.needs_input_grad[0]:  # d(c_in x)/dx = c_in: the same fused op on the gradient
            gx = torch.ops.cedm.edm_scale_input(grad.to(x.dtype), sigma, ctx.sigma_data)
        if ctx.needs_input_grad[1]:
            acc = _acc_dtype(x)
            s = sigma.reshape(-1).to(acc)
            _, _, dc_in, _ = _edm_sigma_grads(s, ctx.sigma_data)
            gs = (dc_in * _sum_inner(grad.to(acc) * x.to(acc))).reshape(sigma.shape).to(sigma.dtype)
        return gx, gs, None

    lib.register_autograd("cedm::edm_scale_input", scale_backward, setup_context=scale_setup)

    def denoise_setup(ctx, inputs, output):
        x, F, sigma, sigma_data = inputs
        ctx.save_for_backward(x, F, sigma)
        ctx.sigma_data = sigma_data

    def denoise_backward(ctx, grad):
        x, F, sigma = ctx.saved_tensors
        acc = _acc_dtype(x)
        s = sigma.reshape(-1).to(acc)
        c_skip, c_out, _, _ = edm_coefficients(s, ctx.sigma_data)
        g = grad.to(acc)
        gx = (g * _bcast(c_skip, g)).to(x.dtype) if ctx.needs_input_grad[0] else None
        gF = (g * _bcast(c_out, g)).to(F.dtype) if ctx.needs_input_grad[1] else None
        gs = None
        if ctx.needs_input_grad[2]:
            dc_skip, dc_out, _, _ = _edm_sigma_grads(s, ctx.sigma_data)
            gs = dc_skip * _sum_inner(g * x.to(acc)) + dc_out * _sum_inner(g * F.to(acc))
            gs = gs.reshape(sigma.shape).to(sigma.dtype)
        return gx, gF, gs, None

    lib.register_autograd("cedm::edm_denoise", denoise_backward, setup_context=denoise_setup)

    def loss_setup(ctx, inputs, output):
        x, F, y, sigma, sigma_data = inputs
        ctx.save_for_backward(x, F, y, sigma)
        ctx.sigma_data = sigma_data

    def loss_backward(ctx, grad):
        x, F, y, sigma = ctx.saved_tensors
        need_x, need_F, need_y, need_s = ctx.needs_input_grad[:4]
        gx = gF = gy = gs = None
        if need_x or need_F or need_y:
            # dL/dF = 2 g lambda c_out (D - y), one fused pass; dL/dx = dL/dF c_skip / c_out and
            # dL/dy = -dL/dF / c_out are rescalings of it
            gF = torch.ops.cedm.edm_loss_backward(grad, x, F, y, sigma, ctx.sigma_data)
            if need_x or need_y:
                acc = _acc_dtype(x)
                c_skip, c_out, _, _ = edm_coefficients(sigma.reshape(-1).to(acc), ctx.sigma_data)
                gFa = gF.to(acc)
                if need_x:
                    gx = (gFa * _bcast(c_skip / c_out, gFa)).to(x.dtype)
                if need_y:
                    gy = (-gFa / _bcast(c_out, gFa)).to(y.dtype)
            if not need_F:
                gF = None
        if need_s:
            acc = _acc_dtype(x)
            s = sigma.reshape(-1).to(acc)
            c_skip, c_out, _, _ = edm_coefficients(s, ctx.sigma_data)
            dc_skip, dc_out, _, dlam = _edm_sigma_grads(s, ctx.sigma_data)
            xa, Fa = x.to(acc), F.to(acc)
            r = _bcast(c_skip, xa) * xa + _bcast(c_out, xa) * Fa - y.to(acc)  # D - y
            dr = _bcast(dc_skip, xa) * xa + _bcast(dc_out, xa) * Fa
            gs = grad.to(acc) * (dlam * _sum_inner(r * r) + 2 * edm_weight(s, ctx.sigma_data) * _sum_inner(r * dr))
            gs = gs.reshape(sigma.shape).to(sigma.dtype)
        return gx, gF, gy, gs, None

    lib.register_autograd("cedm::edm_loss", loss_backward, setup_context=loss_setup)

    # GroupNorm + SiLU: gradients to x, weight and bias from the saved statistics (one fused op).
    def gn_setup(ctx, inputs, output):
        x, weight, bias, groups, _eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups = groups
        ctx.mark_non_differentiable(mean, rstd)

    def gn_backward(ctx, grad, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        gx, gw, gb = torch.ops.cedm.group_norm_silu_backward(grad.to(x.dtype), x, weight, bias, mean,
                                                             rstd, ctx.groups)
        need = ctx.needs_input_grad
        return gx if need[0] else None, gw if need[1] else None, gb if need[2] else None, None, None

    lib.register_autograd("cedm::group_norm_silu", gn_backward, setup_context=gn_setup)


if os.environ.get("CEDM_OPS", "").lower() != "reference":
    _import_extension()  # registers the fake and autograd kernels when cedm._C is built
