"""Synthetic motion blur for training: camera-shake kernels, published kernels, and the blur itself.

Images here are numpy arrays (h, w, 3) float32 RGB in [0, 1]. Kernels are (k, k) float32,
non-negative, summing to 1, with the kernel centre at index (k // 2, k // 2).
All randomness comes from a `numpy.random.Generator` passed by the caller, so a data loader
can derive it from (seed, epoch, index) and get the same sample in any worker process.
"""

import math
from pathlib import Path

import cv2
import numpy as np

from mbmamba_cli.log import get_logger

logger = get_logger(__name__)

# Generated kernel sizes, in pixels (odd, so the kernel has a centre pixel).
MIN_KERNEL_SIZE = 7
MAX_KERNEL_SIZE = 35

KERNEL_EXTENSIONS = frozenset({".png", ".tif", ".tiff", ".bmp"})

# Time steps of the simulated exposure, before the path is sampled densely for rendering.
_TRAJECTORY_STEPS = 160

# Maximum distance, in pixels, between two rendered points of a trajectory. Smaller than one
# pixel so the rendered streak has no gaps.
_RENDER_SPACING = 0.25


def random_kernel_size(rng: np.random.Generator) -> int:
    """Draw an odd kernel size uniformly from MIN_KERNEL_SIZE to MAX_KERNEL_SIZE."""
    return int(rng.integers(MIN_KERNEL_SIZE // 2, MAX_KERNEL_SIZE // 2 + 1)) * 2 + 1


def _camera_shake_trajectory(rng: np.random.Generator) -> np.ndarray:
    """Simulate the image-plane path of a shaking camera, in arbitrary units.

    The velocity follows a drift direction that turns slowly (curvature) plus random
    acceleration, smoothed by inertia (a momentum term). A weak pull back towards the start
    makes the path swing back and forth like hand tremor, and rare jerks kick the velocity.
    Each parameter is drawn per trajectory, so straight streaks, arcs and zig-zag shakes all
    occur. Returns (steps, 2) float64 positions (x, y).
    """
    momentum = rng.uniform(0.7, 0.97)
    drift_strength = rng.uniform(0.0, 1.0)
    turn_rate = rng.normal(0.0, 0.02)
    acceleration_std = rng.uniform(0.2, 3.0)
    pull_back = rng.uniform(0.0, 0.05) if rng.random() < 0.4 else 0.0
    jerk_probability = rng.uniform(0.0, 0.03)

    # The random draws for every step are made up front, and the loop only integrates them.
    accelerations = rng.normal(0.0, acceleration_std, size=(_TRAJECTORY_STEPS, 2))
    jerk_steps = rng.random(_TRAJECTORY_STEPS) < jerk_probability
    jerks = rng.normal(0.0, 10.0, size=(_TRAJECTORY_STEPS, 2))

    angle = rng.uniform(0.0, 2.0 * math.pi)
    position = np.zeros(2)
    velocity = np.zeros(2)
    positions = np.empty((_TRAJECTORY_STEPS, 2))

    for step in range(_TRAJECTORY_STEPS):
        positions[step] = position

        drift = drift_strength * np.array([math.cos(angle), math.sin(angle)])
        force = drift + accelerations[step] - pull_back * position
        if jerk_steps[step]:
            force = force + jerks[step]

        velocity = momentum * velocity + (1.0 - momentum) * force
        position = position + velocity
        angle += turn_rate

    return positions


def _sample_exposure(points: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Sample a trajectory densely, weighting every segment by its share of exposure time.

    points: (n, 2), consecutive points one time step apart. Each of the n - 1 segments gets
    the same total weight, spread evenly over sub-points at most `spacing` apart, so a fast
    (long) segment spreads its exposure thinner than a slow one, as in a real exposure.
    Returns sample positions (m, 2) and weights (m,) summing to 1.
    """
    starts, ends = points[:-1], points[1:]
    lengths = np.linalg.norm(ends - starts, axis=1)
    counts = np.maximum(1, np.ceil(lengths / spacing).astype(int))

    # Sub-point j of a segment with `count` pieces sits at the middle of piece j.
    segment_index = np.repeat(np.arange(len(counts)), counts)
    piece_index = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    fractions = ((piece_index + 0.5) / counts[segment_index])[:, None]

    samples = starts[segment_index] + fractions * (ends - starts)[segment_index]
    weights = 1.0 / (len(counts) * counts[segment_index])
    return samples, weights


def _splat_bilinear(points: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """Render weighted points (m, 2) in pixel coordinates (x, y) into a (size, size) image.

    Each point spreads its weight over its 4 nearest pixels (bilinear splatting), which keeps
    the sub-pixel position of the point. Points must lie in [0, size - 1). Returns float64.
    """
    image = np.zeros((size, size), dtype=np.float64)

    x0 = np.floor(points[:, 0]).astype(int)
    y0 = np.floor(points[:, 1]).astype(int)
    fx = points[:, 0] - x0
    fy = points[:, 1] - y0

    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            np.add.at(image, (y0 + dy, x0 + dx), weights * wy * wx)

    return image


def random_camera_shake_kernel(size: int, rng: np.random.Generator) -> np.ndarray:
    """Generate a random camera-shake blur kernel of size x size pixels.

    A simulated trajectory (see `_camera_shake_trajectory`) is scaled to a random extent
    between 25 % and 100 % of the kernel and rendered with sub-pixel bilinear splatting. The
    camera position at the middle of the exposure is placed on the centre pixel. This matches
    real blurred/sharp pairs made from video (GoPro), where the sharp image is the middle
    frame, so the blurred image is aligned with the sharp one in the same way.
    size must be odd and >= 3. Returns (size, size) float32, non-negative, summing to 1.
    """
    if size < 3 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 3, got {size}")

    trajectory = _camera_shake_trajectory(rng)
    middle_time = (len(trajectory) - 1) / 2
    before, after = math.floor(middle_time), math.ceil(middle_time)
    trajectory = trajectory - (trajectory[before] + trajectory[after]) / 2

    # Scale so the farthest point, on either axis, stays half a pixel inside the border and
    # its bilinear footprint stays inside the kernel.
    radius_limit = (size - 1) / 2 - 0.5
    extent = np.abs(trajectory).max()
    radius = rng.uniform(0.25, 1.0) * radius_limit
    if extent > 0:
        trajectory = trajectory * (radius / extent)

    # Sample after scaling, so the spacing is measured in pixels.
    samples, weights = _sample_exposure(trajectory, _RENDER_SPACING)
    samples = np.clip(samples + (size - 1) / 2, 0.0, size - 1 - 1e-6)

    kernel = _splat_bilinear(samples, weights, size)
    kernel /= kernel.sum()
    return kernel.astype(np.float32)


def _read_kernel_file(path: Path) -> np.ndarray:
    """Read one kernel image as (k, k) float32 summing to 1, averaging RGB to one channel."""
    data = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise ValueError(f"failed to decode kernel image {path}. Re-save it as a grayscale PNG")

    if data.ndim == 3:
        colour = data[..., :3] if data.shape[2] >= 3 else data[..., :1]
        data = colour.astype(np.float64).mean(axis=2)

    kernel = np.clip(data.astype(np.float64), 0.0, None)
    total = kernel.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"kernel image {path} is all zero. A kernel needs positive weights")

    return (kernel / total).astype(np.float32)


def _shift_subpixel(kernel: np.ndarray, shift_y: float, shift_x: float) -> np.ndarray:
    """Move the content of kernel (k, k) by (-shift_y, -shift_x) pixels, each in [-0.5, 0.5].

    Linear interpolation moves the centre of mass by exactly the shift and keeps the sum,
    provided the outer ring of the kernel is zero (np.roll wraps it around).
    """
    for axis, shift in ((0, shift_y), (1, shift_x)):
        if shift == 0:
            continue
        step = 1 if shift > 0 else -1
        kernel = (1.0 - abs(shift)) * kernel + abs(shift) * np.roll(kernel, -step, axis=axis)
    return kernel


def _trim_zero_border(kernel: np.ndarray) -> np.ndarray:
    """Remove outer rings of a square kernel that are entirely zero, keeping it square."""
    while kernel.shape[0] > 1:
        ring = np.concatenate([kernel[0], kernel[-1], kernel[:, 0], kernel[:, -1]])
        if np.any(ring > 0):
            break
        kernel = kernel[1:-1, 1:-1]
    return kernel


def center_kernel(kernel: np.ndarray) -> np.ndarray:
    """Move the centre of mass of a kernel onto its centre pixel, enlarging it to an odd square.

    kernel: (kh, kw) non-negative. The whole-pixel part of the move places the kernel in a
    larger zero canvas. The remaining fraction of a pixel is applied by linear interpolation,
    which smooths the kernel by at most a two-tap [0.5, 0.5] filter per axis. A centred
    kernel does not shift the blurred image against the sharp one.
    Returns (k, k) float32 summing to 1.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    rows, cols = np.indices(kernel.shape)
    total = kernel.sum()
    center_y = float((rows * kernel).sum() / total)
    center_x = float((cols * kernel).sum() / total)

    # The canvas reaches from the rounded centre of mass to every edge of the kernel, plus a
    # zero ring for the sub-pixel move.
    cy, cx = round(center_y), round(center_x)
    half = max(cy, kernel.shape[0] - 1 - cy, cx, kernel.shape[1] - 1 - cx) + 1
    size = 2 * half + 1

    canvas = np.zeros((size, size), dtype=np.float64)
    top, left = half - cy, half - cx
    canvas[top : top + kernel.shape[0], left : left + kernel.shape[1]] = kernel

    canvas = _shift_subpixel(canvas, center_y - cy, center_x - cx)
    canvas = _trim_zero_border(canvas)
    return (canvas / canvas.sum()).astype(np.float32)


def load_kernels(folder: Path | str, recenter: bool = True) -> list[np.ndarray]:
    """Read every blur kernel image under `folder` (searched recursively).

    Kernels are stored as images scaled to a maximum of 255 (or 65535), and each is divided by
    its sum. RGB kernels are averaged to one channel and alpha is dropped. With `recenter` each
    kernel is moved so its centre of mass is at the centre pixel (see `center_kernel`).
    MATLAB .mat files are skipped with a debug log line, because reading them needs scipy or
    h5py, which are not dependencies. Returns a list of (k, k) float32 kernels, sorted by path.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"kernel folder not found: {folder}")

    kernels = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        suffix = path.suffix.lower()
        if suffix == ".mat":
            logger.debug(
                "skipping MATLAB kernel file %s: save the kernels as PNG to use them", path
            )
            continue
        if suffix not in KERNEL_EXTENSIONS:
            continue

        kernel = _read_kernel_file(path)
        if recenter:
            kernel = center_kernel(kernel)
        kernels.append(kernel)

    if not kernels:
        raise ValueError(
            f"no kernel images ({', '.join(sorted(KERNEL_EXTENSIONS))}) found under {folder}. "
            "Point kernels_dir at a folder of PNG kernels"
        )

    sizes = sorted({k.shape[0] for k in kernels})
    logger.info(
        "loaded %d blur kernels from %s, sizes %d to %d px",
        len(kernels),
        folder,
        sizes[0],
        sizes[-1],
    )
    return kernels


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """Convert sRGB-encoded values in [0, 1] to linear light (IEC 61966-2-1 curve)."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Convert linear-light values in [0, 1] to sRGB encoding (IEC 61966-2-1 curve)."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * np.power(x, 1.0 / 2.4) - 0.055).astype(
        np.float32
    )


def _odd_kernel(kernel: np.ndarray) -> np.ndarray:
    """Pad an even-sized kernel with a zero row or column at the end so both sizes are odd."""
    pad_rows = 1 - kernel.shape[0] % 2
    pad_cols = 1 - kernel.shape[1] % 2
    if pad_rows or pad_cols:
        kernel = np.pad(kernel, ((0, pad_rows), (0, pad_cols)))
    return kernel


def convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each channel of image (h, w, c) with kernel (kh, kw), reflecting at the border.

    cv2.filter2D computes a correlation, so the kernel is flipped to get a true convolution.
    The kernel centre is index (kh // 2, kw // 2) after even sizes are padded to odd.
    Returns (h, w, c) float32.
    """
    kernel = _odd_kernel(np.asarray(kernel, dtype=np.float32))
    flipped = np.ascontiguousarray(kernel[::-1, ::-1])
    return cv2.filter2D(
        np.ascontiguousarray(image, dtype=np.float32),
        -1,
        flipped,
        borderType=cv2.BORDER_REFLECT_101,
    )


def _boost_highlights(
    image: np.ndarray, gain: float, threshold: float, max_area: float
) -> np.ndarray:
    """Scale up the brightest regions of image (h, w, 3) so they exceed 1 before the blur.

    Pixels whose luminance is above `threshold` are multiplied by up to `gain`, with a smooth
    ramp from threshold to 1 so the boosted regions have no hard outline. Pixels stored at 1
    were clipped by the camera, so their true brightness is unknown and at least this high.
    The threshold is raised until at most `max_area` of the pixels (a fraction) are boosted,
    because light sources are small. Boosting a large bright wall would white out the image.
    """
    luminance = image @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
    threshold = max(threshold, float(np.quantile(luminance, 1.0 - max_area)))
    ramp = np.clip((luminance - threshold) / max(1.0 - threshold, 1e-6), 0.0, 1.0)
    ramp = ramp * ramp * (3.0 - 2.0 * ramp)
    return image * (1.0 + (gain - 1.0) * ramp)[..., None]


def _add_noise(
    image: np.ndarray, rng: np.random.Generator, read_sigma: float, shot_sigma: float
) -> np.ndarray:
    """Add Gaussian noise whose variance is read_sigma^2 + shot_sigma^2 * value.

    The signal-dependent part approximates photon (Poisson) noise: shot_sigma is its standard
    deviation at a value of 1. NOTE: a camera adds noise to linear raw data before its image
    processing, but here it is added to the final (usually sRGB) values, so its dependence on
    brightness only approximates a real sensor.
    """
    variance = read_sigma**2 + shot_sigma**2 * np.clip(image, 0.0, 1.0)
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.sqrt(variance)
    return image + noise.astype(np.float32)


def _jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode image (h, w, 3) RGB in [0, 1] as JPEG at `quality` and decode it again."""
    bgr = cv2.cvtColor(np.round(image * 255.0).astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode a {image.shape} image as JPEG")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def apply_blur(
    sharp: np.ndarray,
    kernel: np.ndarray,
    rng: np.random.Generator,
    *,
    linear_light: bool = False,
    noise_sigma: tuple[float, float] = (0.0, 0.02),
    shot_noise: tuple[float, float] = (0.0, 0.02),
    jpeg_quality: tuple[int, int] | None = None,
    saturation_gain: tuple[float, float] | None = None,
    saturation_threshold: tuple[float, float] = (0.85, 0.97),
    saturation_max_area: float = 0.03,
) -> np.ndarray:
    """Blur a sharp image with a kernel and degrade it like a camera would.

    sharp: (h, w, 3) float32 in [0, 1]. kernel: (kh, kw), normalised to sum 1 here.
    Steps, each with parameters drawn from rng:
    1. optional highlight boost (saturation_gain range, e.g. (1.5, 4.0)): pixels brighter
       than a threshold drawn from saturation_threshold, and at most saturation_max_area of
       the image, are scaled above 1. After blur and clipping, light sources then leave
       saturated streaks.
    2. convolution, on the stored sRGB values or, with linear_light, in linear light.
    3. clipping to [0, 1].
    4. noise: read-noise standard deviation drawn from noise_sigma and shot-noise standard
       deviation (at a value of 1) drawn from shot_noise. A range of (0, 0) turns a term off.
    5. optional JPEG re-compression at a quality drawn from jpeg_quality (inclusive range).
    Returns (h, w, 3) float32 in [0, 1].
    """
    if sharp.ndim != 3 or sharp.shape[2] != 3:
        raise ValueError(f"apply_blur: expected an (h, w, 3) image, got shape {sharp.shape}")
    kernel = np.asarray(kernel, dtype=np.float32)
    if kernel.ndim != 2:
        raise ValueError(f"apply_blur: expected a 2-D kernel, got shape {kernel.shape}")
    kernel_sum = float(kernel.sum())
    if not np.isfinite(kernel_sum) or kernel_sum <= 0:
        raise ValueError(f"apply_blur: kernel must have a positive sum, got {kernel_sum}")
    kernel = kernel / kernel_sum

    image = np.asarray(sharp, dtype=np.float32)
    if linear_light:
        image = srgb_to_linear(image)

    if saturation_gain is not None:
        gain = rng.uniform(*saturation_gain)
        threshold = rng.uniform(*saturation_threshold)
        image = _boost_highlights(image, gain, threshold, saturation_max_area)

    blurred = convolve(image, kernel)
    blurred = np.clip(blurred, 0.0, 1.0)
    if linear_light:
        blurred = linear_to_srgb(blurred)

    read_sigma = rng.uniform(*noise_sigma)
    shot_sigma = rng.uniform(*shot_noise)
    if read_sigma > 0 or shot_sigma > 0:
        blurred = np.clip(_add_noise(blurred, rng, read_sigma, shot_sigma), 0.0, 1.0)

    if jpeg_quality is not None:
        quality = int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1))
        blurred = _jpeg_roundtrip(blurred, quality)

    return blurred.astype(np.float32, copy=False)
