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
"""
from __future__ import annotations

import math
import os
import sys

import torch

_EXT = None          # the loaded extension module, or None
_WARNED = False


def _load_extension() -> bool:
    global _EXT
    if os.environ.get("CEDM_OPS", "").lower() == "reference":
        return False
    if _EXT is not None:
        return True
    try:
        from cedm import _C  # noqa: F401  (registers torch.ops.cedm.*)
    except ImportError:
        return False
    _EXT = _C
    return True


def extension_available() -> bool:
    """True when the compiled kernels (cedm._C) are loaded."""
    return _load_extension()


def _fallback_note() -> None:
    global _WARNED
    if not _WARNED and os.environ.get("CEDM_OPS", "").lower() != "reference":
        print("cedm: note: fused kernels not built (run `make build-ext`); "
              "using the PyTorch reference ops", file=sys.stderr)
    _WARNED = True


# ----------------------------------------------------------------------------------------------
# EDM preconditioning coefficients (PAPER.md, EDM Table 1)

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
    """TEMI multi-head loss per head (PAPER.md, TEMI):

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


# ----------------------------------------------------------------------------------------------
# Public facade

def _dispatch(name):
    if _load_extension():
        return getattr(torch.ops.cedm, name)
    _fallback_note()
    return globals()["ref_" + name]


def temi_loss(student_logits, teacher_probs, prior, gamma: float = 0.6, student_temp: float = 0.1):
    return _dispatch("temi_loss")(student_logits, teacher_probs, prior, float(gamma), float(student_temp))


def edm_scale_input(x, sigma, sigma_data: float = 0.5):
    return _dispatch("edm_scale_input")(x, sigma, float(sigma_data))


def edm_denoise(x, F, sigma, sigma_data: float = 0.5):
    return _dispatch("edm_denoise")(x, F, sigma, float(sigma_data))


def edm_loss(x, F, y, sigma, sigma_data: float = 0.5):
    return _dispatch("edm_loss")(x, F, y, sigma, float(sigma_data))


def heun_churn(x, noise, t_cur: float, t_hat: float, s_noise: float = 1.0):
    return _dispatch("heun_churn")(x, noise, float(t_cur), float(t_hat), float(s_noise))


def heun_euler(x_hat, denoised, t_hat: float, t_next: float):
    return _dispatch("heun_euler")(x_hat, denoised, float(t_hat), float(t_next))


def heun_correct(x_hat, denoised, x_next, denoised_next, t_hat: float, t_next: float):
    return _dispatch("heun_correct")(x_hat, denoised, x_next, denoised_next, float(t_hat), float(t_next))
