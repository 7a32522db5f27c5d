"""The RealBlur scoring protocol: intensity matching, ECC alignment, then masked PSNR and SSIM.

RealBlur (Rim et al., ECCV 2020) ground truth is not pixel-aligned with the blurred capture, so
its evaluation first matches the restored image to the ground truth:

1. Intensity matching: the restored image z is scaled by the least-squares factor
   a = sum(x z) / sum(z z) toward the ground truth x. This is a scale only, with no offset, as in
   the RealBlur evaluation; the scaled image is not clipped.
2. Alignment: `cv2.findTransformECC` with MOTION_HOMOGRAPHY estimates the homography from the
   grayscale ground truth (template) to the grayscale scaled image, 100 iterations. Every channel
   of the scaled image is warped onto the ground truth grid with bicubic interpolation and
   reflected borders, and an all-ones image warped with nearest-neighbour interpolation and zero
   borders gives the validity mask.
3. Scores: both images are multiplied by the mask. PSNR uses the masked MSE (the sum of squared
   errors over the sum of the mask). SSIM is the mask-weighted mean of the SSIM map inside the
   usual 5-pixel crop, averaged over channels.

Everything after the ECC estimate (which OpenCV runs in float32) is float64.
Shapes: images are (h, w) or (h, w, c) with c = 3, values in [0, 1].
"""

from dataclasses import dataclass

import cv2
import numpy as np

from mbmamba_cli.log import get_logger
from mbmamba_cli.metrics.psnr_ssim import psnr, ssim, to_unit_float64

log = get_logger(__name__)

ECC_ITERATIONS = 100
ECC_GAUSSIAN_SIZE = 5


@dataclass(frozen=True)
class Alignment:
    """The restored image after intensity matching and ECC alignment to the ground truth.

    `warped` and `mask` have the ground truth's shape; `homography` is the 3x3 matrix that maps
    ground-truth pixel coordinates to restored-image coordinates.
    """

    warped: np.ndarray
    mask: np.ndarray
    homography: np.ndarray
    intensity_scale: float
    ecc_converged: bool


@dataclass(frozen=True)
class RealBlurScores:
    """PSNR (dB) and SSIM under the RealBlur protocol, with the alignment that produced them."""

    psnr: float
    ssim: float
    intensity_scale: float
    ecc_converged: bool
    valid_fraction: float
    homography: np.ndarray


def match_intensity(restored: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float]:
    """Scale `restored` by the least-squares factor toward `reference`.

    Returns:
        (scaled image, factor); the factor is 1 when the restored image is all zero.
    """
    z = to_unit_float64(restored)
    x = to_unit_float64(reference)
    energy = float(np.sum(z * z, dtype=np.float64))
    if energy == 0.0:
        return z.copy(), 1.0
    factor = float(np.sum(x * z, dtype=np.float64)) / energy
    return z * factor, factor


def _grayscale_float32(image: np.ndarray) -> np.ndarray:
    """Convert an (h, w) or (h, w, 3) RGB image to an (h, w) float32 plane for ECC."""
    plane = image.astype(np.float32)
    if plane.ndim == 3:
        plane = cv2.cvtColor(plane, cv2.COLOR_RGB2GRAY)
    return plane


def align_ecc(restored: np.ndarray, reference: np.ndarray, name: str = "") -> Alignment:
    """Match the intensity of `restored` to `reference` and warp it onto the reference grid.

    When ECC fails to converge (OpenCV raises, for example on uncorrelated images) the identity
    homography is used, a warning names the image, and `ecc_converged` is False.

    Args:
        restored: (h, w) or (h, w, 3) restored image in [0, 1].
        reference: ground truth of the same shape.
        name: the pair's name, used in the warning.
    """
    if restored.shape != reference.shape:
        raise ValueError(f"image sizes differ: restored {restored.shape} vs reference {reference.shape}")
    scaled, factor = match_intensity(restored, reference)
    height, width = reference.shape[:2]

    homography = np.eye(3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ECC_ITERATIONS, 0.0)
    converged = True
    try:
        _, homography = cv2.findTransformECC(
            _grayscale_float32(to_unit_float64(reference)),
            _grayscale_float32(scaled),
            homography,
            cv2.MOTION_HOMOGRAPHY,
            criteria,
            None,
            ECC_GAUSSIAN_SIZE,
        )
    except cv2.error as error:
        converged = False
        homography = np.eye(3, dtype=np.float32)
        log.warning(
            "ECC alignment failed for %s, scoring it unaligned: %s",
            name or "an image",
            str(error).strip().splitlines()[-1],
        )

    matrix = homography.astype(np.float64)
    flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
    warped = cv2.warpPerspective(scaled, matrix, (width, height), flags=flags, borderMode=cv2.BORDER_REFLECT)
    mask = cv2.warpPerspective(
        np.ones_like(scaled),
        matrix,
        (width, height),
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )

    # OpenCV drops a trailing channel axis of size 1; keep the input's shape.
    warped = warped.reshape(reference.shape)
    mask = mask.reshape(reference.shape)
    return Alignment(warped, mask, matrix, factor, converged)


def realblur_scores(restored: np.ndarray, reference: np.ndarray, name: str = "") -> RealBlurScores:
    """Score `restored` against `reference` under the RealBlur protocol.

    Args:
        restored: (h, w) or (h, w, 3) image in [0, 1], h, w >= 11.
        reference: ground truth of the same shape.
        name: the pair's name, used in warnings.
    """
    alignment = align_ecc(restored, reference, name)
    mask = alignment.mask
    warped = alignment.warped * mask
    target = to_unit_float64(reference) * mask

    return RealBlurScores(
        psnr=psnr(warped, target, mask),
        ssim=ssim(warped, target, mask),
        intensity_scale=alignment.intensity_scale,
        ecc_converged=alignment.ecc_converged,
        valid_fraction=float(mask.mean()),
        homography=alignment.homography,
    )
