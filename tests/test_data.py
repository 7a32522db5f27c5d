"""Tests for the training datasets: pair discovery, aligned crops, synthetic blur determinism."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mbmamba_cli.training.data import (
    PairedFolderDataset,
    SyntheticBlurDataset,
    _ImageCache,
    _read_image_rgb,
    find_pairs,
)

DATA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def _pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Return an 8-bit BGR image where every pixel differs from its neighbours."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _make_plain(root: Path, names: list[str], size: tuple[int, int] = (12, 10)) -> None:
    for name in names:
        _write(root / "blur" / name, _pattern(*size))
        _write(root / "sharp" / name, _pattern(*size))


def test_find_pairs_plain_layout(tmp_path):
    _make_plain(tmp_path, ["b.png", "a.png", "c.jpg"])

    pairs = find_pairs(tmp_path)

    assert [blur.name for blur, _ in pairs] == ["a.png", "b.png", "c.jpg"]
    for blur, sharp in pairs:
        assert blur.parent == tmp_path / "blur"
        assert sharp.parent == tmp_path / "sharp"
        assert blur.name == sharp.name


def test_find_pairs_gopro_layout(tmp_path):
    for scene in ("GOPR0001", "GOPR0002"):
        _make_plain(tmp_path / "train" / scene, ["000001.png", "000002.png"])
    _make_plain(tmp_path / "test" / "GOPR0099", ["000001.png"])

    from_parent = find_pairs(tmp_path)
    from_train = find_pairs(tmp_path / "train")

    assert len(from_parent) == 4
    assert from_parent == from_train
    assert all(blur.relative_to(tmp_path).parts[0] == "train" for blur, _ in from_parent)
    for blur, sharp in from_parent:
        assert blur.parent.parent == sharp.parent.parent
        assert blur.name == sharp.name


def test_find_pairs_matches_by_name_not_index(tmp_path):
    # Matching by sorted index would pair a.png with b.png. Matching by name must reject them.
    _write(tmp_path / "blur" / "a.png", _pattern(4, 4))
    _write(tmp_path / "sharp" / "b.png", _pattern(4, 4))

    with pytest.raises(ValueError) as error:
        find_pairs(tmp_path)

    assert "a.png" in str(error.value)
    assert "b.png" in str(error.value)


def test_find_pairs_missing_partner_names_file(tmp_path):
    _make_plain(tmp_path, ["a.png", "b.png"])
    _write(tmp_path / "blur" / "orphan.png", _pattern(4, 4))

    with pytest.raises(ValueError, match="orphan.png"):
        find_pairs(tmp_path)


def test_find_pairs_extra_sharp_names_file(tmp_path):
    _make_plain(tmp_path / "scene1", ["a.png"])
    _write(tmp_path / "scene1" / "sharp" / "extra.png", _pattern(4, 4))

    with pytest.raises(ValueError, match="extra.png"):
        find_pairs(tmp_path)


def test_find_pairs_other_extension_pairs(tmp_path):
    _write(tmp_path / "blur" / "a.jpg", _pattern(4, 4))
    _write(tmp_path / "sharp" / "a.png", _pattern(4, 4))

    pairs = find_pairs(tmp_path)

    assert len(pairs) == 1
    assert pairs[0][0].suffix == ".jpg"
    assert pairs[0][1].suffix == ".png"


def test_find_pairs_ignores_non_images(tmp_path):
    _make_plain(tmp_path, ["a.png"])
    (tmp_path / "blur" / "notes.txt").write_text("ignored")
    (tmp_path / "sharp" / ".DS_Store").write_bytes(b"ignored")

    assert len(find_pairs(tmp_path)) == 1


def test_find_pairs_missing_sharp_folder(tmp_path):
    _write(tmp_path / "scene" / "blur" / "a.png", _pattern(4, 4))

    with pytest.raises(ValueError, match="sharp is missing"):
        find_pairs(tmp_path)


def test_find_pairs_empty_root(tmp_path):
    with pytest.raises(ValueError, match="no blur/ and sharp/ folders"):
        find_pairs(tmp_path)


def test_find_pairs_real_levin():
    root = DATA_DIR / "real" / "levin09"
    if not root.is_dir():
        pytest.skip(f"shared real pairs not found at {root}")

    pairs = find_pairs(root)

    assert len(pairs) == 24
    assert all(blur.name == sharp.name for blur, sharp in pairs)


def test_read_image_gray_alpha_16bit(tmp_path):
    gray = np.full((3, 4), 51, dtype=np.uint8)
    bgra = np.zeros((3, 4, 4), dtype=np.uint8)
    bgra[..., 2] = 255
    bgra[..., 3] = 10
    deep = np.full((3, 4, 3), 65535, dtype=np.uint16)
    _write(tmp_path / "gray.png", gray)
    _write(tmp_path / "bgra.png", bgra)
    _write(tmp_path / "deep.png", deep)

    gray_rgb = _read_image_rgb(tmp_path / "gray.png")
    red = _read_image_rgb(tmp_path / "bgra.png")
    white = _read_image_rgb(tmp_path / "deep.png")

    assert gray_rgb.shape == (3, 4, 3)
    np.testing.assert_allclose(gray_rgb, 0.2, atol=1e-6)
    assert red.shape == (3, 4, 3)
    np.testing.assert_allclose(red[..., 0], 1.0)
    np.testing.assert_allclose(red[..., 2], 0.0)
    np.testing.assert_allclose(white, 1.0)


def test_read_image_invalid_file_names_it(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image")

    with pytest.raises(ValueError, match="broken.png"):
        _read_image_rgb(path)


def test_paired_crops_aligned(tmp_path):
    # Identical blurred and sharp images: any misaligned crop or flip would differ.
    for name, seed in (("a.png", 1), ("b.png", 2)):
        image = _pattern(40, 33, seed)
        _write(tmp_path / "blur" / name, image)
        _write(tmp_path / "sharp" / name, image)
    dataset = PairedFolderDataset(tmp_path, patch_size=16, augment=True, seed=3)

    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            blurred, sharp = dataset[index]
            assert blurred.shape == (3, 16, 16)
            assert blurred.dtype == torch.float32
            assert torch.equal(blurred, sharp)


def test_paired_crop_is_part_of_image(tmp_path):
    image = _pattern(30, 30, 5)
    _write(tmp_path / "blur" / "a.png", image)
    _write(tmp_path / "sharp" / "a.png", image)
    rgb = image[..., ::-1].astype(np.float32) / 255.0
    dataset = PairedFolderDataset(tmp_path, patch_size=8, augment=False, seed=0)

    blurred, _ = dataset[0]
    patch = blurred.numpy().transpose(1, 2, 0)
    windows = np.lib.stride_tricks.sliding_window_view(rgb, (8, 8, 3))[..., 0, :, :, :]
    matches = np.all(np.isclose(windows, patch), axis=(2, 3, 4))

    assert matches.sum() == 1


def test_paired_crops_change_with_epoch(tmp_path):
    image = _pattern(64, 64, 4)
    _write(tmp_path / "blur" / "a.png", image)
    _write(tmp_path / "sharp" / "a.png", image)
    dataset = PairedFolderDataset(tmp_path, patch_size=8, seed=0)

    crops = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        crops.append(dataset[0][0])

    assert any(not torch.equal(crops[0], crop) for crop in crops[1:])


def test_paired_small_image_padded(tmp_path):
    image = _pattern(5, 7, 6)
    _write(tmp_path / "blur" / "a.png", image)
    _write(tmp_path / "sharp" / "a.png", image)
    dataset = PairedFolderDataset(tmp_path, patch_size=16, seed=0)

    blurred, sharp = dataset[0]

    assert blurred.shape == (3, 16, 16)
    assert torch.equal(blurred, sharp)


def test_paired_size_mismatch_names_files(tmp_path):
    _write(tmp_path / "blur" / "a.png", _pattern(10, 10))
    _write(tmp_path / "sharp" / "a.png", _pattern(10, 12))
    dataset = PairedFolderDataset(tmp_path, patch_size=4)

    with pytest.raises(ValueError, match="pair sizes differ"):
        dataset[0]


def test_paired_whole_image_without_patch(tmp_path):
    _make_plain(tmp_path, ["a.png"], size=(12, 10))
    dataset = PairedFolderDataset(tmp_path, patch_size=None, augment=False)

    blurred, _ = dataset[0]

    assert blurred.shape == (3, 12, 10)


def _make_sharp_folder(root: Path) -> Path:
    sharp_dir = root / "sharp"
    _write(sharp_dir / "one.png", _pattern(40, 48, 1))
    _write(sharp_dir / "nested" / "two.jpg", _pattern(30, 36, 2))
    _write(sharp_dir / "three.tif", _pattern(20, 20, 3))
    return sharp_dir


def _make_kernel_folder(root: Path) -> Path:
    kernel = np.zeros((7, 7), dtype=np.uint8)
    kernel[3, 1:6] = 255
    _write(root / "kernels" / "line.png", kernel)
    return root / "kernels"


def test_synthetic_items_shape_and_range(tmp_path):
    dataset = SyntheticBlurDataset(_make_sharp_folder(tmp_path), patch_size=24, samples_per_epoch=6)

    for index in range(len(dataset)):
        blurred, sharp = dataset[index]
        assert blurred.shape == (3, 24, 24)
        assert sharp.shape == (3, 24, 24)
        assert blurred.dtype == torch.float32
        assert blurred.min().item() >= 0.0
        assert blurred.max().item() <= 1.0
        assert not torch.equal(blurred, sharp)


def test_synthetic_same_seed_same_item(tmp_path):
    sharp_dir = _make_sharp_folder(tmp_path)
    kernels_dir = _make_kernel_folder(tmp_path)
    options = {"patch_size": 16, "kernels_dir": kernels_dir, "kernel_prob": 0.5, "seed": 9}
    first = SyntheticBlurDataset(sharp_dir, **options)
    second = SyntheticBlurDataset(sharp_dir, **options)

    for index in (0, 5, 17):
        first_blurred, first_sharp = first[index]
        second_blurred, second_sharp = second[index]
        assert torch.equal(first_blurred, second_blurred)
        assert torch.equal(first_sharp, second_sharp)


def test_synthetic_independent_of_call_order(tmp_path):
    dataset = SyntheticBlurDataset(_make_sharp_folder(tmp_path), patch_size=16, seed=1)

    forward = [dataset[index][0] for index in range(4)]
    backward = [dataset[index][0] for index in reversed(range(4))][::-1]

    for first, second in zip(forward, backward, strict=True):
        assert torch.equal(first, second)


def test_synthetic_differs_by_seed_and_epoch(tmp_path):
    sharp_dir = _make_sharp_folder(tmp_path)
    base = SyntheticBlurDataset(sharp_dir, patch_size=16, seed=0)
    other_seed = SyntheticBlurDataset(sharp_dir, patch_size=16, seed=1)
    reference = base[0][0]

    base.set_epoch(1)

    assert not torch.equal(reference, other_seed[0][0])
    assert not torch.equal(reference, base[0][0])


def test_synthetic_dataloader_two_workers(tmp_path):
    dataset = SyntheticBlurDataset(
        _make_sharp_folder(tmp_path),
        patch_size=16,
        kernels_dir=_make_kernel_folder(tmp_path),
        samples_per_epoch=8,
        seed=4,
    )
    dataset.set_epoch(2)
    expected = [dataset[index] for index in range(len(dataset))]

    loader = DataLoader(dataset, batch_size=2, shuffle=False, num_workers=2)
    batches = list(loader)
    blurred = torch.cat([batch[0] for batch in batches])
    sharp = torch.cat([batch[1] for batch in batches])

    assert blurred.shape == (8, 3, 16, 16)
    assert torch.equal(blurred, torch.stack([item[0] for item in expected]))
    assert torch.equal(sharp, torch.stack([item[1] for item in expected]))


def test_synthetic_sharp_is_source_crop(tmp_path):
    # The sharp patch must be an unmodified crop of the source image (up to a flip).
    sharp_dir = tmp_path / "sharp"
    image = _pattern(32, 32, 8)
    _write(sharp_dir / "only.png", image)
    rgb = image[..., ::-1].astype(np.float32) / 255.0
    dataset = SyntheticBlurDataset(sharp_dir, patch_size=8, samples_per_epoch=4, seed=2)

    for index in range(len(dataset)):
        patch = dataset[index][1].numpy().transpose(1, 2, 0)
        candidates = [patch, patch[::-1], patch[:, ::-1], patch[::-1, ::-1]]
        windows = np.lib.stride_tricks.sliding_window_view(rgb, (8, 8, 3))[..., 0, :, :, :]
        found = any(np.all(np.isclose(windows, c), axis=(2, 3, 4)).any() for c in candidates)
        assert found


def test_synthetic_empty_folder_raises(tmp_path):
    (tmp_path / "readme.txt").write_text("no images")

    with pytest.raises(ValueError, match="no images"):
        SyntheticBlurDataset(tmp_path, patch_size=16)


def test_synthetic_rejects_bad_probability(tmp_path):
    with pytest.raises(ValueError, match="jpeg_prob"):
        SyntheticBlurDataset(_make_sharp_folder(tmp_path), patch_size=16, jpeg_prob=1.5)


def test_synthetic_cache_is_bounded(tmp_path):
    dataset = SyntheticBlurDataset(
        _make_sharp_folder(tmp_path), patch_size=8, samples_per_epoch=20, cache_mb=0
    )

    for index in range(len(dataset)):
        dataset[index]

    assert dataset.cache.total_bytes == 0
    assert len(dataset.cache.entries) == 0


def test_image_cache_evicts_least_recent(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _write(tmp_path / name, _pattern(10, 10))
    cache = _ImageCache(max_bytes=2 * 10 * 10 * 3)

    cache.get(tmp_path / "a.png")
    cache.get(tmp_path / "b.png")
    cache.get(tmp_path / "a.png")
    cache.get(tmp_path / "c.png")

    assert list(cache.entries) == [tmp_path / "a.png", tmp_path / "c.png"]
    assert cache.total_bytes == 600
