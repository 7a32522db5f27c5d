"""Tests for PSNR/SSIM against scikit-image, the RealBlur protocol, pairing and the eval runner."""

import math
import os
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mbmamba_cli.metrics.evaluate import evaluate_pairs, shard_pairs
from mbmamba_cli.metrics.pairing import (
    ImagePair,
    PairingError,
    attach_predictions,
    ground_truth_pairs,
    pair_folders,
    pairs_from_dataset,
    pairs_from_list,
)
from mbmamba_cli.metrics.protocols import get_protocol
from mbmamba_cli.metrics.psnr_ssim import psnr, ssim, to_unit_float64
from mbmamba_cli.metrics.realblur import match_intensity, realblur_scores

SIZES = [(11, 11), (16, 16), (37, 23), (64, 48), (11, 11, 3), (33, 17, 3), (64, 96, 3), (101, 75, 3)]


def _skimage_ssim(restored: np.ndarray, reference: np.ndarray) -> float:
    """scikit-image's SSIM with the settings the protocols name."""
    return structural_similarity(
        reference,
        restored,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1,
        channel_axis=-1 if reference.ndim == 3 else None,
    )


def _noisy_pair(shape: tuple[int, ...], seed: int, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A random reference in [0, 1] and a noisy copy clipped to [0, 1], both float64."""
    rng = np.random.default_rng(seed)
    reference = rng.random(shape)
    restored = np.clip(reference + noise * rng.standard_normal(shape), 0.0, 1.0)
    return restored, reference


def _smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image in [0, 1] (blurred noise), float64 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.random((height, width, 3)), (0, 0), 3.0)
    return (image - image.min()) / (image.max() - image.min())


def _write(path: Path, pixels: np.ndarray) -> Path:
    """Write a float (h, w, 3) RGB image in [0, 1] as an 8-bit file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    assert cv2.imwrite(str(path), np.ascontiguousarray(data[:, :, ::-1]))
    return path


def _touch_image(path: Path, value: int = 128, size: tuple[int, int] = (16, 16)) -> Path:
    """Write a flat 8-bit RGB image of `size` (h, w)."""
    return _write(path, np.full((*size, 3), value / 255.0))


# PSNR and SSIM against scikit-image


@pytest.mark.parametrize("shape", SIZES)
def test_psnr_matches_skimage(shape):
    restored, reference = _noisy_pair(shape, seed=len(shape) * 100 + shape[0])

    expected = peak_signal_noise_ratio(reference, restored, data_range=1)

    assert abs(psnr(restored, reference) - expected) < 0.01


@pytest.mark.parametrize("shape", SIZES)
def test_ssim_matches_skimage(shape):
    restored, reference = _noisy_pair(shape, seed=len(shape) * 100 + shape[1])

    expected = _skimage_ssim(restored, reference)

    assert abs(ssim(restored, reference) - expected) < 0.001


def test_ssim_matches_skimage_on_structured_image():
    reference = _smooth_image(48, 70)
    restored = cv2.GaussianBlur(reference, (0, 0), 1.2)

    assert abs(ssim(restored, reference) - _skimage_ssim(restored, reference)) < 1e-6


def test_uint8_scaled_by_255():
    rng = np.random.default_rng(3)
    reference = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    restored = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)

    expected_psnr = peak_signal_noise_ratio(reference, restored, data_range=255)
    expected_ssim = _skimage_ssim(restored / 255.0, reference / 255.0)

    assert abs(psnr(restored, reference) - expected_psnr) < 1e-9
    assert abs(ssim(restored, reference) - expected_ssim) < 1e-9


def test_uint16_scaled_by_65535():
    values = np.array([[0, 65535], [32768, 1]], dtype=np.uint16)

    scaled = to_unit_float64(values)

    assert scaled.dtype == np.float64
    assert scaled[0, 1] == 1.0
    assert scaled[1, 0] == 32768 / 65535


def test_identical_images_score_perfectly():
    image = _smooth_image(20, 20)

    assert psnr(image, image) == math.inf
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)


def test_ssim_too_small_image_raises():
    image = np.zeros((10, 40, 3))

    with pytest.raises(ValueError, match="11"):
        ssim(image, image)


def test_size_mismatch_raises():
    with pytest.raises(ValueError, match="sizes differ"):
        psnr(np.zeros((16, 16, 3)), np.zeros((16, 17, 3)))


def test_masked_psnr_equals_psnr_of_valid_region():
    restored, reference = _noisy_pair((30, 40, 3), seed=5)
    mask = np.zeros_like(reference)
    mask[5:25, 10:30] = 1.0

    expected = psnr(restored[5:25, 10:30], reference[5:25, 10:30])

    assert psnr(restored, reference, mask) == pytest.approx(expected, abs=1e-9)


def test_masked_ssim_all_ones_equals_unmasked():
    restored, reference = _noisy_pair((30, 40, 3), seed=6)

    assert ssim(restored, reference, np.ones_like(reference)) == pytest.approx(
        ssim(restored, reference), abs=1e-12
    )


def test_levin_pairs_match_skimage(shared_data):
    folder = shared_data / "real" / "levin09"
    names = ["im1_kernel1_img.png", "im2_kernel4_img.png", "im3_kernel8_img.png"]
    for name in names:
        blurred = cv2.imread(str(folder / "blur" / name), cv2.IMREAD_UNCHANGED)
        sharp = cv2.imread(str(folder / "sharp" / name), cv2.IMREAD_UNCHANGED)
        restored, reference = blurred / 255.0, sharp / 255.0

        expected_psnr = peak_signal_noise_ratio(reference, restored, data_range=1)
        expected_ssim = _skimage_ssim(restored, reference)

        assert abs(psnr(blurred, sharp) - expected_psnr) < 0.01, name
        assert abs(ssim(blurred, sharp) - expected_ssim) < 0.001, name


def test_gopro_pair_matches_skimage(shared_data):
    folder = shared_data / "real" / "gopro_deepdeblur"
    blurred = cv2.imread(str(folder / "blur" / "Istanbul1.png"))[:, :, ::-1] / 255.0
    sharp = cv2.imread(str(folder / "sharp" / "Istanbul1.png"))[:, :, ::-1] / 255.0

    assert abs(psnr(blurred, sharp) - peak_signal_noise_ratio(sharp, blurred, data_range=1)) < 0.01
    assert abs(ssim(blurred, sharp) - _skimage_ssim(blurred, sharp)) < 0.001


# RealBlur protocol


def _moved(image: np.ndarray, angle: float, shift: tuple[float, float]) -> np.ndarray:
    """Rotate `image` by `angle` degrees about its centre and shift it by (dx, dy) pixels."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    matrix[:, 2] += shift
    return cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT
    )


def test_realblur_recovers_small_homography():
    sharp = _smooth_image(96, 128)
    moved = _moved(sharp, angle=0.7, shift=(1.3, -0.8))

    unaligned = psnr(moved, sharp)
    scores = realblur_scores(moved, sharp, "moved")

    assert scores.ecc_converged
    assert scores.psnr > 35.0
    assert scores.psnr > unaligned + 15.0
    assert scores.ssim > 0.99
    assert scores.valid_fraction > 0.9


def test_realblur_grayscale_image():
    sharp = _smooth_image(80, 80)[:, :, 0]
    moved = _moved(sharp, angle=-0.5, shift=(0.6, 1.1))

    scores = realblur_scores(moved, sharp)

    assert scores.psnr > 35.0
    assert scores.psnr > psnr(moved, sharp) + 10.0


def test_realblur_undoes_intensity_scale():
    sharp = _smooth_image(64, 64)

    scores = realblur_scores(sharp * 0.8, sharp)

    assert scores.intensity_scale == pytest.approx(1.25, rel=1e-6)
    assert scores.psnr > 60.0


def test_intensity_scale_is_least_squares():
    restored, reference = _noisy_pair((20, 20, 3), seed=9)

    _, factor = match_intensity(restored, reference)
    candidates = [factor * (1 + step) for step in (-0.01, 0.01)]
    best_error = np.sum((reference - factor * restored) ** 2)

    for candidate in candidates:
        assert np.sum((reference - candidate * restored) ** 2) > best_error


def test_realblur_ecc_failure_falls_back_to_identity():
    sharp = _smooth_image(64, 64)
    noise = np.random.default_rng(1).random(sharp.shape)

    scores = realblur_scores(noise, sharp, "noise")

    assert not scores.ecc_converged
    assert np.array_equal(scores.homography, np.eye(3))
    assert math.isfinite(scores.psnr)


def test_protocol_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="gopro, realblur"):
        get_protocol("kohler")


# Pairing


def test_pair_folders_matches_by_name(tmp_path):
    for name, value in [("c", 30), ("a", 10), ("b", 20)]:
        _touch_image(tmp_path / "blur" / f"{name}.png", value)
        _touch_image(tmp_path / "gt" / f"{name}.png", value + 1)

    pairs = pair_folders(tmp_path / "blur", tmp_path / "gt")

    assert [pair.name for pair in pairs] == ["a", "b", "c"]
    assert all(pair.blur.stem == pair.gt.stem for pair in pairs)


def test_pair_folders_missing_names_file(tmp_path):
    for name in ("a", "b"):
        _touch_image(tmp_path / "blur" / f"{name}.png")
    for name in ("a", "b", "only_gt"):
        _touch_image(tmp_path / "gt" / f"{name}.png")

    with pytest.raises(PairingError, match="only_gt.png") as caught:
        pair_folders(tmp_path / "blur", tmp_path / "gt")

    assert caught.value.missing == [str(tmp_path / "gt" / "only_gt.png")]
    assert caught.value.extra == []


def test_pair_folders_extra_names_file(tmp_path):
    for name in ("a", "only_blur"):
        _touch_image(tmp_path / "blur" / f"{name}.png")
    _touch_image(tmp_path / "gt" / "a.png")

    with pytest.raises(PairingError, match="only_blur.png") as caught:
        pair_folders(tmp_path / "blur", tmp_path / "gt")

    assert caught.value.extra == [str(tmp_path / "blur" / "only_blur.png")]


def test_pair_folders_skips_non_images(tmp_path):
    _touch_image(tmp_path / "blur" / "a.png")
    _touch_image(tmp_path / "gt" / "a.png")
    (tmp_path / "gt" / "README.txt").write_text("notes")
    (tmp_path / "gt" / ".hidden.png").write_bytes(b"")

    pairs = pair_folders(tmp_path / "blur", tmp_path / "gt")

    assert [pair.name for pair in pairs] == ["a"]


def test_same_stem_twice_raises(tmp_path):
    _touch_image(tmp_path / "gt" / "a.png")
    _touch_image(tmp_path / "gt" / "a.jpg")

    with pytest.raises(PairingError, match=r"a\.jpg"):
        ground_truth_pairs(tmp_path / "gt")


def _gopro_tree(root: Path) -> None:
    """Two GoPro scenes with blur/, blur_gamma/ and sharp/ folders of two frames each."""
    for scene in ("GOPR0384_11_00", "GOPR0410_11_00"):
        for frame in ("000001", "000002"):
            for role in ("blur", "blur_gamma", "sharp"):
                _touch_image(root / "test" / scene / role / f"{frame}.png")


def test_gopro_layout_pairs(tmp_path):
    _gopro_tree(tmp_path / "GOPRO_Large")

    pairs = pairs_from_dataset(tmp_path / "GOPRO_Large")

    assert [pair.name for pair in pairs] == [
        "GOPR0384_11_00/000001",
        "GOPR0384_11_00/000002",
        "GOPR0410_11_00/000001",
        "GOPR0410_11_00/000002",
    ]
    assert all(pair.blur.parent.name == "blur" for pair in pairs)
    assert all(pair.gt.parent.name == "sharp" for pair in pairs)
    assert pairs[0].dataset == "GOPRO_Large"


def test_gopro_roots_as_blur_and_gt(tmp_path):
    _gopro_tree(tmp_path / "GOPRO_Large")
    test_root = tmp_path / "GOPRO_Large" / "test"

    pairs = pair_folders(test_root, test_root)

    assert len(pairs) == 4
    assert pairs[0].dataset == "GOPRO_Large/test"


def test_gopro_missing_sharp_frame_raises(tmp_path):
    _gopro_tree(tmp_path / "GOPRO_Large")
    (tmp_path / "GOPRO_Large" / "test" / "GOPR0410_11_00" / "sharp" / "000002.png").unlink()

    with pytest.raises(PairingError, match="GOPR0410_11_00/blur/000002.png"):
        pairs_from_dataset(tmp_path / "GOPRO_Large")


def test_dataset_blur_sharp_folders(tmp_path):
    _touch_image(tmp_path / "levin" / "blur" / "im1.png")
    _touch_image(tmp_path / "levin" / "sharp" / "im1.png")

    pairs = pairs_from_dataset(tmp_path / "levin")

    assert [pair.name for pair in pairs] == ["im1"]
    assert pairs[0].dataset == "levin"


def test_dataset_unknown_layout_raises(tmp_path):
    _touch_image(tmp_path / "mixed" / "a.png")

    with pytest.raises(PairingError, match="no known dataset layout"):
        pairs_from_dataset(tmp_path / "mixed")


def test_list_file_pairs(tmp_path):
    root = tmp_path / "RealBlur"
    for scene in ("scene230", "scene003"):
        _touch_image(root / "RealBlur-J" / scene / "gt" / "gt_1.png")
        _touch_image(root / "RealBlur-J" / scene / "blur" / "blur_1.png")
    list_file = root / "RealBlur_J_test_list.txt"
    list_file.write_text(
        "# gt blur\n"
        "RealBlur-J/scene230/gt/gt_1.png RealBlur-J/scene230/blur/blur_1.png\n"
        "\n"
        "RealBlur-J/scene003/gt/gt_1.png\tRealBlur-J/scene003/blur/blur_1.png\n"
    )

    pairs = pairs_from_list(list_file)

    assert [pair.name for pair in pairs] == [
        "RealBlur-J/scene003/blur/blur_1",
        "RealBlur-J/scene230/blur/blur_1",
    ]
    assert pairs[0].gt == root / "RealBlur-J" / "scene003" / "gt" / "gt_1.png"
    assert pairs[0].dataset == "RealBlur_J_test_list"


def test_list_file_with_root(tmp_path):
    _touch_image(tmp_path / "data" / "GT" / "a.png")
    _touch_image(tmp_path / "data" / "blurred" / "a.png")
    list_file = tmp_path / "lists" / "hide.txt"
    list_file.parent.mkdir()
    list_file.write_text("GT/a.png blurred/a.png\n")

    pairs = pairs_from_list(list_file, root=tmp_path / "data")

    assert pairs[0].blur == tmp_path / "data" / "blurred" / "a.png"


def test_list_file_malformed_line_names_line(tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_text("a.png b.png\nonly_one.png\n")

    with pytest.raises(PairingError, match=r"list\.txt:2"):
        pairs_from_list(list_file)


def test_list_file_absent_files_named(tmp_path):
    _touch_image(tmp_path / "gt" / "a.png")
    list_file = tmp_path / "list.txt"
    list_file.write_text("gt/a.png blur/a.png\n")

    with pytest.raises(PairingError, match=r"blur/a\.png"):
        pairs_from_list(list_file)


def test_predictions_match_without_extension(tmp_path):
    _touch_image(tmp_path / "gt" / "sub" / "a.png")
    _touch_image(tmp_path / "pred" / "sub" / "a.jpg")

    pairs = attach_predictions(ground_truth_pairs(tmp_path / "gt"), tmp_path / "pred")

    assert pairs[0].pred == tmp_path / "pred" / "sub" / "a.jpg"


def test_predictions_mirroring_gopro_blur_layout(tmp_path):
    _gopro_tree(tmp_path / "GOPRO_Large")
    for scene in ("GOPR0384_11_00", "GOPR0410_11_00"):
        for frame in ("000001", "000002"):
            _touch_image(tmp_path / "out" / scene / "blur" / f"{frame}.png")

    pairs = attach_predictions(pairs_from_dataset(tmp_path / "GOPRO_Large"), tmp_path / "out")

    assert pairs[0].pred == tmp_path / "out" / "GOPR0384_11_00" / "blur" / "000001.png"


def test_predictions_missing_and_extra_named(tmp_path):
    for name in ("a", "b"):
        _touch_image(tmp_path / "gt" / f"{name}.png")
    for name in ("a", "stray"):
        _touch_image(tmp_path / "pred" / f"{name}.png")

    with pytest.raises(PairingError) as caught:
        attach_predictions(ground_truth_pairs(tmp_path / "gt"), tmp_path / "pred")

    assert "b.png" in str(caught.value)
    assert "stray.png" in str(caught.value)
    assert caught.value.missing == [str(tmp_path / "gt" / "b.png")]
    assert caught.value.extra == [str(tmp_path / "pred" / "stray.png")]


# Runner


def _scored_folder(tmp_path: Path, count: int = 3, size: tuple[int, int] = (24, 32)) -> list[ImagePair]:
    """Ground truth and noisy predictions on disk, paired; returns the pairs."""
    rng = np.random.default_rng(11)
    for index in range(count):
        sharp = _smooth_image(*size, seed=index)
        noisy = np.clip(sharp + 0.05 * rng.standard_normal(sharp.shape), 0, 1)
        _write(tmp_path / "gt" / f"img{index}.png", sharp)
        _write(tmp_path / "pred" / f"img{index}.png", noisy)
    return attach_predictions(ground_truth_pairs(tmp_path / "gt"), tmp_path / "pred")


def _file_scores(pred: Path, gt: Path) -> tuple[float, float]:
    """PSNR and SSIM of two 8-bit RGB files computed by scikit-image."""
    restored = cv2.imread(str(pred))[:, :, ::-1] / 255.0
    reference = cv2.imread(str(gt))[:, :, ::-1] / 255.0
    return peak_signal_noise_ratio(reference, restored, data_range=1), _skimage_ssim(restored, reference)


def test_evaluate_pairs_scores_files(tmp_path):
    pairs = _scored_folder(tmp_path)

    report = evaluate_pairs(pairs, "gopro")

    assert report.ok
    assert report.overall.count == 3
    for pair, result in zip(pairs, report.results, strict=True):
        expected_psnr, expected_ssim = _file_scores(pair.pred, pair.gt)
        assert abs(result.psnr - expected_psnr) < 0.01
        assert abs(result.ssim - expected_ssim) < 0.001
    assert report.overall.psnr == pytest.approx(np.mean([r.psnr for r in report.results]))


def test_evaluate_pairs_unreadable_file_is_failure(tmp_path):
    pairs = _scored_folder(tmp_path)
    (tmp_path / "pred" / "img1.png").write_bytes(b"not an image")

    report = evaluate_pairs(pairs, "gopro")

    assert not report.ok
    assert [failure.name for failure in report.failures] == ["img1"]
    assert report.failures[0].path == str(tmp_path / "pred" / "img1.png")
    assert report.overall.count == 2


def test_evaluate_pairs_size_mismatch_is_failure(tmp_path):
    pairs = _scored_folder(tmp_path)
    _write(tmp_path / "pred" / "img2.png", _smooth_image(24, 30))

    report = evaluate_pairs(pairs, "gopro")

    assert [failure.name for failure in report.failures] == ["img2"]
    assert "30x24" in report.failures[0].error


class _ShiftDeblurrer:
    """A stand-in for the engine's Deblurrer: adds a constant to the input."""

    def __init__(self, offset: float):
        self.offset = offset
        self.calls = 0

    def deblur(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.clip(pixels + self.offset, 0, 1).astype(np.float32)


def test_evaluate_pairs_runs_deblurrer(tmp_path):
    for index in range(2):
        sharp = _smooth_image(20, 20, seed=index)
        _write(tmp_path / "gt" / f"{index}.png", sharp)
        _write(tmp_path / "blur" / f"{index}.png", sharp)
    pairs = pair_folders(tmp_path / "blur", tmp_path / "gt")
    tiled = _ShiftDeblurrer(0.02)
    untiled = _ShiftDeblurrer(0.0)

    report = evaluate_pairs(pairs, "gopro", deblurrer=tiled, untiled_deblurrer=untiled)

    assert tiled.calls == 2
    assert untiled.calls == 2
    assert report.results[0].psnr == pytest.approx(-20 * math.log10(5 / 255), abs=0.1)
    assert report.results[0].psnr_untiled == math.inf
    assert report.results[0].max_abs_difference == pytest.approx(5 / 255)


def test_evaluate_pairs_quantizes_restored_output(tmp_path):
    sharp = _smooth_image(20, 20)
    _write(tmp_path / "gt" / "a.png", sharp)
    _write(tmp_path / "blur" / "a.png", sharp)
    pairs = pair_folders(tmp_path / "blur", tmp_path / "gt")

    # An offset of 0.4 grey levels rounds back to the ground truth.
    report = evaluate_pairs(pairs, "gopro", deblurrer=_ShiftDeblurrer(0.4 / 255))

    assert report.results[0].psnr == math.inf


def test_evaluate_pairs_realblur_named(tmp_path):
    pairs = _scored_folder(tmp_path, count=1, size=(48, 48))

    report = evaluate_pairs(pairs, "realblur")

    assert report.protocol.name == "realblur"
    assert report.results[0].intensity_scale is not None


def test_evaluate_pairs_without_predictions_raises(tmp_path):
    _touch_image(tmp_path / "gt" / "a.png")

    with pytest.raises(ValueError, match="no prediction"):
        evaluate_pairs(ground_truth_pairs(tmp_path / "gt"), "gopro")


def test_shard_takes_every_world_th_pair(monkeypatch, tmp_path):
    import mbmamba_cli.metrics.evaluate as runner

    pairs = [ImagePair(name=f"{index:02d}", dataset="d", gt=tmp_path) for index in (3, 0, 4, 1, 2)]
    monkeypatch.setattr(runner, "rank_and_world", lambda: (1, 2))

    assert [pair.name for pair in shard_pairs(pairs)] == ["01", "03"]


def _free_port() -> int:
    """Ask the OS for a free TCP port on localhost for the test's own process group."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, pairs: list, queue) -> None:
    """Join a gloo group as `rank` and put this rank's report summary on `queue`."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        report = evaluate_pairs(pairs, "gopro")
        queue.put((rank, report.overall, [result.name for result in report.results]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_reduce_to_single_process(tmp_path):
    import torch.multiprocessing as mp

    pairs = _scored_folder(tmp_path, count=5)
    single = evaluate_pairs(pairs, "gopro")
    context = mp.get_context("spawn")
    queue = context.Queue()

    mp.start_processes(
        _distributed_worker,
        args=(2, _free_port(), pairs, queue),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    messages = [queue.get(timeout=120) for _ in range(2)]
    outputs = {rank: (overall, names) for rank, overall, names in messages}

    overall, names = outputs[0]
    assert overall.count == 5
    assert overall.psnr == pytest.approx(single.overall.psnr, abs=1e-9)
    assert overall.ssim == pytest.approx(single.overall.ssim, abs=1e-12)
    assert names == [result.name for result in single.results]
    assert outputs[1][0] == overall


def test_evaluate_pairs_16bit_files(tmp_path):
    rng = np.random.default_rng(12)
    reference = rng.integers(0, 65536, (20, 24, 3), dtype=np.uint16)
    restored = np.clip(reference.astype(np.int64) + rng.integers(-900, 900, reference.shape), 0, 65535)
    restored = restored.astype(np.uint16)
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    assert cv2.imwrite(str(tmp_path / "gt" / "a.png"), reference[:, :, ::-1])
    assert cv2.imwrite(str(tmp_path / "pred" / "a.png"), restored[:, :, ::-1])
    pairs = attach_predictions(ground_truth_pairs(tmp_path / "gt"), tmp_path / "pred")

    report = evaluate_pairs(pairs, "gopro")

    expected_psnr = peak_signal_noise_ratio(reference / 65535.0, restored / 65535.0, data_range=1)
    expected_ssim = _skimage_ssim(restored / 65535.0, reference / 65535.0)
    assert abs(report.results[0].psnr - expected_psnr) < 0.01
    assert abs(report.results[0].ssim - expected_ssim) < 0.001


class _FailingDeblurrer:
    """Raises the engine's DeblurError for inputs of one width, as an out-of-memory image would."""

    def __init__(self, failing_width: int):
        self.failing_width = failing_width

    def deblur(self, pixels: np.ndarray) -> np.ndarray:
        from mbmamba_cli.inference.engine import DeblurError

        if pixels.shape[1] == self.failing_width:
            raise DeblurError("out of memory even with 16x16 tiles")
        return pixels


def test_evaluate_pairs_deblur_error_is_failure(tmp_path):
    for name, width in (("narrow", 20), ("wide", 30)):
        sharp = _smooth_image(20, width)
        _write(tmp_path / "gt" / f"{name}.png", sharp)
        _write(tmp_path / "blur" / f"{name}.png", sharp)
    pairs = pair_folders(tmp_path / "blur", tmp_path / "gt")

    report = evaluate_pairs(pairs, "gopro", deblurrer=_FailingDeblurrer(30))

    assert [failure.name for failure in report.failures] == ["wide"]
    assert "out of memory" in report.failures[0].error
    assert [result.name for result in report.results] == ["narrow"]
