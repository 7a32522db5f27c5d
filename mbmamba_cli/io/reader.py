"""Decode image files into float RGB pixels plus what is needed to write them back.

Pillow decodes every file and reads the metadata, except 16-bit RGB, RGBA and gray + alpha
PNG and TIFF, which Pillow reduces to 8 bits: OpenCV decodes their samples. The bit depth
comes from the decoded array's dtype, never from the pixel values.
"""

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from mbmamba_cli.io.image_types import (
    GRAY16_MODES,
    SUPPORTED_FORMATS,
    ImageReadError,
    LoadedImage,
    PaletteInfo,
)
from mbmamba_cli.log import get_logger

logger = get_logger(__name__)

# Pillow opens multi-picture JPEGs from phone cameras as "MPO"; the first picture is a JPEG.
_FORMAT_ALIASES = {"MPO": "JPEG"}

_ORIENTATION_TAG = ExifTags.Base.Orientation
_EXIF_WIDTH_TAG = ExifTags.Base.ExifImageWidth
_EXIF_HEIGHT_TAG = ExifTags.Base.ExifImageHeight
# TIFF tags that describe how the input file stores its pixels. Pillow returns them as part
# of a TIFF's EXIF, but copied into another file they would describe the wrong data.
_TIFF_LAYOUT_TAGS = frozenset(
    {
        254, 255, 256, 257, 258, 259, 262, 263, 264, 265, 266, 273, 277, 278, 279, 280, 281,
        284, 290, 291, 292, 293, 317, 318, 319, 320, 322, 323, 324, 325, 330, 332, 338, 339,
        340, 341, 347, 512, 513, 514, 515, 517, 518, 519, 520, 521, 529, 530, 531, 532,
        34675,  # ICC profile: kept separately in LoadedImage.icc_profile
        37724,  # Photoshop layer data, which would no longer match the pixels
    }
)


@dataclass
class _Decoded:
    """Samples from the decoder: `color` (h, w) gray or (h, w, 3) RGB, uint8 or uint16."""

    color: np.ndarray
    alpha: np.ndarray | None
    mode: str
    palette: PaletteInfo | None = None


def read_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Decode an image file into float RGB pixels, alpha and the metadata to write it back.

    Raises ImageReadError when the file is missing, a folder, empty, unreadable, damaged,
    animated or not a PNG, JPEG, TIFF, BMP or WebP image.
    """
    path = Path(path)
    data = _read_file_bytes(path)
    # Pillow 13 and OpenCV 5 both rotate TIFFs by their orientation tag while decoding.
    # Decoding a copy whose tag is 1 leaves one rotation, below, for every format and decoder.
    data, tiff_orientation = _reset_tiff_orientation(data)
    image = _open_with_pillow(path, data)

    with image:
        file_format = _FORMAT_ALIASES.get(image.format or "", image.format or "unknown")
        if file_format not in SUPPORTED_FORMATS:
            raise ImageReadError(
                path,
                f"{file_format} images are not supported; convert it to PNG, JPEG, TIFF, BMP "
                "or WebP",
            )
        # Before anything that loads the image: loading empties the tile list this reads.
        hidden_layout = _hidden_16bit_layout(image) if file_format in ("PNG", "TIFF") else None
        _check_frames(path, image, file_format)
        exif = _read_exif(path, image)
        if tiff_orientation is not None:
            orientation = _orientation(path, tiff_orientation)
        else:
            orientation = _orientation(path, exif.get(_ORIENTATION_TAG, 1) if exif else 1)
        icc_profile = image.info.get("icc_profile") or None
        decoded = _decode(path, image, data, file_format, hidden_layout)

    color = _apply_orientation(decoded.color, orientation)
    alpha = None if decoded.alpha is None else _apply_orientation(decoded.alpha, orientation)
    palette = decoded.palette
    if palette is not None:
        palette.indices = _apply_orientation(palette.indices, orientation)

    # Bit depth from the dtype: a 16-bit file whose values all fit in 8 bits stays 16-bit.
    bit_depth = color.dtype.itemsize * 8
    pixels = _to_unit_float(color)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    height, width = pixels.shape[:2]
    if orientation != 1:
        logger.debug("%s: applied EXIF orientation %d", path.name, orientation)

    return LoadedImage(
        path=path,
        pixels=pixels,
        alpha=None if alpha is None else _to_unit_float(alpha),
        mode=decoded.mode,
        bit_depth=bit_depth,
        icc_profile=icc_profile,
        exif=_exif_for_output(path, exif, file_format, width, height),
        format=file_format,
        palette=palette,
        webp_lossless=file_format == "WEBP" and _is_lossless_webp(data),
    )


def _read_file_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise ImageReadError(
            path,
            "it is a folder, not an image file; pass the folder as INPUT to deblur the images "
            "inside it",
        )
    if path.exists() and not path.is_file():
        # Reading a pipe or a device could block or never end.
        raise ImageReadError(path, "not a regular file; give the path of an image file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(path, "file not found; check the path") from None
    except PermissionError:
        reason = "permission denied; give your user read access to the file"
        raise ImageReadError(path, reason) from None
    except OSError as error:
        raise ImageReadError(path, f"the file could not be read ({error.strerror})") from error
    if not data:
        raise ImageReadError(path, "the file is empty (0 bytes); copy or export it again")
    return data


def _open_with_pillow(path: Path, data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageReadError(
            path,
            "not a PNG, JPEG, TIFF, BMP or WebP image, or its header is damaged; check that "
            "the file is an image and open it in an image viewer",
        ) from None
    except Image.DecompressionBombError as error:
        raise ImageReadError(
            path, f"{error}; split the image into smaller parts before deblurring"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        reason = f"the file is damaged ({error}); copy or export it again"
        raise ImageReadError(path, reason) from error


def _check_frames(path: Path, image: Image.Image, file_format: str) -> None:
    frames = getattr(image, "n_frames", 1)
    if frames == 1:
        return
    if file_format in ("WEBP", "PNG"):
        raise ImageReadError(
            path,
            f"animated images ({frames} frames) are not supported; extract the frames to "
            "separate files first",
        )
    logger.info("%s: the file contains %d images; deblurring the first one", path.name, frames)


def _read_exif(path: Path, image: Image.Image) -> Image.Exif | None:
    try:
        return image.getexif()
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error) as error:
        logger.warning("%s: EXIF could not be parsed (%s); it is not copied", path.name, error)
        return None


def _orientation(path: Path, value: object) -> int:
    """Return an EXIF orientation tag value as 1 to 8, or 1 with a warning when invalid."""
    if value not in range(1, 9):
        logger.warning(
            "%s: EXIF orientation %r is invalid (valid: 1 to 8); the image is not rotated",
            path.name,
            value,
        )
        return 1
    return int(value)


def _exif_for_output(
    path: Path, exif: Image.Exif | None, file_format: str, width: int, height: int
) -> bytes | None:
    """Encode the EXIF to copy into outputs: orientation 1, sizes of the upright image."""
    if exif is None or len(exif) == 0:
        return None
    if file_format == "TIFF":
        for tag in _TIFF_LAYOUT_TAGS.intersection(exif):
            del exif[tag]
    if _ORIENTATION_TAG in exif:
        exif[_ORIENTATION_TAG] = 1

    # get_ifd would add an empty EXIF sub-IFD to the output if the input had none.
    if ExifTags.IFD.Exif in exif:
        exif_ifd = exif.get_ifd(ExifTags.IFD.Exif)
        if _EXIF_WIDTH_TAG in exif_ifd:
            exif_ifd[_EXIF_WIDTH_TAG] = width
        if _EXIF_HEIGHT_TAG in exif_ifd:
            exif_ifd[_EXIF_HEIGHT_TAG] = height
    if len(exif) == 0:
        return None

    try:
        return exif.tobytes()
    except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
        logger.warning("%s: EXIF could not be re-encoded (%s); it is not copied", path.name, error)
        return None


def _decode(
    path: Path, image: Image.Image, data: bytes, file_format: str, hidden_layout: str | None
) -> _Decoded:
    if hidden_layout in ("RGB", "RGBA", "LA"):
        return _decode_16bit_with_opencv(path, data, file_format, hidden_layout, image.size)
    if hidden_layout is not None:
        # NOTE: 16-bit CMYK and other rare 16-bit layouts are read with 8 bits per sample.
        logger.warning("%s: 16-bit %s is read with 8 bits per sample", path.name, hidden_layout)

    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageReadError(
            path, f"{error}; split the image into smaller parts before deblurring"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise ImageReadError(
            path, f"the file is truncated or damaged ({error}); copy or export it again"
        ) from error
    return _pixels_from_pillow(path, image)


def _hidden_16bit_layout(image: Image.Image) -> str | None:
    """Return the layout ("RGB", "LA", ...) of 16-bit PNG or TIFF samples Pillow reduces to 8 bits.

    Pillow keeps 16-bit gray as mode "I;16", but stores 16-bit RGB, RGBA and gray + alpha
    in 8-bit modes. Its decoder's raw mode ("RGB;16B", "LA;16B", ...) still shows the
    file's sample size. The tile list is empty once the image is loaded.
    """
    for tile in image.tile:
        # PNG tiles carry the raw mode as a string, TIFF tiles as the first item of a tuple.
        rawmode = tile.args
        if isinstance(rawmode, tuple) and rawmode:
            rawmode = rawmode[0]
        if not isinstance(rawmode, str):
            continue
        layout, _, sample = rawmode.partition(";")
        if sample.startswith("16") and image.mode not in GRAY16_MODES:
            return layout
    return None


def _decode_16bit_with_opencv(
    path: Path, data: bytes, file_format: str, layout: str, size: tuple[int, int]
) -> _Decoded:
    # Imported here so that 8-bit images and `--help` do not pay for loading OpenCV.
    import cv2

    # `data` of a TIFF has orientation 1 already: OpenCV's TIFF decoder would otherwise
    # rotate it even with IMREAD_UNCHANGED, and the caller rotates it too.
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ImageReadError(
            path,
            f"the file is truncated or damaged (OpenCV could not decode its 16-bit {layout} "
            "samples); copy or export it again",
        )

    width, height = size
    if decoded.shape[:2] != (height, width):
        raise ImageReadError(
            path,
            f"OpenCV decoded {decoded.shape[1]}x{decoded.shape[0]} pixels but the header says "
            f"{width}x{height}; convert the file to 16-bit PNG and try again",
        )
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]

    # OpenCV returns BGR and BGRA; gray + alpha PNG comes back as BGRA with gray repeated.
    if layout == "RGB" and channels == 3:
        return _Decoded(color=decoded[:, :, ::-1], alpha=None, mode="RGB")
    if layout == "RGBA" and channels == 4:
        return _Decoded(color=decoded[:, :, 2::-1], alpha=decoded[:, :, 3], mode="RGBA")
    if layout == "LA" and channels in (2, 4):
        return _Decoded(color=decoded[:, :, 0], alpha=decoded[:, :, -1], mode="LA")
    raise ImageReadError(
        path,
        f"OpenCV returned {channels} channels for 16-bit {layout} samples; convert the file "
        "to 16-bit RGB or RGBA PNG and try again",
    )


def _reset_tiff_orientation(data: bytes) -> tuple[bytes, int | None]:
    """Return TIFF data with Orientation 1 in its first IFD, and the orientation it had.

    Handles classic TIFF and BigTIFF in either byte order, with the tag stored as SHORT
    or LONG. Other data, and TIFFs without the tag, come back unchanged with None.
    """
    byte_order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if byte_order is None or len(data) < 16:
        return data, None
    version = struct.unpack_from(byte_order + "H", data, 2)[0]
    if version == 42:
        ifd_offset = struct.unpack_from(byte_order + "I", data, 4)[0]
        count_format, entry_format = "H", "HHI"
    elif version == 43:
        ifd_offset = struct.unpack_from(byte_order + "Q", data, 8)[0]
        count_format, entry_format = "Q", "HHQ"
    else:
        return data, None

    count_size = struct.calcsize(count_format)
    # Each entry: tag, field type and value count, then a 4-byte (8 in BigTIFF) value field.
    entry_size = struct.calcsize(entry_format) + (4 if version == 42 else 8)
    if ifd_offset + count_size > len(data):
        return data, None
    entries = struct.unpack_from(byte_order + count_format, data, ifd_offset)[0]
    for index in range(entries):
        entry = ifd_offset + count_size + index * entry_size
        if entry + entry_size > len(data):
            return data, None
        tag, field_type, count = struct.unpack_from(byte_order + entry_format, data, entry)
        value_format = {3: "H", 4: "I"}.get(field_type)
        if tag != _ORIENTATION_TAG or count != 1 or value_format is None:
            continue
        value_offset = entry + struct.calcsize(entry_format)
        orientation = struct.unpack_from(byte_order + value_format, data, value_offset)[0]
        patched = bytearray(data)
        struct.pack_into(byte_order + value_format, patched, value_offset, 1)
        return bytes(patched), orientation
    return data, None


def _pixels_from_pillow(path: Path, image: Image.Image) -> _Decoded:
    mode = image.mode
    transparency = image.info.get("transparency")

    # Gray and RGB PNGs can mark one colour as transparent (tRNS); turn that into alpha.
    if mode in ("L", "RGB") and transparency is not None:
        mode = "LA" if mode == "L" else "RGBA"
        image = image.convert(mode)
        logger.debug("%s: colour-key transparency converted to an alpha channel", path.name)

    if mode == "1":
        return _Decoded(color=np.asarray(image.convert("L")), alpha=None, mode="1")
    if mode == "L":
        return _Decoded(color=np.asarray(image), alpha=None, mode="L")
    if mode in GRAY16_MODES:
        return _Decoded(color=np.asarray(image).astype(np.uint16), alpha=None, mode=mode)
    if mode == "LA":
        samples = np.asarray(image)
        return _Decoded(color=samples[:, :, 0], alpha=samples[:, :, 1], mode="LA")
    if mode == "RGB":
        return _Decoded(color=np.asarray(image), alpha=None, mode="RGB")
    if mode == "RGBA":
        samples = np.asarray(image)
        return _Decoded(color=samples[:, :, :3], alpha=samples[:, :, 3], mode="RGBA")
    if mode == "P":
        return _decode_palette(image, transparency)
    if mode == "CMYK":
        # NOTE: CMYK is converted to RGB without colour management, so colours are
        # approximate, and writing CMYK back sets the black (K) channel to 0.
        return _Decoded(color=np.asarray(image.convert("RGB")), alpha=None, mode="CMYK")
    if mode in ("I", "F"):
        kind = "integer" if mode == "I" else "floating-point"
        raise ImageReadError(
            path,
            f"it has 32-bit {kind} samples (Pillow mode {mode}), which are not supported; "
            "convert it to 8- or 16-bit",
        )

    # Rare modes (PA, RGBX, YCbCr, LAB, HSV): deblur as RGB(A) and write RGB(A).
    target = "RGBA" if mode.endswith(("A", "a")) else "RGB"
    logger.info("%s: Pillow mode %s is read and written as %s", path.name, mode, target)
    converted = image.convert(target)
    return _pixels_from_pillow(path, converted)


def _decode_palette(image: Image.Image, transparency: object) -> _Decoded:
    indices = np.asarray(image)
    colors = np.asarray(image.getpalette("RGB") or [0, 0, 0], dtype=np.uint8).reshape(-1, 3)
    if int(indices.max()) >= len(colors):
        # Pillow shows indices past the end of a short palette as black.
        padding = np.zeros((int(indices.max()) + 1 - len(colors), 3), dtype=np.uint8)
        colors = np.concatenate([colors, padding])

    entry_alpha = np.full(len(colors), 255, dtype=np.uint8)
    if isinstance(transparency, int) and transparency < len(colors):
        entry_alpha[transparency] = 0
    elif isinstance(transparency, bytes):
        values = np.frombuffer(transparency, dtype=np.uint8)[: len(colors)]
        entry_alpha[: len(values)] = values

    alpha = entry_alpha[indices] if (entry_alpha < 255).any() else None
    palette = PaletteInfo(colors=colors, alpha=entry_alpha, indices=indices)
    return _Decoded(color=colors[indices], alpha=alpha, mode="P", palette=palette)


def _apply_orientation(samples: np.ndarray, orientation: int) -> np.ndarray:
    """Turn (h, w, ...) samples upright for an EXIF orientation from 1 to 8.

    The transforms match Pillow's `ImageOps.exif_transpose`: 2 mirror, 3 rotate 180,
    4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 anticlockwise.
    """
    if orientation == 2:
        samples = samples[:, ::-1]
    elif orientation == 3:
        samples = samples[::-1, ::-1]
    elif orientation == 4:
        samples = samples[::-1]
    elif orientation == 5:
        samples = samples.swapaxes(0, 1)
    elif orientation == 6:
        samples = np.rot90(samples, k=-1)
    elif orientation == 7:
        samples = samples.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:
        samples = np.rot90(samples, k=1)
    return np.ascontiguousarray(samples)


def _to_unit_float(samples: np.ndarray) -> np.ndarray:
    scale = np.float32(np.iinfo(samples.dtype).max)
    return samples.astype(np.float32) / scale


def _is_lossless_webp(data: bytes) -> bool:
    """Return whether a WebP file's image chunk is VP8L (lossless) rather than VP8 (lossy)."""
    position = 12
    while position + 8 <= len(data):
        chunk = data[position : position + 4]
        if chunk == b"VP8L":
            return True
        if chunk == b"VP8 ":
            return False
        size = struct.unpack_from("<I", data, position + 4)[0]
        position += 8 + size + (size & 1)
    return False
