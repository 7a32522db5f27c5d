"""Named scoring protocols: which pixels are compared and how, stated in every report.

- `gopro`: RGB, full frame (crop 0), PSNR and SSIM on the images as they are. Used for GoPro and
  HIDE.
- `realblur`: least-squares intensity scale, ECC homography alignment to the ground truth,
  masked PSNR and SSIM (see `mbmamba_cli.metrics.realblur`). Used for RealBlur-J and RealBlur-R.

Both compute in float64 with data range 1 and the 11x11 Gaussian SSIM window (sigma 1.5), and
take the per-dataset score as the mean of the per-image scores. An alpha channel is not scored.
"""

from dataclasses import dataclass

import cv2
import numpy as np

from mbmamba_cli import __version__
from mbmamba_cli.metrics.psnr_ssim import psnr, ssim
from mbmamba_cli.metrics.realblur import realblur_scores

# Named in every report, so a score can be traced to the code and libraries that produced it.
IMPLEMENTATION = (
    f"mbmamba {__version__} metrics (NumPy {np.__version__}, OpenCV {cv2.__version__}); PSNR and SSIM "
    "match scikit-image peak_signal_noise_ratio and structural_similarity(gaussian_weights=True, "
    "sigma=1.5, use_sample_covariance=False, data_range=1)"
)


@dataclass(frozen=True)
class Scores:
    """PSNR (dB) and SSIM of one image; the RealBlur fields are None under `gopro`."""

    psnr: float
    ssim: float
    intensity_scale: float | None = None
    ecc_converged: bool | None = None


@dataclass(frozen=True)
class Protocol:
    """A scoring protocol: its name, a one-line description for reports, and its scoring rule."""

    name: str
    description: str

    def score(self, restored: np.ndarray, reference: np.ndarray, name: str = "") -> Scores:
        """Score one (h, w, c) or (h, w) restored image in [0, 1] against its ground truth."""
        if self.name == "realblur":
            result = realblur_scores(restored, reference, name)
            return Scores(result.psnr, result.ssim, result.intensity_scale, result.ecc_converged)
        return Scores(psnr(restored, reference), ssim(restored, reference))


PROTOCOLS: dict[str, Protocol] = {
    "gopro": Protocol(
        "gopro",
        "RGB, full frame (crop 0), no alignment; SSIM 11x11 Gaussian window, sigma 1.5; "
        "data range 1, float64; mean of per-image scores",
    ),
    "realblur": Protocol(
        "realblur",
        "RGB, least-squares intensity scale, ECC homography alignment, masked PSNR and SSIM; "
        "SSIM 11x11 Gaussian window, sigma 1.5; data range 1, float64; mean of per-image scores",
    ),
}


def get_protocol(name: str) -> Protocol:
    """Return the protocol called `name` (case-insensitive); ValueError lists the valid names."""
    protocol = PROTOCOLS.get(name.lower())
    if protocol is None:
        raise ValueError(f"unknown protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}")
    return protocol
