"""Read photos as float RGB and write results back in the input's mode, bit depth and metadata.

`read_image` returns the pixels as float32 RGB of shape (h, w, 3) in [0, 1] with the EXIF
orientation applied, plus what `write_image` needs to write a result the way the input was
stored: mode (gray, gray + alpha, 1-bit, palette, RGB, RGBA, CMYK), bit depth, alpha, ICC
profile and EXIF. Formats: PNG, JPEG, TIFF, BMP and WebP.

Pillow decodes every file and reads the metadata, except 16-bit RGB, RGBA and gray + alpha
PNG and TIFF, which Pillow reduces to 8 bits: OpenCV decodes their samples. The bit depth
comes from the decoded array's dtype, never from the pixel values.
"""

from mbmamba_cli.io.image_types import (
    SUPPORTED_EXTENSIONS,
    SUPPORTED_FORMATS,
    ImageIOError,
    ImageReadError,
    ImageWriteError,
    LoadedImage,
    PaletteInfo,
)
from mbmamba_cli.io.reader import read_image
from mbmamba_cli.io.writer import write_image

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "SUPPORTED_FORMATS",
    "ImageIOError",
    "ImageReadError",
    "ImageWriteError",
    "LoadedImage",
    "PaletteInfo",
    "read_image",
    "write_image",
]
