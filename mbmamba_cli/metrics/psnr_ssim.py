"""PSNR and SSIM on images in [0, 1], computed in float64 with NumPy and OpenCV.

Both metrics follow the definitions that scikit-image 0.26 implements in
`skimage.metrics.peak_signal_noise_ratio` and `structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)`, and
`tests/test_metrics.py` checks them against it to 0.01 dB and 0.001. The package does not import
scikit-image, which is a development dependency only.

SSIM (Wang et al. 2004): an 11x11 Gaussian window (sigma 1.5, truncated to 11 taps), population
variances, K1 = 0.01, K2 = 0.03, data range 1. The SSIM map is averaged after cropping 5 pixels
(the window radius) from each side, then averaged over channels. An optional mask (1 = valid)
turns both means into mask-weighted means, which the RealBlur protocol uses.

Shapes: images are (h, w) or (h, w, c); a mask has the same shape as the images.
"""

import cv2
import numpy as np

DATA_RANGE = 1.0
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# The SSIM map is averaged only where the whole window lies inside the image.
SSIM_CROP = (SSIM_WINDOW - 1) // 2


def to_unit_float64(image: np.ndarray) -> np.ndarray:
    """Scale an image to float64 in [0, 1] from its dtype: uint8 / 255, uint16 / 65535.

    Float images are taken to be in [0, 1] already and are only converted to float64.
    """
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float64) / 65535.0
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float64, copy=False)
    raise TypeError(f"unsupported image dtype {image.dtype}: expected uint8, uint16 or float in [0, 1]")


def _check_pair(restored: np.ndarray, reference: np.ndarray, mask: np.ndarray | None) -> None:
    """Raise ValueError when the two images (and the mask) cannot be compared."""
    if restored.shape != reference.shape:
        raise ValueError(f"image sizes differ: restored {restored.shape} vs reference {reference.shape}")
    if restored.ndim not in (2, 3):
        raise ValueError(f"expected an (h, w) or (h, w, c) image, got shape {restored.shape}")
    if mask is not None and mask.shape != reference.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {reference.shape}")


def psnr(restored: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Compute PSNR in dB with data range 1: 10 log10(1 / MSE).

    Args:
        restored: (h, w) or (h, w, c) image in [0, 1].
        reference: ground truth of the same shape.
        mask: optional weights of the same shape (1 = valid); the MSE is then the masked sum of
            squared errors divided by the sum of the mask.

    Returns:
        PSNR in dB; `inf` when the images are identical (on the mask).
    """
    _check_pair(restored, reference, mask)
    error = (to_unit_float64(restored) - to_unit_float64(reference)) ** 2

    if mask is None:
        mse = float(np.mean(error, dtype=np.float64))
    else:
        weights = mask.astype(np.float64)
        total = float(weights.sum())
        if total <= 0:
            raise ValueError("the mask has no valid pixels, so PSNR is undefined")
        mse = float(np.sum(error * weights, dtype=np.float64) / total)

    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(DATA_RANGE**2 / mse))


def _gaussian_filter(plane: np.ndarray) -> np.ndarray:
    """Filter one (h, w) float64 plane with the normalised 11x11 Gaussian window (sigma 1.5).

    The border mode (reflect, as scikit-image uses) only affects the band that SSIM crops.
    """
    kernel = cv2.getGaussianKernel(SSIM_WINDOW, SSIM_SIGMA, ktype=cv2.CV_64F)
    return cv2.sepFilter2D(plane, cv2.CV_64F, kernel, kernel, borderType=cv2.BORDER_REFLECT)


def ssim_map(restored: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Compute the per-pixel SSIM map of every channel.

    Args:
        restored: (h, w) or (h, w, c) image in [0, 1], with h, w >= 11.
        reference: ground truth of the same shape.

    Returns:
        float64 map of the input's shape; the outer 5 pixels are affected by border reflection.
    """
    _check_pair(restored, reference, None)
    height, width = reference.shape[:2]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(
            f"image of {width}x{height} pixels is smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} "
            "SSIM window; SSIM needs both sides to be at least 11 pixels"
        )

    x = to_unit_float64(restored)
    y = to_unit_float64(reference)
    if x.ndim == 2:
        x = x[:, :, None]
        y = y[:, :, None]

    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    maps = np.empty(x.shape, dtype=np.float64)
    for channel in range(x.shape[2]):
        xc = np.ascontiguousarray(x[:, :, channel])
        yc = np.ascontiguousarray(y[:, :, channel])

        mean_x = _gaussian_filter(xc)
        mean_y = _gaussian_filter(yc)
        var_x = _gaussian_filter(xc * xc) - mean_x * mean_x
        var_y = _gaussian_filter(yc * yc) - mean_y * mean_y
        cov_xy = _gaussian_filter(xc * yc) - mean_x * mean_y

        numerator = (2.0 * mean_x * mean_y + c1) * (2.0 * cov_xy + c2)
        denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
        maps[:, :, channel] = numerator / denominator

    if restored.ndim == 2:
        return maps[:, :, 0]
    return maps


def ssim(restored: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Compute mean SSIM: the map cropped by 5 pixels per side, averaged per channel, then over channels.

    Args:
        restored: (h, w) or (h, w, c) image in [0, 1], with h, w >= 11.
        reference: ground truth of the same shape.
        mask: optional weights of the same shape (1 = valid); each channel's mean is then the
            mask-weighted mean over the cropped map.

    Returns:
        SSIM in [-1, 1]; 1 for identical images.
    """
    _check_pair(restored, reference, mask)
    maps = ssim_map(restored, reference)
    if maps.ndim == 2:
        maps = maps[:, :, None]
        mask = None if mask is None else mask[:, :, None]

    crop = (slice(SSIM_CROP, -SSIM_CROP), slice(SSIM_CROP, -SSIM_CROP))
    cropped = maps[crop]
    if mask is None:
        per_channel = cropped.mean(axis=(0, 1), dtype=np.float64)
    else:
        weights = mask.astype(np.float64)[crop]
        totals = weights.sum(axis=(0, 1))
        if np.any(totals <= 0):
            raise ValueError("the mask has no valid pixels inside the SSIM crop")
        per_channel = (cropped * weights).sum(axis=(0, 1)) / totals

    return float(per_channel.mean())
