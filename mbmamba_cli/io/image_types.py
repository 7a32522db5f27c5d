"""Types and format tables shared by the image reader and writer."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
SUPPORTED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
FORMAT_BY_EXTENSION = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".webp": "WEBP",
}
# Pillow modes of 16-bit gray images, by byte order.
GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageIOError(Exception):
    """Base class of image read and write errors; the message names the file and the fix."""

    action = "read or write"

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot {self.action} {self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        # Rebuild from (path, reason) so the error survives pickling between processes.
        return type(self), (self.path, self.reason)


class ImageReadError(ImageIOError):
    """An input file is missing, unreadable, damaged or not a supported image."""

    action = "read"


class ImageWriteError(ImageIOError):
    """An output file could not be encoded or written."""

    action = "write"


@dataclass(eq=False)
class PaletteInfo:
    """A palette image's colour table and indices, kept to write the result as a palette.

    `colors` (k, 3) uint8 RGB, `alpha` (k,) uint8 with 255 for opaque entries, `indices`
    (h, w) uint8 with the EXIF orientation applied.
    """

    colors: np.ndarray
    alpha: np.ndarray
    indices: np.ndarray


@dataclass(eq=False)
class LoadedImage:
    """A decoded photo and what is needed to write a result the way the input was stored.

    `pixels` float32 (h, w, 3) RGB in [0, 1], gray inputs repeated into 3 channels, with
    the EXIF orientation applied. `alpha` float32 (h, w) in [0, 1] or None. `mode` is the
    input's Pillow mode ("RGB", "RGBA", "L", "LA", "1", "P", "I;16", "CMYK"), except that
    16-bit RGB, RGBA and gray + alpha report "RGB", "RGBA" and "LA" with `bit_depth` 16.
    `exif` has its orientation tag reset to 1 because `pixels` are already upright.
    """

    path: Path
    pixels: np.ndarray
    alpha: np.ndarray | None
    mode: str
    bit_depth: int
    icc_profile: bytes | None
    exif: bytes | None
    format: str
    palette: PaletteInfo | None = None
    webp_lossless: bool = False

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])
