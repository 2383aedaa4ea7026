"""Image-quality metrics of the benchmark: PSNR and SSIM against a reference image, and the Fréchet
distance between two sets of evaluator features.

Images are uint8 arrays (N, H, W, 3), as the embedded pipeline returns them; per-image metrics
return one value per image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Two image batches as float64 (N, 3, H, W) tensors, after checking they match."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected two image batches of the same shape (N, H, W, 3); got {a.shape} and {b.shape}")
    to_tensor = lambda x: torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)  # noqa: E731
    return to_tensor(a), to_tensor(b)


def psnr(images: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image: ``10 log10(range^2 / MSE)``; inf for identical images."""
    a, b = _pair(images, reference)
    mse = (a - b).pow(2).flatten(1).mean(1).numpy()
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian window (size, size), float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(images: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Structural similarity per image (Wang et al. 2004) of uint8 batches; see :func:`ssim_tensor`."""
    return ssim_tensor(*_pair(images, reference), data_range=data_range).numpy()


def ssim_tensor(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Structural similarity per image of two float batches (N, C, H, W): local means, variances and
    covariance under a Gaussian window (valid positions only), SSIM map averaged over positions and
    channels. 1 for identical images."""
    channels = a.shape[1]
    window = gaussian_window().to(a.device, a.dtype).expand(channels, 1, -1, -1)
    if min(a.shape[-2:]) < window.shape[-1]:
        raise ValueError(f"images of {tuple(a.shape[-2:])} are smaller than the {window.shape[-1]}-pixel SSIM window")
    blur = lambda x: F.conv2d(x, window, groups=channels)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.

    The matrix square root's trace is taken as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix ``S_a^(1/2) S_b S_a^(1/2)`` (which has the same spectrum as ``S_a S_b``),
    so no scipy is needed and tiny negative eigenvalues from rounding are clipped to 0.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected feature sets (N, D) and (M, D); got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set (for a covariance)")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    cross_trace = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross_trace
    return float(max(distance, 0.0))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
