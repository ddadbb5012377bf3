"""The EDM training loss (Karras et al. 2022, Sec. 5 and Table 1; docs/method.md#edm-loss).

ln sigma ~ N(P_mean, P_std^2); x = y + sigma n; loss = lambda(sigma) ||D(x; sigma) - y||^2 with
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, computed by the fused op from
the raw network output F (the preconditioning is folded into it), summed over pixels.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from cedm import ops

P_MEAN = -1.2        # EDM Table 1: ln sigma ~ N(P_mean, P_std^2)
P_STD = 1.2
SIGMA_DATA = 0.5     # EDM Table 1: the data standard deviation sigma_data


@dataclass(frozen=True)
class EDMLoss:
    P_mean: float = P_MEAN
    P_std: float = P_STD
    sigma_data: float = SIGMA_DATA

    def sigma(self, normal: torch.Tensor) -> torch.Tensor:
        """sigma = exp(P_mean + P_std z) from standard normal draws z."""
        return (normal * self.P_std + self.P_mean).exp()

    def __call__(self, net, y, sigma, noise, labels=None, augment_labels=None,
                 autocast=contextlib.nullcontext()) -> torch.Tensor:
        """Per-sample loss [B] of `net` (EDMPrecond, return_F) on clean images y [B,C,H,W]."""
        x = y + noise * sigma[:, None, None, None]     # x = y + sigma n (in y's memory format)
        with autocast:
            F = net(x, sigma, labels, augment_labels, return_F=True)
        return ops.edm_loss(x, F, y, sigma, self.sigma_data)                  # lambda ||D - y||^2
