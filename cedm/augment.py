"""EDM geometric augmentation with the 9-dimensional augmentation labels (EDM's non-leaking
augmentation; docs/method.md#edm-training).

After NVlabs/edm `training/augment.py` with the CIFAR/FFHQ settings (xflip, yflip, scale,
rotate_frac, aniso, translate_frac, each applied with probability p). The network is told what
was done through `augment_labels` [N, 9] = (xflip, yflip, scale, cos(rot)-1, sin(rot),
aniso*cos, aniso*sin, tx, ty), and is run with zero labels at sampling time.

Differences from EDM, both to make an image's result independent of the batch it is in
(needed for DDP == one process and per-sample determinism):
  - every random number comes from the `generator` passed in, drawn for the whole batch in a
    fixed order, so slicing a global batch gives each rank exactly its samples' draws;
  - the reflect padding is the largest allowed (size-1 per side) instead of a batch-dependent
    margin, and only images with a non-identity geometric transform are resampled (the others
    are passed through untouched, where EDM filters them through the up/down sampling).
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Symlet-6 low-pass filter (orthonormal, 6 vanishing moments); the resampling filter of EDM/ADA.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
AUGMENT_DIM = 9


def _mat(*rows, device=None):
    """Stack rows of scalars/[N] tensors into [N,3,3] (or [3,3] when all are scalars)."""
    elems = [x for r in rows for x in r]
    ref = next((x for x in elems if isinstance(x, torch.Tensor) and x.ndim > 0), None)
    if ref is None:
        return torch.tensor(rows, dtype=torch.float32, device=device)
    elems = [x if isinstance(x, torch.Tensor) else torch.full_like(ref, float(x)) for x in elems]
    return torch.stack(elems, dim=-1).reshape(ref.shape[0], len(rows), -1)


def _translate_inv(tx, ty):
    return _mat([1, 0, -tx], [0, 1, -ty], [0, 0, 1])


def _scale_inv(sx, sy):
    return _mat([1 / sx, 0, 0], [0, 1 / sy, 0], [0, 0, 1])


def _rotate_inv(a):
    return _mat([torch.cos(a), torch.sin(a), 0], [-torch.sin(a), torch.cos(a), 0], [0, 0, 1])


class AugmentPipe:
    """EDM AugmentPipe(p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)."""

    def __init__(self, p: float = 0.12, xflip: float = 1e8, yflip: float = 1, scale: float = 1,
                 rotate_frac: float = 1, aniso: float = 1, translate_frac: float = 1,
                 scale_std: float = 0.2, rotate_frac_max: float = 1, aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125):
        self.p = float(p)
        self.xflip, self.yflip, self.scale, self.rotate_frac = xflip, yflip, scale, rotate_frac
        self.aniso, self.translate_frac = aniso, translate_frac
        self.scale_std, self.rotate_frac_max, self.aniso_std = scale_std, rotate_frac_max, aniso_std
        self.aniso_rotate_prob, self.translate_frac_std = aniso_rotate_prob, translate_frac_std

    def draw(self, n: int, generator: torch.Generator | None = None) -> dict:
        """All random parameters for n images, in a fixed order (slice rows to split a batch)."""
        g = dict(generator=generator)
        P = self.p

        def gate(prob, *shape):
            return torch.rand(*shape, n, **g) < prob * P

        return dict(
            xflip=torch.randint(2, (n,), **g) * gate(self.xflip),
            yflip=torch.randint(2, (n,), **g) * gate(self.yflip),
            scale=torch.randn(n, **g) * gate(self.scale),
            rotate=(torch.rand(n, **g) * 2 - 1) * (math.pi * self.rotate_frac_max) * gate(self.rotate_frac),
            aniso=torch.randn(n, **g) * gate(self.aniso),
            aniso_r=(torch.rand(n, **g) * 2 - 1) * math.pi * (torch.rand(n, **g) < self.aniso_rotate_prob),
            translate=torch.randn(2, n, **g) * gate(self.translate_frac, 1),
        )

    @staticmethod
    def slice(params: dict, start: int, stop: int) -> dict:
        return {k: (v[..., start:stop]) for k, v in params.items()}

    def __call__(self, images: torch.Tensor, params: dict):
        """images [N,C,H,W] float -> (augmented images, augment_labels [N,9] float32)."""
        N, C, H, W = images.shape
        dev = images.device
        prm = {k: v.to(dev) for k, v in params.items()}

        # Pixel blitting: flips.
        xf, yf = prm["xflip"].bool(), prm["yflip"].bool()
        images = torch.where(xf[:, None, None, None], images.flip(3), images)
        images = torch.where(yf[:, None, None, None], images.flip(2), images)

        # Geometric transformations, composed as an inverse matrix G_inv [N,3,3].
        G_inv = torch.eye(3, device=dev).repeat(N, 1, 1)
        s = torch.exp2(prm["scale"] * self.scale_std)
        G_inv = G_inv @ _scale_inv(s, s)                                            # isotropic scale
        rot = prm["rotate"]
        G_inv = G_inv @ _rotate_inv(-rot)                                           # rotation
        w, r = prm["aniso"], prm["aniso_r"]
        sa = torch.exp2(w * self.aniso_std)
        G_inv = G_inv @ _rotate_inv(r) @ _scale_inv(sa, 1 / sa) @ _rotate_inv(-r)   # anisotropic scale
        t = prm["translate"]
        G_inv = G_inv @ _translate_inv(t[0] * (W * self.translate_frac_std),
                                       t[1] * (H * self.translate_frac_std))       # translation

        labels = torch.stack([xf.float(), yf.float(), prm["scale"], rot.cos() - 1, rot.sin(),
                              w * r.cos(), w * r.sin(), t[0], t[1]], dim=1).to(torch.float32)

        moved = (prm["scale"] != 0) | (rot != 0) | (w != 0) | (t != 0).any(0)
        if bool(moved.any()):
            idx = moved.nonzero().flatten()
            images = images.clone()
            images[idx] = self._warp(images[idx], G_inv[idx])
        return images, labels

    @staticmethod
    def _warp(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
        """Resample images by G_inv: reflect-pad, 2x sym6 upsample, bilinear warp, sym6 downsample."""
        N, C, H, W = images.shape
        dev, dt = images.device, images.dtype
        Hz = np.asarray(SYM6, dtype=np.float32)
        Hz_pad = len(Hz) // 4
        mx, my = W - 1, H - 1                      # largest reflect padding: batch-independent
        images = torch.nn.functional.pad(images, [mx, mx, my, my], mode="reflect")

        # Upsample 2x (zero-stuff then separable sym6).
        w = torch.as_tensor(Hz[None, None, ::-1].copy(), dtype=dt, device=dev).tile([C, 1, 1])
        pad = (len(Hz) + 1) // 2
        images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
        images = torch.nn.functional.conv2d(images, w.unsqueeze(2), groups=C, padding=[0, pad])
        images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
        images = torch.nn.functional.conv2d(images, w.unsqueeze(3), groups=C, padding=[pad, 0])
        S2 = torch.tensor([[2.0, 0, 0], [0, 2, 0], [0, 0, 1]], device=dev)
        T = torch.tensor([[1.0, 0, -0.5], [0, 1, -0.5], [0, 0, 1]], device=dev)
        G_inv = S2 @ G_inv @ torch.linalg.inv(S2)
        G_inv = T @ G_inv @ torch.linalg.inv(T)

        # Warp with bilinear sampling in normalised coordinates.
        shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
        A = torch.tensor([[2.0 / images.shape[3], 0, 0], [0, 2.0 / images.shape[2], 0], [0, 0, 1]], device=dev)
        B = torch.tensor([[shape[3] / 2.0, 0, 0], [0, shape[2] / 2.0, 0], [0, 0, 1]], device=dev)
        G_inv = A @ G_inv @ B
        grid = torch.nn.functional.affine_grid(G_inv[:, :2, :].to(dt), size=shape, align_corners=False)
        images = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                                                 align_corners=False)

        # Downsample 2x (separable sym6, stride 2) and crop the filter margin.
        w = torch.as_tensor(Hz[None, None, :], dtype=dt, device=dev).tile([C, 1, 1])
        pad = (len(Hz) - 1) // 2
        images = torch.nn.functional.conv2d(images, w.unsqueeze(2), groups=C, stride=[1, 2],
                                            padding=[0, pad])[:, :, :, Hz_pad:-Hz_pad]
        images = torch.nn.functional.conv2d(images, w.unsqueeze(3), groups=C, stride=[2, 1],
                                            padding=[pad, 0])[:, :, Hz_pad:-Hz_pad, :]
        return images
