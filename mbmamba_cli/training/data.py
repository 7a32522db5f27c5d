"""Training datasets: blurred/sharp pairs from folders, and motion blur made on the fly.

Items are `(blurred, sharp)` float32 tensors of shape (3, p, p) with values in [0, 1], where
p is the patch size. Every random choice comes from a generator derived from
(seed, epoch, index), so an item is the same in the main process and in any DataLoader
worker, and never depends on the global numpy or torch random state.
"""

from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from mbmamba_cli.log import get_logger
from mbmamba_cli.training.blur import (
    apply_blur,
    load_kernels,
    random_camera_shake_kernel,
    random_kernel_size,
)

logger = get_logger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})

# Most mismatched names listed in one error message.
_MAX_LISTED = 10


# ---------------------------------------------------------------------------------------------
# Image files


def _list_images(folder: Path) -> list[Path]:
    """Return the image files under folder, searched recursively, sorted, without hidden ones."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def _read_raw(path: Path) -> np.ndarray:
    """Decode an image file as an (h, w, 3) RGB array in its stored dtype (uint8 or uint16).

    Gray images are repeated to three channels and alpha is dropped. Float images (some
    TIFFs) are returned as float32. EXIF orientation is not applied: both images of a
    training pair come from the same camera pipeline, so they stay aligned.
    """
    try:
        encoded = np.fromfile(path, np.uint8)
    except OSError as error:
        raise ValueError(f"failed to read training image {path}: {error}") from error
    data = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    if data is None:
        raise ValueError(
            f"failed to decode training image {path}. Check that it is a valid PNG, JPEG or TIFF"
        )

    if data.dtype not in (np.uint8, np.uint16):
        data = data.astype(np.float32)
    if data.ndim == 2:
        data = data[..., None]
    channels = data.shape[2]
    if channels in (1, 2):
        rgb = np.repeat(data[..., :1], 3, axis=2)
    elif channels in (3, 4):
        rgb = cv2.cvtColor(np.ascontiguousarray(data[..., :3]), cv2.COLOR_BGR2RGB)
    else:
        raise ValueError(f"training image {path} has {channels} channels, expected 1 to 4")
    return rgb


def _to_float(raw: np.ndarray) -> np.ndarray:
    """Convert a decoded array (uint8, uint16 or float) to float32 in [0, 1]."""
    if raw.dtype == np.uint8:
        return raw.astype(np.float32) / 255.0
    if raw.dtype == np.uint16:
        return raw.astype(np.float32) / 65535.0
    return np.clip(raw.astype(np.float32), 0.0, 1.0)


def _read_image_rgb(path: Path) -> np.ndarray:
    """Read an image file as (h, w, 3) float32 RGB in [0, 1] (16-bit divided by 65535)."""
    return _to_float(_read_raw(path))


# ---------------------------------------------------------------------------------------------
# Pair discovery


def _images_by_stem(folder: Path) -> dict[Path, Path]:
    """Map each image's path relative to folder, without its extension, to the file."""
    images: dict[Path, Path] = {}
    for path in _list_images(folder):
        key = path.relative_to(folder).with_suffix("")
        if key in images:
            raise ValueError(
                f"{images[key]} and {path} have the same name with different extensions. "
                "Keep one of them so the pair is unambiguous"
            )
        images[key] = path
    return images


def _format_names(paths: Iterable[Path]) -> str:
    paths = sorted(paths)
    listed = ", ".join(str(path) for path in paths[:_MAX_LISTED])
    if len(paths) > _MAX_LISTED:
        listed += f" and {len(paths) - _MAX_LISTED} more"
    return listed


def _match_folder_pair(blur_dir: Path, sharp_dir: Path) -> list[tuple[Path, Path]]:
    """Match the images of blur_dir and sharp_dir by relative path without extension."""
    if not blur_dir.is_dir() or not sharp_dir.is_dir():
        present, missing = (blur_dir, sharp_dir) if blur_dir.is_dir() else (sharp_dir, blur_dir)
        raise ValueError(f"{present} has no partner folder: {missing} is missing")

    blurred = _images_by_stem(blur_dir)
    sharp = _images_by_stem(sharp_dir)

    only_blurred = [blurred[key] for key in blurred.keys() - sharp.keys()]
    only_sharp = [sharp[key] for key in sharp.keys() - blurred.keys()]
    if only_blurred or only_sharp:
        problems = []
        if only_blurred:
            problems.append(
                f"blurred images with no sharp partner in {sharp_dir}: "
                f"{_format_names(only_blurred)}"
            )
        if only_sharp:
            problems.append(
                f"sharp images with no blurred partner in {blur_dir}: {_format_names(only_sharp)}"
            )
        raise ValueError(
            ". ".join(problems) + ". Pairs are matched by file name, so add the missing "
            "partners or remove the extra files"
        )

    return [(blurred[key], sharp[key]) for key in sorted(blurred)]


def find_pairs(root: Path | str) -> list[tuple[Path, Path]]:
    """Find blurred/sharp training pairs under root, matched by relative file name.

    Accepted layouts:
    - `root/blur/...` and `root/sharp/...` (plain).
    - `root/<scene>/blur/...` and `root/<scene>/sharp/...` (GoPro).
    - `root/train/<scene>/...` when root is the GoPro parent folder, and `test/` is ignored.
    Subfolders under blur/ and sharp/ are followed, and names are matched without their
    extension (png, jpg, jpeg, tif, tiff). A blurred image without a sharp partner, or the
    reverse, raises ValueError naming the files. Returns (blurred, sharp) paths, sorted.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"training data folder not found: {root}")

    if (root / "blur").is_dir() or (root / "sharp").is_dir():
        pairs = _match_folder_pair(root / "blur", root / "sharp")
        scene_count = 1
    else:
        if (root / "train").is_dir():
            logger.info("using the train/ split under %s", root)
            root = root / "train"

        scenes = sorted(
            child
            for child in root.iterdir()
            if child.is_dir() and ((child / "blur").is_dir() or (child / "sharp").is_dir())
        )
        if not scenes:
            raise ValueError(
                f"no blur/ and sharp/ folders found in {root}. Expected {root}/blur and "
                f"{root}/sharp, or {root}/<scene>/blur and {root}/<scene>/sharp"
            )
        pairs = []
        for scene in scenes:
            pairs.extend(_match_folder_pair(scene / "blur", scene / "sharp"))
        scene_count = len(scenes)

    if not pairs:
        raise ValueError(f"the blur/ and sharp/ folders under {root} contain no images")

    logger.info(
        "found %d blurred/sharp pairs in %d scene folders under %s", len(pairs), scene_count, root
    )
    return pairs


# ---------------------------------------------------------------------------------------------
# Cropping and augmentation


def _item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Create the generator for one item from (seed, epoch, index) only.

    It does not depend on the worker process or on the order of calls.
    """
    return np.random.default_rng([seed, epoch, index])


def _pad_to_size(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad image (h, w, c) at the bottom and right by reflection up to (height, width)."""
    pad_rows = max(0, height - image.shape[0])
    pad_cols = max(0, width - image.shape[1])
    if pad_rows == 0 and pad_cols == 0:
        return image
    # numpy reflects repeatedly when the pad is larger than the image. A 1-pixel side has
    # nothing to reflect, so it is repeated instead.
    mode = "reflect" if min(image.shape[:2]) > 1 else "edge"
    return np.pad(image, ((0, pad_rows), (0, pad_cols), (0, 0)), mode=mode)


def _random_flips(rng: np.random.Generator, *images: np.ndarray) -> list[np.ndarray]:
    """Flip all images horizontally and/or vertically, each flip with probability 0.5."""
    flip_horizontal = rng.random() < 0.5
    flip_vertical = rng.random() < 0.5
    flipped = []
    for image in images:
        if flip_horizontal:
            image = image[:, ::-1]
        if flip_vertical:
            image = image[::-1]
        flipped.append(image)
    return flipped


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """Convert (h, w, 3) float32 to a contiguous (3, h, w) tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


def _check_patch_size(patch_size: int | None, allow_none: bool) -> None:
    if patch_size is None and allow_none:
        return
    if patch_size is None or patch_size < 1:
        raise ValueError(f"patch_size must be a positive number of pixels, got {patch_size}")


class PairedFolderDataset(Dataset):
    """Blurred/sharp pairs from folders (see `find_pairs`), cropped to aligned random patches.

    Each item reads both images, pads them by reflection when they are smaller than the patch,
    takes the same random (p, p) crop from both and, with augment, flips both at random.
    patch_size None returns whole images (use batch size 1 then). Items depend on
    (seed, epoch, index) only. Call `set_epoch` at the start of every epoch for new crops.
    """

    def __init__(
        self, root: Path | str, patch_size: int | None, augment: bool = True, seed: int = 0
    ) -> None:
        _check_patch_size(patch_size, allow_none=True)
        self.root = Path(root)
        self.patch_size = patch_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.pairs = find_pairs(self.root)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch, which changes every crop and flip.

        DataLoader workers copy the dataset when an iterator starts, so call this before
        iterating. With persistent_workers=True the workers keep the epoch they started with.
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        blur_path, sharp_path = self.pairs[index]
        blurred = _read_image_rgb(blur_path)
        sharp = _read_image_rgb(sharp_path)
        if blurred.shape != sharp.shape:
            raise ValueError(
                f"pair sizes differ: {blur_path} is {blurred.shape[1]}x{blurred.shape[0]} but "
                f"{sharp_path} is {sharp.shape[1]}x{sharp.shape[0]}. A pair must have the same size"
            )

        rng = _item_rng(self.seed, self.epoch, index)

        if self.patch_size is not None:
            size = self.patch_size
            blurred = _pad_to_size(blurred, size, size)
            sharp = _pad_to_size(sharp, size, size)

            top = int(rng.integers(0, blurred.shape[0] - size + 1))
            left = int(rng.integers(0, blurred.shape[1] - size + 1))
            blurred = blurred[top : top + size, left : left + size]
            sharp = sharp[top : top + size, left : left + size]

        if self.augment:
            blurred, sharp = _random_flips(rng, blurred, sharp)

        return _to_tensor(blurred), _to_tensor(sharp)


# ---------------------------------------------------------------------------------------------
# Synthetic blur


class _ImageCache:
    """Least-recently-used cache of decoded images, bounded by their total size in bytes.

    Decoded arrays keep their stored dtype (uint8 takes a quarter of float32). Each DataLoader
    worker process has its own cache.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Path, np.ndarray] = OrderedDict()
        self.total_bytes = 0

    def get(self, path: Path) -> np.ndarray:
        if path in self.entries:
            self.entries.move_to_end(path)
            return self.entries[path]

        image = _read_raw(path)
        if image.nbytes <= self.max_bytes:
            self.entries[path] = image
            self.total_bytes += image.nbytes
            while self.total_bytes > self.max_bytes:
                _, evicted = self.entries.popitem(last=False)
                self.total_bytes -= evicted.nbytes
        return image


class SyntheticBlurDataset(Dataset):
    """Motion-blurred patches made on the fly from sharp images.

    Each item is made in these steps:
    1. pick a sharp image from all png/jpg/jpeg/tif/tiff files under sharp_dir.
    2. pick a kernel: a published one from kernels_dir with probability kernel_prob, else a
       generated camera-shake kernel of 7 to 35 px.
    3. crop a random (p + 2m, p + 2m) region, where m is the kernel radius.
    4. blur the region with `apply_blur`.
    5. keep the centre (p, p) of the blurred and the sharp region, so no blurred pixel
       depends on the border handling.
    6. flip both at random.

    noise is the range of the read-noise standard deviation and of the shot-noise standard
    deviation at white (see `apply_blur`). JPEG re-compression (quality in jpeg_quality) is
    applied with probability jpeg_prob, and highlight saturation with saturation_prob.
    One epoch has samples_per_epoch items. Decoded images are kept in an LRU cache of
    cache_mb megabytes per process.
    """

    def __init__(
        self,
        sharp_dir: Path | str,
        patch_size: int,
        kernels_dir: Path | str | None = None,
        kernel_prob: float = 0.3,
        linear_light: bool = False,
        noise: tuple[float, float] = (0.0, 0.02),
        jpeg_prob: float = 0.3,
        jpeg_quality: tuple[int, int] = (60, 95),
        saturation_prob: float = 0.2,
        saturation_gain: tuple[float, float] = (1.5, 4.0),
        samples_per_epoch: int = 1000,
        seed: int = 0,
        cache_mb: int = 512,
    ) -> None:
        _check_patch_size(patch_size, allow_none=False)
        for name, probability in (
            ("kernel_prob", kernel_prob),
            ("jpeg_prob", jpeg_prob),
            ("saturation_prob", saturation_prob),
        ):
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {probability}")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        if not 0.0 <= noise[0] <= noise[1]:
            raise ValueError(
                f"noise must be a range (low, high) with 0 <= low <= high, got {noise}"
            )
        if not 1 <= jpeg_quality[0] <= jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must be a range within 1 to 100, got {jpeg_quality}")

        self.sharp_dir = Path(sharp_dir)
        if not self.sharp_dir.is_dir():
            raise FileNotFoundError(f"sharp image folder not found: {self.sharp_dir}")
        self.images = _list_images(self.sharp_dir)
        if not self.images:
            raise ValueError(
                f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {self.sharp_dir}"
            )

        self.kernels = load_kernels(kernels_dir) if kernels_dir is not None else []
        if not self.kernels:
            kernel_prob = 0.0

        self.patch_size = patch_size
        self.kernel_prob = kernel_prob
        self.linear_light = linear_light
        self.noise = noise
        self.jpeg_prob = jpeg_prob
        self.jpeg_quality = jpeg_quality
        self.saturation_prob = saturation_prob
        self.saturation_gain = saturation_gain
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.epoch = 0
        self.cache = _ImageCache(cache_mb * 1024 * 1024)

        logger.info(
            "synthetic blur: %d sharp images under %s, %d published kernels (used with "
            "probability %.2f, else generated), %s blur, noise %s, JPEG probability %.2f, "
            "saturation probability %.2f, %d samples per epoch of %dx%d patches",
            len(self.images),
            self.sharp_dir,
            len(self.kernels),
            kernel_prob,
            "linear-light" if linear_light else "sRGB-value",
            noise,
            jpeg_prob,
            saturation_prob,
            samples_per_epoch,
            patch_size,
            patch_size,
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch, which changes every image choice, kernel, crop and noise draw.

        DataLoader workers copy the dataset when an iterator starts, so call this before
        iterating. With persistent_workers=True the workers keep the epoch they started with.
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _pick_kernel(self, rng: np.random.Generator) -> np.ndarray:
        """Return a published kernel (randomly rotated or mirrored) or a generated one."""
        if self.kernels and rng.random() < self.kernel_prob:
            kernel = self.kernels[int(rng.integers(len(self.kernels)))]
            kernel = np.rot90(kernel, int(rng.integers(4)))
            if rng.random() < 0.5:
                kernel = kernel.T
            return np.ascontiguousarray(kernel)
        return random_camera_shake_kernel(random_kernel_size(rng), rng)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"index {index} out of range for {self.samples_per_epoch} samples")
        rng = _item_rng(self.seed, self.epoch, index)

        path = self.images[int(rng.integers(len(self.images)))]
        kernel = self._pick_kernel(rng)
        margin = max(kernel.shape) // 2
        size = self.patch_size
        region_size = size + 2 * margin

        # Crop the raw region first so only the region is converted to float.
        raw = self.cache.get(path)
        raw = _pad_to_size(raw, region_size, region_size)
        top = int(rng.integers(0, raw.shape[0] - region_size + 1))
        left = int(rng.integers(0, raw.shape[1] - region_size + 1))
        region = _to_float(raw[top : top + region_size, left : left + region_size])

        use_jpeg = rng.random() < self.jpeg_prob
        use_saturation = rng.random() < self.saturation_prob
        blurred = apply_blur(
            region,
            kernel,
            rng,
            linear_light=self.linear_light,
            noise_sigma=self.noise,
            shot_noise=self.noise,
            jpeg_quality=self.jpeg_quality if use_jpeg else None,
            saturation_gain=self.saturation_gain if use_saturation else None,
        )

        blurred = blurred[margin : margin + size, margin : margin + size]
        sharp = region[margin : margin + size, margin : margin + size]
        blurred, sharp = _random_flips(rng, blurred, sharp)
        return _to_tensor(blurred), _to_tensor(sharp)
