"""Tests for synthetic motion blur: generated kernels, kernel files and the blur pipeline."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from mbmamba_cli.training.blur import (
    MAX_KERNEL_SIZE,
    MIN_KERNEL_SIZE,
    _sample_exposure,
    apply_blur,
    center_kernel,
    convolve,
    linear_to_srgb,
    load_kernels,
    random_camera_shake_kernel,
    random_kernel_size,
    srgb_to_linear,
)

KERNELS_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kernels"


def _center_of_mass(kernel: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(kernel.shape)
    total = kernel.sum()
    return float((rows * kernel).sum() / total), float((cols * kernel).sum() / total)


def _high_frequency_energy(image: np.ndarray) -> float:
    gray = image.mean(axis=2)
    return float((np.diff(gray, axis=0) ** 2).sum() + (np.diff(gray, axis=1) ** 2).sum())


def _textured_image(size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.random((size, size, 3), dtype=np.float32)


@pytest.mark.parametrize("size", [7, 15, 35])
def test_shake_kernel_normalised(size):
    kernel = random_camera_shake_kernel(size, np.random.default_rng(size))

    assert kernel.shape == (size, size)
    assert kernel.dtype == np.float32
    assert abs(float(kernel.sum()) - 1.0) < 1e-5
    assert kernel.min() >= 0.0


@pytest.mark.parametrize("seed", range(8))
def test_shake_kernel_path_crosses_centre(seed):
    # The camera position at the middle of the exposure lies on the centre pixel, so the
    # 3x3 block around the centre must carry weight.
    kernel = random_camera_shake_kernel(21, np.random.default_rng(seed))

    assert kernel[9:12, 9:12].sum() > 0.0


def test_exposure_weights_follow_time():
    # Two steps of equal time: a slow one of 1 px and a fast one of 3 px. Each gets half of
    # the weight, so the fast one is spread thinner.
    points = np.array([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0]])

    samples, weights = _sample_exposure(points, spacing=0.5)

    assert float(weights.sum()) == pytest.approx(1.0)
    assert float(weights[samples[:, 0] < 1.0].sum()) == pytest.approx(0.5)
    assert float(weights[samples[:, 0] > 1.0].sum()) == pytest.approx(0.5)
    assert np.all(np.diff(samples[:, 0]) <= 0.5 + 1e-9)


def test_shake_kernel_varies_with_seed():
    kernels = [random_camera_shake_kernel(25, np.random.default_rng(seed)) for seed in range(6)]
    supports = {tuple(np.flatnonzero(kernel > 1e-4)) for kernel in kernels}

    assert len(supports) == 6
    for first, second in zip(kernels[:-1], kernels[1:], strict=True):
        assert np.abs(first - second).sum() > 0.5


def test_shake_kernel_same_seed_same_kernel():
    first = random_camera_shake_kernel(25, np.random.default_rng(11))
    second = random_camera_shake_kernel(25, np.random.default_rng(11))

    np.testing.assert_array_equal(first, second)


def test_shake_kernel_is_not_a_point():
    # Across seeds most kernels must spread their weight: a blur, not an identity.
    peaks = [random_camera_shake_kernel(25, np.random.default_rng(s)).max() for s in range(20)]

    assert np.median(peaks) < 0.2


@pytest.mark.parametrize("size", [0, 4, 8])
def test_shake_kernel_rejects_bad_size(size):
    with pytest.raises(ValueError, match="odd and >= 3"):
        random_camera_shake_kernel(size, np.random.default_rng(0))


def test_kernel_size_range_odd():
    rng = np.random.default_rng(0)
    sizes = {random_kernel_size(rng) for _ in range(400)}

    assert min(sizes) == MIN_KERNEL_SIZE
    assert max(sizes) == MAX_KERNEL_SIZE
    assert all(size % 2 == 1 for size in sizes)


def test_center_kernel_moves_mass_to_centre():
    kernel = np.zeros((9, 6), dtype=np.float32)
    kernel[1, 4] = 3.0
    kernel[2, 5] = 1.0

    centred = center_kernel(kernel)
    center_y, center_x = _center_of_mass(centred)
    half = centred.shape[0] // 2

    assert centred.shape[0] == centred.shape[1]
    assert centred.shape[0] % 2 == 1
    assert center_y == pytest.approx(half, abs=1e-5)
    assert center_x == pytest.approx(half, abs=1e-5)
    assert float(centred.sum()) == pytest.approx(1.0, abs=1e-6)


def _write_png(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), data)


def test_load_kernels_tmp_folder(tmp_path):
    gray = np.zeros((9, 9), dtype=np.uint8)
    gray[4, 2:7] = 255
    colour = np.zeros((11, 11, 3), dtype=np.uint8)
    colour[3:8, 5] = (255, 255, 255)
    _write_png(tmp_path / "a" / "line.png", gray)
    _write_png(tmp_path / "b" / "colour.png", colour)
    (tmp_path / "kernels.mat").write_bytes(b"MATLAB placeholder, skipped by extension")
    (tmp_path / "notes.txt").write_text("not a kernel")

    kernels = load_kernels(tmp_path)

    assert len(kernels) == 2
    for kernel in kernels:
        assert kernel.ndim == 2
        assert kernel.shape[0] == kernel.shape[1]
        assert abs(float(kernel.sum()) - 1.0) < 1e-5
        assert kernel.min() >= 0.0


def test_load_kernels_keeps_shape_when_centred(tmp_path):
    gray = np.zeros((9, 9), dtype=np.uint8)
    gray[4, 2:7] = 255
    _write_png(tmp_path / "line.png", gray)

    kernel = load_kernels(tmp_path)[0]

    assert kernel.shape == (5, 5)
    np.testing.assert_allclose(kernel[2], np.full(5, 0.2), atol=1e-6)


def test_load_kernels_empty_folder_raises(tmp_path):
    (tmp_path / "readme.txt").write_text("no kernels here")

    with pytest.raises(ValueError, match="no kernel images"):
        load_kernels(tmp_path)


def test_load_kernels_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="kernel folder not found"):
        load_kernels(tmp_path / "absent")


def test_load_kernels_all_zero_raises(tmp_path):
    _write_png(tmp_path / "zero.png", np.zeros((5, 5), dtype=np.uint8))

    with pytest.raises(ValueError, match="zero.png"):
        load_kernels(tmp_path)


def test_load_kernels_real_folders():
    if not KERNELS_DIR.is_dir():
        pytest.skip(f"shared kernel data not found at {KERNELS_DIR}")

    levin = load_kernels(KERNELS_DIR / "levin09_png")
    lai = load_kernels(KERNELS_DIR / "lai2016_uniform")

    assert len(levin) == 8
    assert len(lai) == 4
    for kernel in levin + lai:
        assert abs(float(kernel.sum()) - 1.0) < 1e-5
        assert kernel.min() >= 0.0
        assert kernel.shape[0] % 2 == 1


def test_convolve_matches_shifted_impulse():
    # A kernel with its single weight one pixel right of the centre shifts the image right.
    image = np.zeros((7, 7, 3), dtype=np.float32)
    image[3, 3] = 1.0
    kernel = np.zeros((3, 3), dtype=np.float32)
    kernel[1, 2] = 1.0

    result = convolve(image, kernel)

    assert result[3, 4, 0] == pytest.approx(1.0)
    assert float(result.sum()) == pytest.approx(3.0)


def test_apply_blur_keeps_shape_and_range():
    rng = np.random.default_rng(0)
    sharp = _textured_image()
    kernel = random_camera_shake_kernel(15, rng)

    blurred = apply_blur(sharp, kernel, rng, jpeg_quality=(50, 90), saturation_gain=(2.0, 3.0))

    assert blurred.shape == sharp.shape
    assert blurred.dtype == np.float32
    assert blurred.min() >= 0.0
    assert blurred.max() <= 1.0


def test_apply_blur_lowers_high_frequencies():
    rng = np.random.default_rng(1)
    sharp = _textured_image()
    kernel = random_camera_shake_kernel(15, rng)

    blurred = apply_blur(sharp, kernel, rng, noise_sigma=(0.0, 0.0), shot_noise=(0.0, 0.0))

    assert _high_frequency_energy(blurred) < 0.5 * _high_frequency_energy(sharp)


@pytest.mark.parametrize("linear_light", [False, True])
def test_apply_blur_constant_unchanged(linear_light):
    sharp = np.full((20, 24, 3), (0.2, 0.5, 0.9), dtype=np.float32)
    kernel = random_camera_shake_kernel(9, np.random.default_rng(3))

    blurred = apply_blur(
        sharp,
        kernel,
        np.random.default_rng(3),
        linear_light=linear_light,
        noise_sigma=(0.0, 0.0),
        shot_noise=(0.0, 0.0),
    )

    np.testing.assert_allclose(blurred, sharp, atol=1e-5)


def test_srgb_roundtrip():
    values = np.linspace(0.0, 1.0, 101, dtype=np.float32)

    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(values)), values, atol=1e-5)


def test_apply_blur_linear_light_brightens_edge():
    # Averaging a black/white edge in linear light gives brighter sRGB values than averaging
    # the stored values: the mid-grey of a 50/50 mix is 0.735 in sRGB, not 0.5.
    sharp = np.zeros((9, 10, 3), dtype=np.float32)
    sharp[:, 5:] = 1.0
    kernel = np.array([[0.5, 0.5]], dtype=np.float32)
    rng = np.random.default_rng(0)
    quiet = {"noise_sigma": (0.0, 0.0), "shot_noise": (0.0, 0.0)}

    srgb_values = apply_blur(sharp, kernel, rng, **quiet)
    linear = apply_blur(sharp, kernel, rng, linear_light=True, **quiet)

    assert srgb_values[4, 4, 0] == pytest.approx(0.5, abs=1e-5)
    assert linear[4, 4, 0] == pytest.approx(0.7354, abs=1e-3)


def test_apply_blur_saturation_spreads_highlight():
    # A small highlight boosted above 1 stays saturated after blur. Without the boost the
    # blur spreads it below 1.
    sharp = np.full((21, 21, 3), 0.1, dtype=np.float32)
    sharp[9:12, 9:12] = 1.0
    kernel = np.zeros((1, 7), dtype=np.float32)
    kernel[0, :] = 1.0
    quiet = {"noise_sigma": (0.0, 0.0), "shot_noise": (0.0, 0.0)}

    plain = apply_blur(sharp, kernel, np.random.default_rng(0), **quiet)
    boosted = apply_blur(
        sharp, kernel, np.random.default_rng(0), saturation_gain=(4.0, 4.0), **quiet
    )

    assert plain[10, 10, 0] < 0.6
    assert boosted[10, 10, 0] == pytest.approx(1.0)
    assert (boosted[10] >= 0.999).sum() > (plain[10] >= 0.999).sum()


def test_apply_blur_noise_level():
    sharp = np.full((64, 64, 3), 0.5, dtype=np.float32)
    kernel = np.ones((1, 1), dtype=np.float32)

    noisy = apply_blur(
        sharp, kernel, np.random.default_rng(0), noise_sigma=(0.02, 0.02), shot_noise=(0.0, 0.0)
    )

    assert float(noisy.std()) == pytest.approx(0.02, rel=0.1)


def test_apply_blur_jpeg_changes_pixels():
    rng = np.random.default_rng(0)
    sharp = _textured_image(32)
    kernel = np.ones((1, 1), dtype=np.float32)
    quiet = {"noise_sigma": (0.0, 0.0), "shot_noise": (0.0, 0.0)}

    compressed = apply_blur(sharp, kernel, rng, jpeg_quality=(30, 30), **quiet)

    assert np.abs(compressed - sharp).mean() > 0.01
    assert np.abs(compressed - sharp).mean() < 0.3


def test_apply_blur_jpeg_keeps_colour_order():
    sharp = np.zeros((16, 16, 3), dtype=np.float32)
    sharp[..., 0] = 0.9
    kernel = np.ones((1, 1), dtype=np.float32)
    quiet = {"noise_sigma": (0.0, 0.0), "shot_noise": (0.0, 0.0)}

    compressed = apply_blur(sharp, kernel, np.random.default_rng(0), jpeg_quality=(95, 95), **quiet)

    assert compressed[..., 0].mean() > 0.8
    assert compressed[..., 2].mean() < 0.1


def test_apply_blur_rejects_zero_kernel():
    with pytest.raises(ValueError, match="positive sum"):
        apply_blur(_textured_image(8), np.zeros((3, 3)), np.random.default_rng(0))


def test_apply_blur_rejects_gray_image():
    with pytest.raises(ValueError, match=r"\(h, w, 3\)"):
        apply_blur(np.zeros((8, 8), np.float32), np.ones((3, 3)), np.random.default_rng(0))


def test_apply_blur_saturation_spares_large_areas():
    # A bright wall covering half the image is not a light source, so the boost must leave
    # almost all of it alone instead of whitening the image.
    sharp = np.full((32, 32, 3), 0.1, dtype=np.float32)
    sharp[:, 16:] = 0.9
    kernel = np.full((5, 5), 1.0 / 25, dtype=np.float32)
    quiet = {"noise_sigma": (0.0, 0.0), "shot_noise": (0.0, 0.0)}

    plain = apply_blur(sharp, kernel, np.random.default_rng(0), **quiet)
    boosted = apply_blur(
        sharp, kernel, np.random.default_rng(0), saturation_gain=(4.0, 4.0), **quiet
    )

    assert (boosted >= 0.999).mean() < 0.05
    assert abs(float(boosted.mean()) - float(plain.mean())) < 0.02
