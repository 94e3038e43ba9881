"""Image metrics that need no weights: per-image L1, PSNR and SSIM on ``(B, 3, H, W)`` tensors in ``[0, 1]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def l1(pred: Tensor, target: Tensor) -> Tensor:
    """``(B,)`` mean absolute error."""
    return (pred - target).abs().flatten(1).mean(1)


def psnr(pred: Tensor, target: Tensor, max_db: float = 100.0) -> Tensor:
    """``(B,)`` peak signal-to-noise ratio in dB for a data range of 1; identical images give ``max_db``."""
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return (-10 * torch.log10(mse.clamp(min=10 ** (-max_db / 10)))).clamp(max=max_db)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(pred: Tensor, target: Tensor, window: int = 7, sigma: float = 1.5) -> Tensor:
    """``(B,)`` structural similarity (Wang et al. 2004), Gaussian window, data range 1, valid region only.

    A 7-px window (not the usual 11) because sprite images are 32×32.
    """
    c1, c2 = 0.01**2, 0.03**2
    channels = pred.shape[1]
    w = _gaussian_window(window, sigma, channels, pred.device, pred.dtype)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=channels)

    mu_p, mu_t = blur(pred), blur(target)
    var_p = blur(pred * pred) - mu_p**2
    var_t = blur(target * target) - mu_t**2
    cov = blur(pred * target) - mu_p * mu_t
    s = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return s.flatten(1).mean(1)


def image_metrics(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Per-image ``fwm_l1``, ``fwm_psnr``, ``fwm_ssim``, each ``(B,)``."""
    pred, target = pred.float().clamp(0, 1), target.float()
    return {"fwm_l1": l1(pred, target), "fwm_psnr": psnr(pred, target), "fwm_ssim": ssim(pred, target)}
