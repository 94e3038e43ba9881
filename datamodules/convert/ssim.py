"""SSIM (Wang, Bovik, Sheikh and Simoncelli 2004) on grayscale images, in numpy.

The paper's Gaussian form: an 11-tap window with σ = 1.5 (truncated at 3.5σ, as scikit-image's
``structural_similarity(gaussian_weights=True)``), population (not sample) variances, K1 = 0.01, K2 = 0.03,
the SSIM map over the valid region only (no padding) and its mean. Images smaller than 11 px shrink the window.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

K1, K2 = 0.01, 0.03
SIGMA = 1.5
RADIUS = 5  # int(3.5 * SIGMA + 0.5)


def gaussian_window(radius: int = RADIUS, sigma: float = SIGMA) -> np.ndarray:
    """(2 * radius + 1,) weights summing to 1."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(image: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable weighted mean over every full window: (H, W) → (H - k + 1, W - k + 1)."""
    k = len(g)
    rows = sliding_window_view(image, k, axis=0) @ g  # (H - k + 1, W)
    return sliding_window_view(rows, k, axis=1) @ g


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM of two (H, W) grayscale images with values in [0, ``data_range``]; 1.0 for identical images."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"ssim needs two 2-D images of one shape, got {x.shape} and {y.shape}")
    x, y = x.astype(np.float64, copy=False), y.astype(np.float64, copy=False)
    g = gaussian_window(min(RADIUS, (min(x.shape) - 1) // 2))
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    var_x = _filter(x * x, g) - mu_x**2
    var_y = _filter(y * y, g) - mu_y**2
    cov = _filter(x * y, g) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())
