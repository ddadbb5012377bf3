"""Fused ops (cedm._C, csrc/) against the PyTorch references of cedm/ops.py, and the references
against the paper. Extension tests skip, visibly, when cedm._C is not built (`make build-ext`)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cedm import ops

HAS_EXT = ops._import_extension() is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="cedm._C not built (run `make build-ext`)")
ROOT = Path(__file__).resolve().parents[1]

GAMMA, TEMP = 0.6, 0.1
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def temi_inputs(H, B, C, dtype=torch.float32, seed=0, scale=1.0):
    g = _gen(seed)
    z = (torch.randn(2, H, B, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    qt = torch.softmax(torch.randn(2, H, B, C, generator=g, dtype=torch.float64) / 0.3, -1).to(dtype)
    prior = torch.softmax(torch.randn(H, C, generator=g, dtype=torch.float64), -1).to(dtype)
    return z, qt, prior


def edm_inputs(shape, dtype=torch.float32, seed=0):
    g = _gen(seed)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    sigma = (torch.randn(shape[0], generator=g, dtype=torch.float64) * 1.2 - 1.2).exp()
    x = y + sigma.reshape(-1, *[1] * (len(shape) - 1)) * torch.randn(shape, generator=g, dtype=torch.float64)
    F = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype), F.to(dtype), y.to(dtype), sigma.to(dtype)


def heun_inputs(shape, dtype=torch.float32, seed=0):
    g = _gen(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]


def gn_inputs(shape, groups, dtype=torch.float32, seed=0, offset=0.0):
    """x [N,C,...], weight, bias [C] (weight and bias float32 unless x is float64, as under autocast)."""
    g = _gen(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = (1 + 0.5 * torch.randn(shape[1], generator=g, dtype=torch.float64)).to(pdt)
    b = (0.5 * torch.randn(shape[1], generator=g, dtype=torch.float64)).to(pdt)
    return x, w, b, groups


def gn_fwd_bwd(fn, x, w, b, groups, dy):
    """y and the gradients wrt x, weight, bias of sum(y * dy)."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b, groups, 1e-6)
    return (y.detach(), *torch.autograd.grad((y.double() * dy.double()).sum(), (x, w, b)))


def close(a, b, dtype):
    """assert_close with atol relative to the largest reference value (cancellation in D - y,
    q_s - a/S makes small entries differ by rounding of the large ones)."""
    a, b = a.double(), b.double()
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


def temi_fwd_bwd(fn, z, qt, prior, weights):
    z = z.detach().clone().requires_grad_()
    loss = fn(z, qt, prior, GAMMA, TEMP)
    (grad,) = torch.autograd.grad((loss * weights.to(loss.dtype)).sum(), z)
    return loss.detach(), grad


# ------------------------------------------------------------------------------------------------
# The contract itself: the reference TEMI loss is the formula of docs/method.md#temi-loss

def test_ref_temi_loss_matches_paper_formula():
    H, B, C = 3, 4, 5
    z, qt, prior = temi_inputs(H, B, C, torch.float64, seed=1)
    loss = ops.ref_temi_loss(z, qt, prior, GAMMA, TEMP)
    qs = torch.softmax(z / TEMP, -1)  # student probabilities, softmax(logits / 0.1)
    want = torch.zeros(H, dtype=torch.float64)
    for i in range(H):
        total = 0.0
        for b in range(B):
            # w(x,x') = 1/H sum_j sum_c q_t^j(c|x) q_t^j(c|x')
            w = sum(float(qt[0, j, b, c] * qt[1, j, b, c]) for j in range(H) for c in range(C)) / H
            for v in range(2):  # x -> x' and the swapped direction
                s = sum(float((qs[v, i, b, c] * qt[1 - v, i, b, c]) ** GAMMA / prior[i, c]) for c in range(C))
                total += -w * math.log(s)
        want[i] = total / (2 * B)  # averaged over the two directions and the batch
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)


def test_reference_fallback_when_forced(monkeypatch):
    monkeypatch.setenv("CEDM_OPS", "reference")
    z, qt, prior = temi_inputs(2, 3, 4)
    assert not ops.extension_available()
    torch.testing.assert_close(ops.temi_loss(z, qt, prior, GAMMA, TEMP),
                               ops.ref_temi_loss(z, qt, prior, GAMMA, TEMP), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels, autograd registration, AOT dispatch

def _op_samples(to_layout=lambda *ts: ts, edm_shape=(4, 3, 2, 2), heun_shape=(3, 5),
                gn_shape=(3, 4, 2, 3)):
    """One sample input per op (opcheck and every test take theirs from here); `to_layout`
    re-lays the EDM and Heun tensors out (channels_last, ...) before they are used."""
    z, qt, prior = temi_inputs(3, 5, 7)
    x, F, y, sigma = edm_inputs(edm_shape)
    x, F, y = to_layout(x, F, y)
    h = to_layout(*heun_inputs(heun_shape))
    torch.manual_seed(0)
    loss, w, lse = torch.ops.cedm.temi_loss(z, qt, prior, GAMMA, TEMP)
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
    gx, gw, gb, groups = gn_inputs(gn_shape, 2)
    gx = to_layout(gx)[0]
    _, mean, rstd = torch.ops.cedm.group_norm_silu(gx, gw, gb, groups, 1e-6)
    return {
        "group_norm_silu": (rg(gx), rg(gw), rg(gb), groups, 1e-6),
        "group_norm_silu_backward": (torch.randn_like(gx), gx, gw, gb, mean, rstd, groups),
        "temi_loss": (rg(z), qt, prior, GAMMA, TEMP),
        "temi_loss_backward": (torch.rand(3), z, qt, prior, w, lse, GAMMA, TEMP),
        "edm_scale_input": (rg(x), sigma, 0.5),
        "edm_denoise": (rg(x), rg(F), sigma, 0.5),
        "edm_loss": (rg(x), rg(F), rg(y), sigma, 0.5),
        "edm_loss_backward": (torch.rand(4), x, F, y, sigma, 0.5),
        "heun_churn": (h[0], h[1], 0.5, 0.7, 1.007),
        "heun_euler": (h[0], h[1], 1.3, 0.9),
        "heun_correct": (h[0], h[1], h[2], h[3], 1.3, 0.9),
    }


OPS = ["temi_loss", "temi_loss_backward", "edm_scale_input", "edm_denoise", "edm_loss",
       "edm_loss_backward", "heun_churn", "heun_euler", "heun_correct"]
CPU_OPS = ["group_norm_silu", "group_norm_silu_backward"]   # no CUDA kernel: ATen's there (ops.py)


@needs_ext
@pytest.mark.parametrize("name", OPS + CPU_OPS)
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.cedm, name).default, _op_samples()[name])


# ------------------------------------------------------------------------------------------------
# gradcheck (float64) through the registered autograd

@needs_ext
def test_gradcheck_temi_loss():
    z, qt, prior = temi_inputs(2, 3, 5, torch.float64, seed=2)
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: ops.temi_loss(z, qt, prior, GAMMA, TEMP), (z,))


@needs_ext
def test_gradcheck_edm():
    x, F, y, sigma = edm_inputs((3, 2, 3), torch.float64, seed=3)
    for t in (x, F, y, sigma):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, s: ops.edm_scale_input(x, s, 0.5), (x, sigma))
    assert torch.autograd.gradcheck(lambda x, F, s: ops.edm_denoise(x, F, s, 0.5), (x, F, sigma))
    assert torch.autograd.gradcheck(lambda x, F, y, s: ops.edm_loss(x, F, y, s, 0.5), (x, F, y, sigma))


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_group_norm_silu(layout):
    x, w, b, groups = gn_inputs((2, 6, 3, 2), 3, torch.float64, seed=4)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for t in (x, w, b):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: ops.group_norm_silu(x, w, b, groups, 1e-6), (x, w, b))


GN_CASES = [((1, 2, 1, 3), 1), ((2, 8, 5, 3), 4), ((3, 64, 4, 4), 32), ((2, 48, 7, 9), 16), ((2, 12, 33), 3)]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups,layout", [(s, g, lay) for s, g in GN_CASES
                                                 for lay in ("contiguous", "channels_last")
                                                 if lay == "contiguous" or len(s) == 4])
def test_group_norm_silu_matches_reference(shape, groups, layout, dtype):
    """Output and gradients of the fused op = ATen's group_norm + silu computed in float64, for
    both layouts (channels_last stays channels_last), every dtype, odd sizes (vector tails) and an
    offset mean (the two-pass variance)."""
    x, w, b, groups = gn_inputs(shape, groups, dtype, seed=sum(shape), offset=3.0)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=_gen(7), dtype=torch.float64).to(dtype)
    got = gn_fwd_bwd(ops.group_norm_silu, x, w, b, groups, dy)
    want = gn_fwd_bwd(ops.ref_group_norm_silu, x.double(), w.double(), b.double(), groups, dy)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == w.dtype
    assert got[0].stride() == x.stride() and got[1].stride() == x.stride()
    tol = torch.float32 if dtype == torch.float64 else dtype       # weights are float32 then
    for a, r in zip(got, want):
        close(a, r, dtype if a.dtype == dtype else tol)


@needs_ext
def test_group_norm_silu_in_the_network_matches_aten():
    """The network's blocks with the fused op give ATen's output and gradients (fp32)."""
    from cedm.networks import build, network_kwargs

    torch.manual_seed(0)
    net = build(network_kwargs("tiny", 16, 3))
    x, s = torch.randn(4, 3, 16, 16), torch.rand(4) + 0.5
    lab = torch.nn.functional.one_hot(torch.arange(4) % 3, 3).float()

    def run():
        net.zero_grad(set_to_none=True)
        out = net(x, s, lab)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]
    fused = run()
    with ops.reference_ops():
        ref = run()
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-4, atol=1e-5)
    for a, r in zip(fused[1], ref[1]):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-4 * max(1.0, float(r.abs().max())))


# ------------------------------------------------------------------------------------------------
# Agreement with the references

TEMI_SHAPES = [(1, 1, 1), (2, 1, 2), (3, 7, 13), (2, 5, 1), (4, 3, 40), (2, 2, 1000)]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,B,C", TEMI_SHAPES)
def test_temi_matches_reference(H, B, C, dtype):
    z, qt, prior = temi_inputs(H, B, C, dtype, seed=H * 100 + B * 10 + C)
    weights = torch.linspace(0.5, 2.0, H)
    loss, grad = temi_fwd_bwd(ops.temi_loss, z, qt, prior, weights)
    ref_loss, ref_grad = temi_fwd_bwd(ops.ref_temi_loss, z, qt, prior, weights)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == z.shape
    close(loss, ref_loss, dtype)
    close(grad, ref_grad, dtype)


@needs_ext
def test_temi_extreme_logits_stay_finite():
    z, qt, prior = temi_inputs(2, 4, 30, torch.float32, seed=5, scale=40.0)  # z/T up to ~1e3
    qt[0, 0, 0] = 0.0  # a teacher row of exact zeros (log clamped to the smallest normal)
    qt[0, 0, 0, 3] = 1.0
    loss, grad = temi_fwd_bwd(ops.temi_loss, z, qt, prior, torch.ones(2))
    ref_loss, ref_grad = temi_fwd_bwd(ops.ref_temi_loss, z, qt, prior, torch.ones(2))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # grad = coef (q_s - a/S) with coef = w gamma / (T 2B) ~ 0.05 here: agree to ~1e-5 of coef
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


EDM_SHAPES = [(1, 3, 4, 4), (7, 13), (5, 1), (3, 2, 5, 7), (2, 3, 32, 32)]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", EDM_SHAPES)
def test_edm_matches_reference(shape, dtype):
    x, F, y, sigma = edm_inputs(shape, dtype, seed=len(shape))
    close(ops.edm_scale_input(x, sigma, 0.5), ops.ref_edm_scale_input(x, sigma, 0.5), dtype)
    close(ops.edm_denoise(x, F, sigma, 0.5), ops.ref_edm_denoise(x, F, sigma, 0.5), dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    loss = ops.edm_loss(x, F, y, sigma, 0.5)
    assert loss.dtype == acc and loss.shape == (shape[0],)
    close(loss, ops.ref_edm_loss(x, F, y, sigma, 0.5), dtype)
    # gradients of a weighted sum of the per-sample losses, w.r.t. x, F and y
    wts = torch.linspace(0.5, 1.5, shape[0], dtype=acc)
    grads = []
    for fn in (ops.edm_loss, ops.ref_edm_loss):
        ins = [t.detach().clone().requires_grad_() for t in (x, F, y)]
        grads.append(torch.autograd.grad((fn(*ins, sigma, 0.5) * wts).sum(), ins))
    for ours, ref in zip(*grads):
        assert ours.dtype == dtype
        close(ours, ref, dtype)


HEUN_SHAPES = [(1,), (7, 13), (2, 3, 5, 7), (4, 3, 16, 16)]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", HEUN_SHAPES)
def test_heun_matches_reference(shape, dtype):
    x, d, xn, dn = heun_inputs(shape, dtype, seed=len(shape))
    for t_cur, t_hat, s_noise in ((0.8, 0.9, 1.007), (0.5, 0.5, 1.0), (0.9, 0.8, 1.0)):
        close(ops.heun_churn(x, d, t_cur, t_hat, s_noise), ops.ref_heun_churn(x, d, t_cur, t_hat, s_noise), dtype)
    close(ops.heun_euler(x, d, 1.3, 0.9), ops.ref_heun_euler(x, d, 1.3, 0.9), dtype)
    close(ops.heun_correct(x, d, xn, dn, 1.3, 0.9), ops.ref_heun_correct(x, d, xn, dn, 1.3, 0.9), dtype)


@needs_ext
def test_non_contiguous_inputs():
    # TEMI: logits/teacher as transposed views of [2,H,C,B] storage, prior as a strided view
    z0, qt0, _ = temi_inputs(3, 6, 11, seed=7)
    z = z0.transpose(2, 3).contiguous().transpose(2, 3)
    qt = qt0.transpose(2, 3).contiguous().transpose(2, 3)
    prior = torch.softmax(torch.randn(11, 6), 0)[:, ::2].t()  # [3, 11], non-contiguous
    assert not (z.is_contiguous() or qt.is_contiguous() or prior.is_contiguous())
    w = torch.tensor([1.0, 2.0, 3.0])
    for a, b in zip(temi_fwd_bwd(ops.temi_loss, z, qt, prior, w), temi_fwd_bwd(ops.ref_temi_loss, z, qt, prior, w)):
        close(a, b, torch.float32)
    # EDM / Heun: channels-last, sliced and broadcast (stride 0) inputs
    x, F, y, sigma = edm_inputs((4, 3, 5, 6))
    xs = x.to(memory_format=torch.channels_last)
    Fs = torch.cat([F, F], dim=3)[..., ::2]
    ys = y[:, :1].expand_as(y)
    ss = torch.stack([sigma, sigma], 1)[:, 0]
    assert not (xs.is_contiguous() or Fs.is_contiguous() or ys.is_contiguous() or ss.is_contiguous())
    close(ops.edm_scale_input(xs, ss), ops.ref_edm_scale_input(xs, ss), torch.float32)
    close(ops.edm_denoise(xs, Fs, ss), ops.ref_edm_denoise(xs, Fs, ss), torch.float32)
    close(ops.edm_loss(xs, Fs, ys, ss), ops.ref_edm_loss(xs, Fs, ys, ss), torch.float32)
    close(ops.heun_euler(xs, Fs, 1.3, 0.9), ops.ref_heun_euler(xs, Fs, 1.3, 0.9), torch.float32)
    xp = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # same values, permuted strides
    assert not xp.is_contiguous()
    close(ops.heun_correct(xs, Fs, ys, xp, 1.3, 0.9), ops.ref_heun_correct(xs, Fs, ys, x, 1.3, 0.9),
          torch.float32)
    close(ops.heun_churn(xs, ys, 0.5, 0.7), ops.ref_heun_churn(xs, ys, 0.5, 0.7), torch.float32)


def _channels_last(*ts):
    return [t.to(memory_format=torch.channels_last) for t in ts]


def _batch_inner(t):
    """Same values, dense, but dim 0 is not outermost in memory (a sample is not one block)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_channels_last_runs_in_storage_order(dtype):
    """Inputs sharing a dense layout (channels_last) are used as they are and the outputs keep it:
    the kernels run over memory order. Values and gradients agree with the references."""
    x, F, y, sigma = edm_inputs((4, 3, 5, 6), dtype, seed=11)
    xc, Fc, yc = _channels_last(x, F, y)
    cl = torch.channels_last
    for got, want in ((ops.edm_scale_input(xc, sigma), ops.ref_edm_scale_input(x, sigma)),
                      (ops.edm_denoise(xc, Fc, sigma), ops.ref_edm_denoise(x, F, sigma))):
        assert got.is_contiguous(memory_format=cl) and not got.is_contiguous()
        close(got, want, dtype)
    close(ops.edm_loss(xc, Fc, yc, sigma), ops.ref_edm_loss(x, F, y, sigma), dtype)
    ins = [t.detach().clone().requires_grad_() for t in (xc, Fc, yc)]
    ref_ins = [t.detach().clone().requires_grad_() for t in (x, F, y)]
    wts = torch.linspace(0.5, 1.5, 4, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    got = torch.autograd.grad((ops.edm_loss(*ins, sigma) * wts).sum(), ins)
    want = torch.autograd.grad((ops.ref_edm_loss(*ref_ins, sigma) * wts).sum(), ref_ins)
    assert torch.ops.cedm.edm_loss_backward(wts, xc, Fc, yc, sigma, 0.5).is_contiguous(memory_format=cl)
    for a, b in zip(got, want):
        close(a, b, dtype)
    a, b, c, d = _channels_last(*heun_inputs((2, 3, 4, 5), dtype, seed=12))
    for got, want in ((ops.heun_churn(a, b, 0.5, 0.7), ops.ref_heun_churn(a, b, 0.5, 0.7)),
                      (ops.heun_euler(a, b, 1.3, 0.9), ops.ref_heun_euler(a, b, 1.3, 0.9)),
                      (ops.heun_correct(a, b, c, d, 1.3, 0.9), ops.ref_heun_correct(a, b, c, d, 1.3, 0.9))):
        assert got.is_contiguous(memory_format=cl) and not got.is_contiguous()
        close(got, want, dtype)


@needs_ext
def test_mixed_or_batch_inner_layouts_are_copied():
    """Different layouts across the inputs, or (EDM, per-sample coefficients) a dense layout whose
    samples are not blocks of memory: contiguous operands, contiguous outputs, same values."""
    x, F, y, sigma = edm_inputs((4, 3, 5, 6), seed=13)
    (xc,) = _channels_last(x)
    out = ops.edm_denoise(xc, F, sigma)  # x channels_last, F contiguous
    assert out.is_contiguous()
    close(out, ops.ref_edm_denoise(x, F, sigma), torch.float32)
    xb, Fb, yb = (_batch_inner(t) for t in (x, F, y))
    assert not xb.is_contiguous() and xb.stride() == Fb.stride()
    for got, want in ((ops.edm_scale_input(xb, sigma), ops.ref_edm_scale_input(x, sigma)),
                      (ops.edm_denoise(xb, Fb, sigma), ops.ref_edm_denoise(x, F, sigma))):
        assert got.is_contiguous()
        close(got, want, torch.float32)
    close(ops.edm_loss(xb, Fb, yb, sigma), ops.ref_edm_loss(x, F, y, sigma), torch.float32)
    # the Heun ops have no per-sample coefficients: any shared dense layout runs as it is
    got = ops.heun_euler(xb, Fb, 1.3, 0.9)
    assert got.stride() == xb.stride()
    close(got, ops.ref_heun_euler(x, F, 1.3, 0.9), torch.float32)


def _layout_samples(to_layout):
    samples = _op_samples(to_layout, edm_shape=(4, 3, 2, 3), heun_shape=(2, 3, 4, 5))
    return {name: samples[name] for name in LAYOUT_OPS}


LAYOUT_OPS = ["edm_scale_input", "edm_denoise", "edm_loss", "edm_loss_backward", "heun_churn",
              "heun_euler", "heun_correct"]
CPU_LAYOUT_OPS = CPU_OPS
LAYOUTS = {"channels_last": lambda *ts: _channels_last(*ts),
           "batch_inner": lambda *ts: [_batch_inner(t) for t in ts],
           "mixed": lambda *ts: [ts[0].to(memory_format=torch.channels_last), *ts[1:]]}


@needs_ext
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", LAYOUT_OPS + CPU_LAYOUT_OPS)
def test_opcheck_layouts(name, layout):
    """The fake kernels (cedm/ops.py) give the strides the real ones give, for every layout case."""
    samples = _op_samples(LAYOUTS[layout], edm_shape=(4, 3, 2, 3), heun_shape=(2, 3, 4, 5))
    torch.library.opcheck(getattr(torch.ops.cedm, name).default, samples[name])


@needs_ext
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_narrower_isa_kernels_match_reference(isa):
    """The portable and the AVX2 CPU kernels, forced with CEDM_CPU_ISA in a fresh process (the
    other tests run the widest copy this CPU has: AVX-512 where it has it)."""
    if isa == "avx2" and ops._EXT.cpu_isa() == "base":
        pytest.skip("this build or CPU has no AVX2 copy")
    code = r"""
import sys, torch
sys.path.insert(0, "tests")
from cedm import ops
from test_ops import temi_inputs, edm_inputs, heun_inputs, temi_fwd_bwd, close, gn_inputs, gn_fwd_bwd
assert ops._EXT.cpu_isa() == sys.argv[1], ops._EXT.cpu_isa()
for dtype in (torch.float32, torch.bfloat16):
    z, qt, prior = temi_inputs(3, 5, 37, dtype)
    w = torch.tensor([1.0, 0.5, 2.0])
    for a, b in zip(temi_fwd_bwd(ops.temi_loss, z, qt, prior, w), temi_fwd_bwd(ops.ref_temi_loss, z, qt, prior, w)):
        close(a, b, dtype)
    x, F, y, s = edm_inputs((3, 3, 7, 5), dtype)
    close(ops.edm_scale_input(x, s), ops.ref_edm_scale_input(x, s), dtype)
    close(ops.edm_denoise(x, F, s), ops.ref_edm_denoise(x, F, s), dtype)
    close(ops.edm_loss(x, F, y, s), ops.ref_edm_loss(x, F, y, s), dtype)
    a, b, c, d = heun_inputs((3, 37), dtype)
    close(ops.heun_churn(a, b, 0.5, 0.7), ops.ref_heun_churn(a, b, 0.5, 0.7), dtype)
    close(ops.heun_euler(a, b, 1.3, 0.9), ops.ref_heun_euler(a, b, 1.3, 0.9), dtype)
    close(ops.heun_correct(a, b, c, d, 1.3, 0.9), ops.ref_heun_correct(a, b, c, d, 1.3, 0.9), dtype)
    for cl in (False, True):
        x, w, bb, G = gn_inputs((2, 12, 5, 3), 4, dtype)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        dy = torch.randn(x.shape).to(dtype)
        want = gn_fwd_bwd(ops.ref_group_norm_silu, x.double(), w.double(), bb.double(), G, dy)
        for a, b in zip(gn_fwd_bwd(ops.group_norm_silu, x, w, bb, G, dy), want):
            close(a, b, dtype if a.dtype == dtype else torch.float32)
print("ok")
"""
    env = dict(os.environ, CEDM_CPU_ISA=isa, PYTHONPATH=str(ROOT))
    env.pop("CEDM_OPS", None)
    r = subprocess.run([sys.executable, "-c", code, isa], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# Clear errors naming the argument

@needs_ext
def test_temi_errors():
    z, qt, prior = temi_inputs(3, 4, 5)
    with pytest.raises(ValueError, match=r"temi_loss: student_logits must have shape \[2, H, B, C\]"):
        ops.temi_loss(z[0], qt[0], prior)
    with pytest.raises(ValueError, match=r"temi_loss: teacher_probs must have the shape of student_logits"):
        ops.temi_loss(z, qt[..., :4], prior)
    with pytest.raises(ValueError, match=r"temi_loss: prior must have shape \[H, C\] = \[3, 5\], got \[3, 4\]"):
        ops.temi_loss(z, qt, prior[:, :4])
    with pytest.raises(TypeError, match=r"temi_loss: student_logits must be float32.*got Long"):
        ops.temi_loss(z.long(), qt, prior)
    with pytest.raises(TypeError, match=r"temi_loss: teacher_probs must have the dtype of student_logits"):
        ops.temi_loss(z, qt.double(), prior)
    with pytest.raises(ValueError, match=r"temi_loss: student_temp must be > 0"):
        ops.temi_loss(z, qt, prior, GAMMA, 0.0)
    with pytest.raises(RuntimeError, match=r"temi_loss: prior must be on the device of student_logits"):
        ops.temi_loss(z, qt, prior.to("meta"))
    loss, w, lse = torch.ops.cedm.temi_loss(z, qt, prior, GAMMA, TEMP)
    with pytest.raises(ValueError, match=r"temi_loss_backward: lse must have shape \[2, 2, H, B\]"):
        torch.ops.cedm.temi_loss_backward(torch.ones(3), z, qt, prior, w, lse[0], GAMMA, TEMP)


@needs_ext
def test_edm_and_heun_errors():
    x, F, y, sigma = edm_inputs((4, 3, 2, 2))
    with pytest.raises(ValueError, match=r"edm_loss: sigma must have one noise level per sample, shape \[B\] = \[4\], got \[3\]"):
        ops.edm_loss(x, F, y, sigma[:3])
    with pytest.raises(ValueError, match=r"edm_denoise: F must have the shape of x \[4, 3, 2, 2\], got \[4, 3, 2\]"):
        ops.edm_denoise(x, F[..., 0], sigma)
    with pytest.raises(TypeError, match=r"edm_loss: y must have the dtype of x \(Float\), got Double"):
        ops.edm_loss(x, F, y.double(), sigma)
    with pytest.raises(TypeError, match=r"edm_scale_input: x must be float32.*got Int"):
        ops.edm_scale_input(x.int(), sigma)
    with pytest.raises(TypeError, match=r"edm_scale_input: sigma must be float32.*got Long"):
        ops.edm_scale_input(x, sigma.long())
    with pytest.raises(RuntimeError, match=r"edm_scale_input: sigma must be on the device of x"):
        ops.edm_scale_input(x, sigma.to("meta"))
    with pytest.raises(ValueError, match=r"heun_correct: denoised_next must have the shape of x_hat"):
        ops.heun_correct(x, F, y, y[:2], 1.3, 0.9)
    with pytest.raises(TypeError, match=r"heun_euler: denoised must have the dtype of x_hat"):
        ops.heun_euler(x, F.half(), 1.3, 0.9)
    with pytest.raises(RuntimeError, match=r"heun_churn: noise must be on the device of x"):
        ops.heun_churn(x, F.to("meta"), 0.5, 0.7)


@needs_ext
def test_group_norm_silu_errors():
    x, w, b, _ = gn_inputs((2, 6, 3, 3), 3)
    with pytest.raises(ValueError, match=r"group_norm_silu: the 6 channels of x must split into groups \(4\)"):
        ops.group_norm_silu(x, w, b, 4)
    with pytest.raises(ValueError, match=r"group_norm_silu: weight must have shape \[C\] = \[6\], got \[5\]"):
        ops.group_norm_silu(x, w[:5], b, 3)
    with pytest.raises(ValueError, match=r"group_norm_silu: x must have shape \[N, C, ...\], got \[6\]"):
        torch.ops.cedm.group_norm_silu(x[0, :, 0, 0], w, b, 3, 1e-5)
    y, mean, rstd = torch.ops.cedm.group_norm_silu(x, w, b, 3, 1e-5)
    with pytest.raises(ValueError, match=r"group_norm_silu_backward: rstd must have N \* groups = 6 values"):
        torch.ops.cedm.group_norm_silu_backward(y, x, w, b, mean, rstd[:1], 3)


# ------------------------------------------------------------------------------------------------
# torch.compile

@needs_ext
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def step(x, F, y, sigma):
        D = ops.edm_denoise(x, F, sigma, 0.5)
        x_next = ops.heun_euler(x, D, 1.3, 0.9)
        return x_next, ops.edm_loss(x, F, y, sigma, 0.5)

    x, F, y, sigma = edm_inputs((3, 2, 4, 4))
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(x, F, y, sigma), step(x, F, y, sigma)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# CUDA (skipped, visibly, where no device exists; `make gpu-check` runs them on a GPU machine)

def needs_cuda(f):
    f = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(f)
    return needs_ext(pytest.mark.cuda(f))


def _to_cuda(args):
    return tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)


def _check_compiled_with_cuda():
    assert ops._EXT.has_cuda(), "cedm._C was built without the CUDA kernels (nvcc not found?)"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    _check_compiled_with_cuda()
    dev = "cuda"
    z, qt, prior = temi_inputs(3, 7, 300, dtype)
    w = torch.tensor([1.0, 0.5, 2.0])
    got = temi_fwd_bwd(ops.temi_loss, z.to(dev), qt.to(dev), prior.to(dev), w.to(dev))
    want = temi_fwd_bwd(ops.ref_temi_loss, z, qt, prior, w)
    for a, b in zip(got, want):
        close(a.cpu(), b, dtype)
    x, F, y, s = edm_inputs((5, 3, 8, 8), dtype)
    xd, Fd, yd, sd = (t.to(dev) for t in (x, F, y, s))
    close(ops.edm_scale_input(xd, sd).cpu(), ops.ref_edm_scale_input(x, s), dtype)
    close(ops.edm_denoise(xd, Fd, sd).cpu(), ops.ref_edm_denoise(x, F, s), dtype)
    close(ops.edm_loss(xd, Fd, yd, sd).cpu(), ops.ref_edm_loss(x, F, y, s), dtype)
    Fg = Fd.clone().requires_grad_()
    (gF,) = torch.autograd.grad(ops.edm_loss(xd, Fg, yd, sd).sum(), Fg)
    Fr = F.clone().requires_grad_()
    (rF,) = torch.autograd.grad(ops.ref_edm_loss(x, Fr, y, s).sum(), Fr)
    close(gF.cpu(), rF, dtype)
    a, b, c, d = heun_inputs((5, 3, 8, 8), dtype)
    ad, bd, cd, dd = (t.to(dev) for t in (a, b, c, d))
    close(ops.heun_churn(ad, bd, 0.5, 0.7).cpu(), ops.ref_heun_churn(a, b, 0.5, 0.7), dtype)
    close(ops.heun_euler(ad, bd, 1.3, 0.9).cpu(), ops.ref_heun_euler(a, b, 1.3, 0.9), dtype)
    close(ops.heun_correct(ad, bd, cd, dd, 1.3, 0.9).cpu(), ops.ref_heun_correct(a, b, c, d, 1.3, 0.9), dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,B,C", [(2, 5, 1), (3, 7, 13), (4, 3, 1000), (50, 64, 100)])
def test_cuda_temi_matches_cpu_kernels(H, B, C, dtype):
    """CUDA against the CPU kernels, both directions of the TEMI loss, across the row-block edge
    cases (C below, at and far above the 128 threads of a row block)."""
    _check_compiled_with_cuda()
    z, qt, prior = temi_inputs(H, B, C, dtype, seed=H + B + C)
    w = torch.linspace(0.5, 2.0, H)
    got = temi_fwd_bwd(ops.temi_loss, z.cuda(), qt.cuda(), prior.cuda(), w.cuda())
    want = temi_fwd_bwd(ops.temi_loss, z, qt, prior, w)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        close(a.cpu(), b, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (7, 13), (3, 2, 5, 7), (16, 3, 32, 32)])
def test_cuda_edm_heun_match_cpu_kernels(shape, dtype):
    _check_compiled_with_cuda()
    x, F, y, s = edm_inputs(shape, dtype, seed=len(shape))
    dev = lambda *ts: [t.cuda() for t in ts]  # noqa: E731
    xd, Fd, yd, sd = dev(x, F, y, s)
    close(ops.edm_scale_input(xd, sd).cpu(), ops.edm_scale_input(x, s), dtype)
    close(ops.edm_denoise(xd, Fd, sd).cpu(), ops.edm_denoise(x, F, s), dtype)
    close(ops.edm_loss(xd, Fd, yd, sd).cpu(), ops.edm_loss(x, F, y, s), dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wts = torch.linspace(0.5, 1.5, shape[0], dtype=acc)
    grads = []
    for ts, wv in (((xd, Fd, yd, sd), wts.cuda()), ((x, F, y, s), wts)):
        ins = [t.detach().clone().requires_grad_() for t in ts]
        grads.append(torch.autograd.grad((ops.edm_loss(*ins, 0.5) * wv).sum(), ins))
    for a, b in zip(*grads):
        assert a.dtype == b.dtype
        close(a.cpu(), b, dtype)
    h = heun_inputs(shape, dtype, seed=7)
    hd = dev(*h)
    close(ops.heun_churn(hd[0], hd[1], 0.5, 0.7, 1.007).cpu(), ops.heun_churn(h[0], h[1], 0.5, 0.7, 1.007), dtype)
    close(ops.heun_euler(hd[0], hd[1], 1.3, 0.9).cpu(), ops.heun_euler(h[0], h[1], 1.3, 0.9), dtype)
    close(ops.heun_correct(*hd, 1.3, 0.9).cpu(), ops.heun_correct(*h, 1.3, 0.9), dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_channels_last(dtype):
    """channels_last CUDA tensors: no copy (the outputs keep the layout), the CPU reference's values."""
    _check_compiled_with_cuda()
    x, F, y, s = edm_inputs((8, 3, 16, 16), dtype, seed=21)
    xc, Fc, yc = (t.cuda() for t in _channels_last(x, F, y))
    sd, cl = s.cuda(), torch.channels_last
    for got, want in ((ops.edm_scale_input(xc, sd), ops.ref_edm_scale_input(x, s)),
                      (ops.edm_denoise(xc, Fc, sd), ops.ref_edm_denoise(x, F, s)),
                      (ops.heun_euler(xc, Fc, 1.3, 0.9), ops.ref_heun_euler(x, F, 1.3, 0.9)),
                      (ops.heun_correct(xc, Fc, yc, xc, 1.3, 0.9), ops.ref_heun_correct(x, F, y, x, 1.3, 0.9)),
                      (ops.heun_churn(xc, Fc, 0.5, 0.7), ops.ref_heun_churn(x, F, 0.5, 0.7))):
        assert got.is_contiguous(memory_format=cl) and not got.is_contiguous()
        close(got.cpu(), want, dtype)
    close(ops.edm_loss(xc, Fc, yc, sd).cpu(), ops.ref_edm_loss(x, F, y, s), dtype)
    Fg = Fc.detach().clone().requires_grad_()
    (gF,) = torch.autograd.grad(ops.edm_loss(xc, Fg, yc, sd).sum(), Fg)
    Fr = F.clone().requires_grad_()
    (rF,) = torch.autograd.grad(ops.ref_edm_loss(x, Fr, y, s).sum(), Fr)
    assert gF.is_contiguous(memory_format=cl)
    close(gF.cpu(), rF, dtype)


@needs_cuda
@pytest.mark.parametrize("name", OPS)
def test_cuda_opcheck(name):
    _check_compiled_with_cuda()
    torch.library.opcheck(getattr(torch.ops.cedm, name).default, _to_cuda(_op_samples()[name]))


@needs_cuda
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", LAYOUT_OPS)
def test_cuda_opcheck_layouts(name, layout):
    _check_compiled_with_cuda()
    torch.library.opcheck(getattr(torch.ops.cedm, name).default,
                          _to_cuda(_layout_samples(LAYOUTS[layout])[name]))


@needs_cuda
def test_cuda_device_errors():
    _check_compiled_with_cuda()
    x, F, y, sigma = edm_inputs((4, 3, 2, 2))
    with pytest.raises(RuntimeError, match=r"edm_loss: F must be on the device of x"):
        ops.edm_loss(x.cuda(), F, y.cuda(), sigma.cuda())
    z, qt, prior = temi_inputs(3, 4, 5)
    with pytest.raises(RuntimeError, match=r"temi_loss: prior must be on the device of student_logits"):
        ops.temi_loss(z.cuda(), qt.cuda(), prior)
    with pytest.raises(RuntimeError, match=r"heun_euler: denoised must be on the device of x_hat"):
        ops.heun_euler(x.cuda(), F, 1.3, 0.9)
