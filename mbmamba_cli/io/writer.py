"""Encode float RGB pixels the way an input image was stored, and write the file atomically."""

import contextlib
import io
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mbmamba_cli.io.encoders import ZLIB_LEVEL, encode_png16, encode_tiff
from mbmamba_cli.io.image_types import (
    FORMAT_BY_EXTENSION,
    GRAY16_MODES,
    SUPPORTED_EXTENSIONS,
    ImageWriteError,
    LoadedImage,
    PaletteInfo,
)
from mbmamba_cli.log import get_logger

logger = get_logger(__name__)

# Output modes each format can store, at 8 bits and at 16 bits per sample. A palette with
# transparency needs PNG's tRNS chunk. Pillow and OpenCV cannot read 16-bit gray + alpha
# TIFF, so that case is written as 16-bit RGBA. BMP has no RGBA here because Pillow reads
# 32-bit BMP files as RGB, without their alpha.
_MODES_8BIT = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA"),
    "TIFF": ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK"),
    "JPEG": ("L", "RGB", "CMYK"),
    "BMP": ("1", "L", "P", "RGB"),
    "WEBP": ("RGB", "RGBA"),
}
_MODES_16BIT = {"PNG": ("L", "LA", "RGB", "RGBA"), "TIFF": ("L", "RGB", "RGBA")}
_FORMATS_WITH_ICC = ("PNG", "JPEG", "TIFF", "WEBP")
_FORMATS_WITH_EXIF = ("PNG", "JPEG", "TIFF", "WEBP")
_GRAY_MODES = ("1", "L", "LA")
# Largest width or height each encoder accepts.
_MAX_SIDE = {"JPEG": 65_535, "WEBP": 16_383}

# ITU-R BT.601 luma weights, the ones Pillow uses to convert RGB to L.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Conversions that lose information are logged as a warning the first time and at debug
# level for later files, so a batch of a thousand JPEGs does not repeat the same line.
_warned_conversions: set[str] = set()


@dataclass(frozen=True)
class _OutputPlan:
    mode: str
    bit_depth: int
    composite_alpha: bool
    icc_profile: bytes | None
    exif: bytes | None


def write_image(
    path: str | os.PathLike[str],
    pixels: np.ndarray,
    like: LoadedImage,
    quality: int = 95,
) -> None:
    """Write float RGB pixels (h, w, 3) in [0, 1] the way `like` was stored.

    The output format follows the extension of `path` and may differ from the input's.
    The output keeps the input's mode, bit depth, alpha (re-attached unchanged), ICC
    profile and EXIF where that format can store them. Where it cannot, a log line
    reports what changed. Alpha that a format cannot store (JPEG, BMP) is composited onto
    white. Values are clipped to [0, 1] and rounded, and NaN is written as 0. `quality`
    (1 to 100) applies to JPEG and lossy WebP. A WebP input that was lossless is written
    lossless.

    The file is written to a temporary file in the same folder and renamed over `path`,
    so a crash never leaves a partial image. Missing parent folders are created.
    Raises ImageWriteError when the extension is not supported or writing fails, and
    ValueError when `pixels` do not match `like`.
    """
    path = Path(path)
    file_format = FORMAT_BY_EXTENSION.get(path.suffix.lower())
    if file_format is None:
        valid = ", ".join(SUPPORTED_EXTENSIONS)
        raise ImageWriteError(
            path, f"extension {path.suffix or '(none)'} is not supported; use one of {valid}"
        )
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be from 1 to 100, got {quality}")

    rgb = np.ascontiguousarray(_checked_pixels(path, pixels, like))
    _check_size_limit(path, file_format, like)
    plan = _plan_output(path, like, file_format)
    encoded = _encode(path, rgb, like, plan, file_format, quality)
    _replace_atomically(path, encoded)
    logger.debug(
        "%s: wrote %s %s %d-bit %dx%d (%d bytes)",
        path.name,
        file_format,
        plan.mode,
        plan.bit_depth,
        like.width,
        like.height,
        len(encoded),
    )


def _checked_pixels(path: Path, pixels: np.ndarray, like: LoadedImage) -> np.ndarray:
    """Return pixels as float32 (h, w, 3) clipped to [0, 1], with NaN replaced by 0."""
    if not isinstance(pixels, np.ndarray) or not np.issubdtype(pixels.dtype, np.floating):
        raise ValueError(f"pixels for {path} must be a float numpy array, got {type(pixels)}")
    expected = (like.height, like.width, 3)
    if pixels.shape != expected:
        raise ValueError(
            f"pixels for {path} have shape {pixels.shape} but the input {like.path.name} "
            f"needs {expected}"
        )

    rgb = pixels.astype(np.float32, copy=True)
    not_a_number = np.isnan(rgb)
    if not_a_number.any():
        logger.warning("%s: %d NaN values written as 0", path.name, int(not_a_number.sum()))
        rgb[not_a_number] = 0.0
    return np.clip(rgb, 0.0, 1.0, out=rgb)


def _check_size_limit(path: Path, file_format: str, like: LoadedImage) -> None:
    limit = _MAX_SIDE.get(file_format)
    if limit is not None and max(like.width, like.height) > limit:
        raise ImageWriteError(
            path,
            f"the image is {like.width}x{like.height} but {file_format} allows at most "
            f"{limit} pixels per side; write PNG or TIFF instead",
        )


def _layout(mode: str) -> str:
    """Map an input mode to the output mode that stores the same channels."""
    return "L" if mode in GRAY16_MODES else mode


def _plan_output(path: Path, like: LoadedImage, file_format: str) -> _OutputPlan:
    """Choose the output mode, bit depth and metadata, logging every change from the input."""
    input_layout = _layout(like.mode)
    has_alpha = like.alpha is not None
    mode = _storable_mode(input_layout, has_alpha, file_format)
    if like.bit_depth == 16 and file_format == "TIFF" and mode == "LA":
        mode = "RGBA"
    if mode != input_layout:
        logger.info(
            "%s: writing %s as %s because %s files cannot store it",
            path.name,
            like.mode,
            mode,
            file_format,
        )

    composite_alpha = has_alpha and mode not in ("LA", "RGBA", "P")
    if composite_alpha:
        _warn_once(
            f"alpha-{file_format}",
            "%s: %s files have no alpha channel; the image is composited onto white",
            path.name,
            file_format,
        )

    bit_depth = 8
    if like.bit_depth == 16:
        if mode in _MODES_16BIT.get(file_format, ()):
            bit_depth = 16
        else:
            _warn_once(
                f"16bit-{file_format}-{mode}",
                "%s: %s %s files store 8 bits per sample; writing 8-bit instead of 16-bit",
                path.name,
                file_format,
                mode,
            )

    return _OutputPlan(
        mode=mode,
        bit_depth=bit_depth,
        composite_alpha=composite_alpha,
        icc_profile=_icc_for_output(path, like.icc_profile, mode, file_format),
        exif=_exif_for_format(path, like.exif, file_format),
    )


def _storable_mode(input_layout: str, has_alpha: bool, file_format: str) -> str:
    """Return `input_layout` if the format can store it, else the closest mode it can store."""

    def storable(mode: str) -> bool:
        if mode == "P" and has_alpha and file_format != "PNG":
            return False
        return mode in _MODES_8BIT[file_format]

    if storable(input_layout):
        return input_layout
    gray = input_layout in _GRAY_MODES
    candidates = ["L", "RGB"] if gray else ["RGB"]
    if has_alpha:
        candidates = (["LA", "RGBA"] if gray else ["RGBA"]) + candidates
    return next(mode for mode in candidates if storable(mode))


def _icc_for_output(
    path: Path, icc_profile: bytes | None, mode: str, file_format: str
) -> bytes | None:
    if not icc_profile:
        return None
    if file_format not in _FORMATS_WITH_ICC:
        _warn_once(
            f"icc-{file_format}",
            "%s: %s files cannot store the ICC profile; colour-managed viewers may show "
            "different colours",
            path.name,
            file_format,
        )
        return None

    # ICC header bytes 16 to 20 name the colour space the profile expects.
    expected = b"RGB "
    if mode in _GRAY_MODES:
        expected = b"GRAY"
    elif mode == "CMYK":
        expected = b"CMYK"
    space = icc_profile[16:20]
    if space != expected:
        logger.warning(
            "%s: the ICC profile is for %r data but the output is %s; the profile is dropped",
            path.name,
            space.decode("latin-1").strip(),
            mode,
        )
        return None
    return icc_profile


def _exif_for_format(path: Path, exif: bytes | None, file_format: str) -> bytes | None:
    if exif and file_format not in _FORMATS_WITH_EXIF:
        logger.info("%s: %s files cannot store EXIF; it is not copied", path.name, file_format)
        return None
    return exif


def _warn_once(key: str, message: str, *args: object) -> None:
    if key in _warned_conversions:
        logger.debug(message, *args)
        return
    _warned_conversions.add(key)
    logger.warning(message + " (later files: debug log only)", *args)


def _encode(
    path: Path,
    rgb: np.ndarray,
    like: LoadedImage,
    plan: _OutputPlan,
    file_format: str,
    quality: int,
) -> bytes:
    if plan.composite_alpha and like.alpha is not None:
        coverage = like.alpha[:, :, None]
        rgb = rgb * coverage + (1.0 - coverage)

    try:
        if plan.bit_depth == 16 and file_format == "PNG":
            samples = _samples(rgb, like.alpha, plan.mode, np.uint16)
            return encode_png16(samples, plan.icc_profile, plan.exif)
        if file_format == "TIFF" and plan.mode in ("L", "LA", "RGB", "RGBA"):
            dtype = np.uint16 if plan.bit_depth == 16 else np.uint8
            samples = _samples(rgb, like.alpha, plan.mode, dtype)
            return encode_tiff(samples, plan.icc_profile, plan.exif)
        return _encode_with_pillow(rgb, like, plan, file_format, quality)
    except (OSError, ValueError) as error:
        raise ImageWriteError(path, f"the {file_format} encoder failed ({error})") from error


def _samples(rgb: np.ndarray, alpha: np.ndarray | None, mode: str, dtype: type) -> np.ndarray:
    """Quantise RGB (h, w, 3) and alpha (h, w) in [0, 1] to the channels of `mode`.

    Returns bool (h, w) for "1", (h, w) for "L", (h, w, 2) for "LA", (h, w, 3) for "RGB"
    and "CMYK" (converted later) and (h, w, 4) for "RGBA", in `dtype` (uint8 or uint16).
    """
    scale = float(np.iinfo(dtype).max)

    def quantise(values: np.ndarray) -> np.ndarray:
        return np.rint(values * scale).astype(dtype)

    if mode in _GRAY_MODES:
        gray = rgb @ _LUMA_WEIGHTS
        if mode == "1":
            return gray >= 0.5
        if mode == "L":
            return quantise(gray)
        return np.stack([quantise(gray), quantise(_required(alpha))], axis=2)
    if mode == "RGBA":
        return np.concatenate([quantise(rgb), quantise(_required(alpha))[:, :, None]], axis=2)
    return quantise(rgb)


def _required(alpha: np.ndarray | None) -> np.ndarray:
    if alpha is None:
        raise ValueError("an output mode with alpha was chosen for an image without alpha")
    return alpha


def _encode_with_pillow(
    rgb: np.ndarray, like: LoadedImage, plan: _OutputPlan, file_format: str, quality: int
) -> bytes:
    options: dict[str, object] = {}
    if plan.mode == "P":
        image, transparency = _palette_image(rgb, _required_palette(like))
        if transparency is not None:
            options["transparency"] = transparency
    else:
        image = Image.fromarray(_samples(rgb, like.alpha, plan.mode, np.uint8))
        if plan.mode == "CMYK":
            image = image.convert("CMYK")

    if plan.icc_profile:
        options["icc_profile"] = plan.icc_profile
    if plan.exif:
        options["exif"] = plan.exif
    if file_format == "PNG":
        # On a shared 2-core CPU, Pillow took 0.57 s at its default level 6 and 0.21 s at
        # level 3 to encode a 1280x720 photo, whose file grew by 5% at level 3.
        options["compress_level"] = ZLIB_LEVEL
    elif file_format == "JPEG":
        # 4:4:4 keeps chroma at full resolution, so sharpened colour edges stay sharp.
        options.update(quality=quality, subsampling=0)
    elif file_format == "WEBP":
        options.update(quality=quality, lossless=like.webp_lossless)

    output = io.BytesIO()
    image.save(output, format=file_format, **options)
    return output.getvalue()


def _required_palette(like: LoadedImage) -> PaletteInfo:
    if like.palette is None:
        raise ValueError(f"{like.path.name} has mode P but no palette was read")
    return like.palette


def _palette_image(rgb: np.ndarray, palette: PaletteInfo) -> tuple[Image.Image, int | bytes | None]:
    """Map RGB (h, w, 3) to the input's palette; return the P image and its tRNS value.

    Pixels whose input palette entry was transparent or translucent keep their index, so
    alpha is unchanged. The rest map to the nearest opaque entry, without dithering.
    """
    height, width = rgb.shape[:2]
    rgb8 = np.rint(rgb * 255.0).astype(np.uint8)
    opaque = np.flatnonzero(palette.alpha == 255)

    if opaque.size:
        table = Image.new("P", (1, 1))
        table.putpalette(palette.colors[opaque].ravel().tolist())
        quantized = Image.fromarray(rgb8).quantize(palette=table, dither=Image.Dither.NONE)
        nearest = np.asarray(quantized)
        indices = opaque[nearest].astype(np.uint8)
    else:
        indices = palette.indices.copy()
    see_through = palette.alpha[palette.indices] < 255
    indices[see_through] = palette.indices[see_through]

    image = Image.frombytes("P", (width, height), indices.tobytes())
    image.putpalette(palette.colors.ravel().tolist())

    # PNG tRNS: one fully transparent index as an int, any other alpha table as bytes.
    see_through_entries = np.flatnonzero(palette.alpha < 255)
    if see_through_entries.size == 0:
        return image, None
    if see_through_entries.size == 1 and palette.alpha[see_through_entries[0]] == 0:
        return image, int(see_through_entries[0])
    return image, palette.alpha[: see_through_entries[-1] + 1].tobytes()


def _replace_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a hidden temporary file next to `path`, then rename it over `path`."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ImageWriteError(
            path,
            f"the folder {folder} could not be created ({error.strerror}); choose an OUTPUT "
            "folder you can write to",
        ) from error
    if path.is_dir():
        raise ImageWriteError(path, "a folder with that name exists; choose another output name")

    # The temporary name starts with a dot so that input scans skip it, and is short so
    # that long output names cannot push it over the file name length limit. os.open
    # applies the umask like a normal file write.
    temporary = folder / f".mbmamba-{secrets.token_hex(8)}.tmp"
    try:
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
        )
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        hint = (
            "choose an OUTPUT folder you can write to"
            if isinstance(error, PermissionError)
            else "check free disk space and that the folder is writable"
        )
        raise ImageWriteError(path, f"{error.strerror or error}; {hint}") from error
