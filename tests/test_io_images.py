"""Tests for reading and writing image files: formats, modes, bit depth, alpha, metadata, errors."""

import io
import logging
import os
import pickle
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from mbmamba_cli.io import writer
from mbmamba_cli.io.encoders import encode_png16, encode_tiff
from mbmamba_cli.io.images import (
    SUPPORTED_EXTENSIONS,
    ImageReadError,
    ImageWriteError,
    LoadedImage,
    read_image,
    write_image,
)

LOSSLESS_EXTENSIONS = [".png", ".tif", ".tiff", ".bmp"]
LOSSY_EXTENSIONS = [".jpg", ".jpeg", ".webp"]
ORIENTATION_TAG = 0x0112
MAKE_TAG = 0x010F
EXIF_IFD = 0x8769
DATE_TIME_ORIGINAL_TAG = 0x9003


@pytest.fixture
def log_records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture the package's log records, whatever `setup_logging` did to propagation."""
    package_logger = logging.getLogger("mbmamba")
    package_logger.addHandler(caplog.handler)
    previous_level = package_logger.level
    package_logger.setLevel(logging.DEBUG)
    writer._warned_conversions.clear()
    yield caplog
    package_logger.removeHandler(caplog.handler)
    package_logger.setLevel(previous_level)


def _random_uint8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _smooth_rgb(height: int, width: int) -> np.ndarray:
    """A smooth gradient (h, w, 3) uint8, which lossy codecs keep within a few levels."""
    rows = np.linspace(0, 255, height)[:, None]
    columns = np.linspace(0, 255, width)[None, :]
    red = (rows + columns) / 2
    green = np.broadcast_to(rows, (height, width))
    blue = np.broadcast_to(255 - columns, (height, width))
    return np.rint(np.stack([red, green, blue], axis=2)).astype(np.uint8)


def _srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _fake_gray_profile() -> bytes:
    """Bytes whose ICC header names the GRAY colour space; enough for the writer's check."""
    return b"\0" * 16 + b"GRAY" + b"\0" * 108


def _camera_exif(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[MAKE_TAG] = "TestCam"
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    exif.get_ifd(EXIF_IFD)[DATE_TIME_ORIGINAL_TAG] = "2024:05:01 12:00:00"
    return exif


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.rint(pixels * 255).astype(np.uint8)


def _round_trip(tmp_path: Path, source: Path, extension: str, name: str = "out") -> LoadedImage:
    loaded = read_image(source)
    output = tmp_path / f"{name}{extension}"
    write_image(output, loaded.pixels, loaded)
    return read_image(output)


# --- formats and sizes -----------------------------------------------------------------------


@pytest.mark.parametrize("extension", LOSSLESS_EXTENSIONS)
def test_round_trip_lossless_format(tmp_path: Path, extension: str) -> None:
    samples = _random_uint8((9, 14, 3))
    source = tmp_path / f"in{extension}"
    Image.fromarray(samples).save(source)

    loaded = read_image(source)
    result = _round_trip(tmp_path, source, extension)

    assert loaded.pixels.shape == (9, 14, 3)
    assert loaded.pixels.dtype == np.float32
    assert loaded.mode == "RGB"
    assert loaded.bit_depth == 8
    assert result.mode == "RGB"
    assert np.array_equal(_to_uint8(result.pixels), samples)


@pytest.mark.parametrize("extension", LOSSY_EXTENSIONS)
def test_round_trip_lossy_format(tmp_path: Path, extension: str) -> None:
    samples = _smooth_rgb(24, 32)
    source = tmp_path / f"in{extension}"
    Image.fromarray(samples).save(source, quality=95)

    loaded = read_image(source)
    result = _round_trip(tmp_path, source, extension)

    assert loaded.format in ("JPEG", "WEBP")
    assert loaded.mode == "RGB"
    assert result.pixels.shape == (24, 32, 3)
    assert np.abs(result.pixels - loaded.pixels).mean() < 0.02


def test_supported_extensions_lower_case_with_dots() -> None:
    assert set(SUPPORTED_EXTENSIONS) == set(LOSSLESS_EXTENSIONS + LOSSY_EXTENSIONS)
    assert all(ext.startswith(".") and ext == ext.lower() for ext in SUPPORTED_EXTENSIONS)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (7, 13), (13, 1)])
@pytest.mark.parametrize("extension", [".png", ".jpg", ".tif", ".bmp", ".webp"])
def test_tiny_image_round_trip(tmp_path: Path, size: tuple[int, int], extension: str) -> None:
    samples = _random_uint8((*size, 3), seed=3)
    source = tmp_path / f"in{extension}"
    Image.fromarray(samples).save(source)

    result = _round_trip(tmp_path, source, extension)

    assert result.pixels.shape == (*size, 3)


def test_write_png_from_jpeg_input(tmp_path: Path) -> None:
    source = tmp_path / "in.jpg"
    Image.fromarray(_smooth_rgb(8, 8)).save(source, quality=95)

    result = _round_trip(tmp_path, source, ".png")

    assert result.format == "PNG"
    assert result.mode == "RGB"


def test_webp_lossless_input_stays_lossless(tmp_path: Path) -> None:
    samples = _random_uint8((10, 12, 3), seed=5)
    source = tmp_path / "in.webp"
    Image.fromarray(samples).save(source, lossless=True)

    loaded = read_image(source)
    result = _round_trip(tmp_path, source, ".webp")

    assert loaded.webp_lossless
    assert np.array_equal(_to_uint8(result.pixels), samples)


def test_multipage_tiff_reads_first_page(tmp_path: Path) -> None:
    first, second = _random_uint8((5, 6, 3), seed=1), _random_uint8((5, 6, 3), seed=2)
    source = tmp_path / "pages.tif"
    Image.fromarray(first).save(source, save_all=True, append_images=[Image.fromarray(second)])

    loaded = read_image(source)

    assert np.array_equal(_to_uint8(loaded.pixels), first)


def test_cmyk_jpeg_stays_cmyk(tmp_path: Path) -> None:
    source = tmp_path / "in.jpg"
    Image.fromarray(_smooth_rgb(16, 16)).convert("CMYK").save(source, quality=95)

    loaded = read_image(source)
    result = _round_trip(tmp_path, source, ".jpg")

    assert loaded.mode == "CMYK"
    assert result.mode == "CMYK"


# --- bit depth -------------------------------------------------------------------------------


def _write_16bit_with_opencv(path: Path, samples: np.ndarray) -> None:
    """Write uint16 samples (h, w), RGB (h, w, 3) or RGBA (h, w, 4) with OpenCV (BGR order)."""
    if samples.ndim == 3:
        order = [2, 1, 0] if samples.shape[2] == 3 else [2, 1, 0, 3]
        samples = samples[:, :, order]
    ok, encoded = cv2.imencode(path.suffix, samples)
    assert ok
    encoded.tofile(str(path))


def _read_raw_with_opencv(path: Path) -> np.ndarray:
    return cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("extension", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16bit_stays_16bit(tmp_path: Path, extension: str, channels: int) -> None:
    # Every value fits in 8 bits: the bit depth must come from the dtype, not the values.
    shape = (6, 9) if channels == 1 else (6, 9, channels)
    samples = np.random.default_rng(7).integers(0, 256, shape).astype(np.uint16)
    source = tmp_path / f"in{extension}"
    _write_16bit_with_opencv(source, samples)

    loaded = read_image(source)
    output = tmp_path / f"out{extension}"
    write_image(output, loaded.pixels, loaded)
    raw = _read_raw_with_opencv(output)
    result = read_image(output)

    assert loaded.bit_depth == 16
    color = samples if channels == 1 else samples[:, :, :3]
    expected = color / 65535 if channels != 1 else np.repeat(color[:, :, None] / 65535, 3, 2)
    assert np.allclose(loaded.pixels, expected, atol=1e-7)
    assert raw.dtype == np.uint16
    assert result.bit_depth == 16
    assert np.array_equal(np.rint(result.pixels * 65535), np.rint(loaded.pixels * 65535))


def test_16bit_alpha_kept_exactly(tmp_path: Path) -> None:
    samples = np.random.default_rng(8).integers(0, 65536, (5, 7, 4)).astype(np.uint16)
    source = tmp_path / "in.png"
    _write_16bit_with_opencv(source, samples)

    loaded = read_image(source)
    output = tmp_path / "out.png"
    write_image(output, loaded.pixels * 0.5, loaded)
    raw = _read_raw_with_opencv(output)

    assert loaded.mode == "RGBA"
    assert np.array_equal(raw[:, :, 3], samples[:, :, 3])


def test_16bit_gray_alpha_png(tmp_path: Path) -> None:
    samples = np.random.default_rng(9).integers(0, 65536, (4, 6, 2)).astype(np.uint16)
    source = tmp_path / "in.png"
    source.write_bytes(encode_png16(samples))

    loaded = read_image(source)
    output = tmp_path / "out.png"
    write_image(output, loaded.pixels, loaded)
    result = read_image(output)

    assert loaded.mode == "LA"
    assert loaded.bit_depth == 16
    assert np.array_equal(np.rint(loaded.alpha * 65535), samples[:, :, 1])
    assert result.mode == "LA"
    assert result.bit_depth == 16
    assert np.array_equal(np.rint(result.pixels[:, :, 0] * 65535), samples[:, :, 0])


def test_16bit_gray_alpha_into_tiff_becomes_rgba(tmp_path: Path) -> None:
    samples = np.random.default_rng(10).integers(0, 65536, (4, 6, 2)).astype(np.uint16)
    source = tmp_path / "in.png"
    source.write_bytes(encode_png16(samples))

    result = _round_trip(tmp_path, source, ".tif")

    assert result.mode == "RGBA"
    assert result.bit_depth == 16
    assert np.array_equal(np.rint(result.alpha * 65535), samples[:, :, 1])


@pytest.mark.parametrize("extension", [".jpg", ".webp", ".bmp"])
def test_16bit_into_8bit_format_warns(
    tmp_path: Path, extension: str, log_records: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "in.png"
    _write_16bit_with_opencv(source, np.full((4, 4, 3), 40000, dtype=np.uint16))

    result = _round_trip(tmp_path, source, extension)

    assert result.bit_depth == 8
    assert any("8-bit instead of 16-bit" in record.message for record in log_records.records)


def test_8bit_dark_image_stays_8bit(tmp_path: Path) -> None:
    source = tmp_path / "dark.png"
    Image.fromarray(np.full((3, 3, 3), 2, dtype=np.uint8)).save(source)

    assert read_image(source).bit_depth == 8


# --- alpha and modes -------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".png", ".tif", ".webp"])
def test_rgba_alpha_kept_exactly(tmp_path: Path, extension: str) -> None:
    samples = _random_uint8((8, 10, 4), seed=11)
    samples[0, 0, 3], samples[0, 1, 3] = 0, 255
    source = tmp_path / "in.png"
    Image.fromarray(samples).save(source)

    loaded = read_image(source)
    output = tmp_path / f"out{extension}"
    write_image(output, np.clip(loaded.pixels * 1.1, 0, 1), loaded)
    result = read_image(output)

    assert loaded.mode == "RGBA"
    assert result.mode == "RGBA"
    assert np.array_equal(_to_uint8(result.alpha), samples[:, :, 3])


def test_rgba_into_jpeg_composites_on_white(
    tmp_path: Path, log_records: pytest.LogCaptureFixture
) -> None:
    samples = np.zeros((16, 16, 4), dtype=np.uint8)
    samples[:, 8:] = (0, 0, 0, 255)
    source = tmp_path / "in.png"
    Image.fromarray(samples).save(source)

    result = _round_trip(tmp_path, source, ".jpg")

    assert result.mode == "RGB"
    assert result.pixels[:, :4].min() > 0.95
    assert result.pixels[:, 12:].max() < 0.05
    assert any("composited onto white" in record.message for record in log_records.records)


def _save_in_mode(path: Path, mode: str) -> Image.Image:
    """Save a small image in a Pillow mode; "PT" means palette with transparency."""
    rgb = Image.fromarray(_smooth_rgb(12, 10))
    if mode == "PT":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 0
        image.save(path, transparency=0)
        return image
    if mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode == "LA":
        image = rgb.convert("LA")
        image.putalpha(Image.fromarray(_random_uint8((12, 10), seed=4)))
    else:
        image = rgb.convert(mode)
    image.save(path)
    return image


@pytest.mark.parametrize(
    ("mode", "extension"),
    [
        ("L", ".png"),
        ("L", ".jpg"),
        ("L", ".tif"),
        ("L", ".bmp"),
        ("LA", ".png"),
        ("LA", ".tif"),
        ("1", ".png"),
        ("1", ".tif"),
        ("1", ".bmp"),
        ("P", ".png"),
        ("P", ".tif"),
        ("P", ".bmp"),
        ("PT", ".png"),
    ],
)
def test_mode_kept(tmp_path: Path, mode: str, extension: str) -> None:
    source = tmp_path / f"in{extension}"
    original = _save_in_mode(source, mode)

    loaded = read_image(source)
    result = _round_trip(tmp_path, source, extension)

    expected_mode = "P" if mode == "PT" else mode
    assert loaded.mode == expected_mode
    assert result.mode == expected_mode
    assert result.pixels.shape == (12, 10, 3)
    if mode in ("L", "LA", "1"):
        assert np.array_equal(result.pixels[:, :, 0], result.pixels[:, :, 2])
    if mode in ("1", "P", "PT") or extension != ".jpg":
        assert np.array_equal(_to_uint8(result.pixels), _to_uint8(loaded.pixels))
    if mode == "LA":
        assert np.array_equal(_to_uint8(result.alpha), np.asarray(original)[:, :, 1])


def test_gray_colour_key_becomes_alpha(tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.fromarray(np.array([[0, 10], [20, 30]], dtype=np.uint8)).save(source, transparency=10)

    loaded = read_image(source)

    assert loaded.mode == "LA"
    assert loaded.alpha.tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_big_endian_16bit_gray_tiff(tmp_path: Path) -> None:
    source = tmp_path / "in.tif"
    samples = np.array([[1, 2, 300], [4000, 50000, 65535]], dtype=np.uint16)
    Image.frombytes("I;16B", (3, 2), samples.astype(">u2").tobytes()).save(source)

    loaded = read_image(source)
    result = _round_trip(tmp_path, source, ".tif")

    assert loaded.bit_depth == 16
    assert np.array_equal(np.rint(loaded.pixels[:, :, 0] * 65535), samples)
    assert result.bit_depth == 16
    assert np.array_equal(np.rint(result.pixels[:, :, 0] * 65535), samples)


@pytest.mark.parametrize(("mode", "expected"), [("YCbCr", "RGB"), ("RGBX", "RGB"), ("PA", "RGBA")])
def test_rare_mode_read_as_rgb(tmp_path: Path, mode: str, expected: str) -> None:
    rgb = Image.fromarray(_smooth_rgb(4, 5))
    image = rgb.convert("P").convert("PA") if mode == "PA" else rgb.convert(mode)
    source = tmp_path / "in.tif"
    image.save(source)

    loaded = read_image(source)
    result = _round_trip(tmp_path, source, ".png")

    assert loaded.mode == expected
    assert result.mode == expected


def test_read_32bit_integer_rejected(tmp_path: Path) -> None:
    path = tmp_path / "deep.tif"
    Image.new("I", (3, 2), 70000).save(path)
    _assert_read_error(path, "convert it to 8- or 16-bit")


def test_palette_transparency_kept(tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    _save_in_mode(source, "PT")

    loaded = read_image(source)
    output = tmp_path / "out.png"
    # Push every colour towards another palette entry: transparent pixels must stay so.
    write_image(output, 1.0 - loaded.pixels, loaded)
    result = read_image(output)

    assert loaded.alpha is not None
    assert result.alpha is not None
    assert np.array_equal(result.alpha, loaded.alpha)
    assert Image.open(output).info.get("transparency") == 0


def test_palette_output_uses_input_colours(tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    _save_in_mode(source, "P")

    loaded = read_image(source)
    output = tmp_path / "out.png"
    noise = np.random.default_rng(0).normal(0, 0.05, loaded.pixels.shape)
    noisy = np.clip(loaded.pixels + noise, 0, 1).astype(np.float32)
    write_image(output, noisy, loaded)
    written = Image.open(output)
    used = {tuple(color) for color in _to_uint8(read_image(output).pixels).reshape(-1, 3)}
    palette = {tuple(color) for color in loaded.palette.colors}

    assert written.mode == "P"
    assert used <= palette


def test_gray_output_uses_bt601_luma(tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.new("L", (2, 1), 0).save(source)

    loaded = read_image(source)
    output = tmp_path / "out.png"
    pixels = np.array([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=np.float32)
    write_image(output, pixels, loaded)
    written = np.asarray(Image.open(output))

    assert written.tolist() == [[76, 29]]


def test_gray_into_webp_becomes_rgb(tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    _save_in_mode(source, "L")

    result = _round_trip(tmp_path, source, ".webp")

    assert result.mode == "RGB"


def test_one_bit_output_thresholds_at_half(tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.new("1", (3, 1), 0).save(source)

    loaded = read_image(source)
    output = tmp_path / "out.png"
    pixels = np.repeat(np.array([[0.49, 0.5, 0.9]], dtype=np.float32)[:, :, None], 3, axis=2)
    write_image(output, pixels, loaded)
    written = Image.open(output)

    assert written.mode == "1"
    assert np.asarray(written.convert("L")).tolist() == [[0, 255, 255]]


# --- orientation -----------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    source = tmp_path / "in.png"
    Image.fromarray(_random_uint8((4, 7, 3), seed=orientation)).save(
        source, exif=_camera_exif(orientation).tobytes()
    )

    loaded = read_image(source)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(source)))

    assert np.array_equal(_to_uint8(loaded.pixels), expected)


@pytest.mark.parametrize("orientation", [6, 8])
@pytest.mark.parametrize("extension", [".jpg", ".png", ".tif", ".webp"])
def test_portrait_comes_out_upright(tmp_path: Path, orientation: int, extension: str) -> None:
    # Stored landscape (h 8, w 16) with a left half dark and a right half bright.
    samples = np.zeros((8, 16, 3), dtype=np.uint8)
    samples[:, 8:] = 255
    source = tmp_path / f"in{extension}"
    Image.fromarray(samples).save(source, exif=_camera_exif(orientation).tobytes())

    loaded = read_image(source)
    output = tmp_path / f"out{extension}"
    write_image(output, loaded.pixels, loaded)
    written = Image.open(output)

    assert loaded.pixels.shape == (16, 8, 3)
    # Orientation 6 turns the stored image clockwise, so its left (dark) side ends on top.
    bright_on_top = orientation == 8
    top, bottom = loaded.pixels[:4].mean(), loaded.pixels[12:].mean()
    assert (top > bottom) == bright_on_top
    assert written.size == (8, 16)
    assert written.getexif().get(ORIENTATION_TAG, 1) == 1
    assert read_image(output).pixels.shape == (16, 8, 3)


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("encode", [encode_png16, encode_tiff], ids=["png16", "tiff16"])
def test_16bit_orientation_applied_once(tmp_path: Path, orientation: int, encode) -> None:
    samples = np.random.default_rng(orientation).integers(0, 65536, (3, 5, 3)).astype(np.uint16)
    source = tmp_path / "in.bin"
    source.write_bytes(encode(samples, None, _camera_exif(orientation).tobytes()))
    rotations = {3: np.rot90(samples, 2), 6: np.rot90(samples, -1), 8: np.rot90(samples, 1)}

    loaded = read_image(source)

    assert loaded.bit_depth == 16
    assert np.array_equal(np.rint(loaded.pixels * 65535), rotations[orientation])


def test_exif_image_size_follows_rotation(tmp_path: Path) -> None:
    exif = _camera_exif(6)
    exif.get_ifd(EXIF_IFD)[0xA002] = 16
    exif.get_ifd(EXIF_IFD)[0xA003] = 8
    source = tmp_path / "in.jpg"
    Image.fromarray(_smooth_rgb(8, 16)).save(source, exif=exif.tobytes())

    loaded = read_image(source)
    stored = Image.Exif()
    stored.load(loaded.exif)

    assert stored[ORIENTATION_TAG] == 1
    assert stored.get_ifd(EXIF_IFD)[0xA002] == 8
    assert stored.get_ifd(EXIF_IFD)[0xA003] == 16


# --- ICC profile and EXIF --------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".png", ".jpg", ".tif", ".webp"])
def test_icc_and_exif_kept(tmp_path: Path, extension: str) -> None:
    profile = _srgb_profile()
    source = tmp_path / "in.jpg"
    Image.fromarray(_smooth_rgb(8, 8)).save(
        source, quality=95, icc_profile=profile, exif=_camera_exif().tobytes()
    )

    result_path = tmp_path / f"out{extension}"
    loaded = read_image(source)
    write_image(result_path, loaded.pixels, loaded)
    written = Image.open(result_path)
    exif = written.getexif()

    assert written.info.get("icc_profile") == profile
    assert exif.get(MAKE_TAG) == "TestCam"
    assert exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL_TAG) == "2024:05:01 12:00:00"


@pytest.mark.parametrize("extension", [".png", ".tif"])
def test_16bit_icc_and_exif_kept(tmp_path: Path, extension: str) -> None:
    profile = _srgb_profile()
    samples = np.random.default_rng(12).integers(0, 65536, (4, 5, 3)).astype(np.uint16)
    source = tmp_path / "in.png"
    source.write_bytes(encode_png16(samples, profile, _camera_exif().tobytes()))

    loaded = read_image(source)
    output = tmp_path / f"out{extension}"
    write_image(output, loaded.pixels, loaded)
    written = Image.open(output)

    assert loaded.icc_profile == profile
    assert written.info.get("icc_profile") == profile
    assert written.getexif().get(MAKE_TAG) == "TestCam"
    assert read_image(output).bit_depth == 16


def test_tiff_exif_drops_layout_tags(tmp_path: Path) -> None:
    source = tmp_path / "in.tif"
    Image.fromarray(_smooth_rgb(6, 4)).save(source, exif=_camera_exif().tobytes())

    loaded = read_image(source)
    stored = Image.Exif()
    stored.load(loaded.exif)
    result = _round_trip(tmp_path, source, ".png")

    assert stored[MAKE_TAG] == "TestCam"
    assert 256 not in stored
    assert 273 not in stored
    assert result.pixels.shape == (6, 4, 3)


def test_gray_icc_kept_for_gray_output(tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.fromarray(_smooth_rgb(4, 4)).convert("L").save(source, icc_profile=_fake_gray_profile())

    loaded = read_image(source)
    output = tmp_path / "out.png"
    write_image(output, loaded.pixels, loaded)

    assert Image.open(output).info.get("icc_profile") == _fake_gray_profile()


def test_gray_icc_dropped_for_rgb_output(
    tmp_path: Path, log_records: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "in.png"
    Image.fromarray(_smooth_rgb(4, 4)).convert("L").save(source, icc_profile=_fake_gray_profile())

    result = _round_trip(tmp_path, source, ".webp")

    assert result.icc_profile is None
    assert any("profile is dropped" in record.message for record in log_records.records)


def test_bmp_output_drops_icc_with_warning(
    tmp_path: Path, log_records: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "in.png"
    Image.fromarray(_smooth_rgb(4, 4)).save(source, icc_profile=_srgb_profile())

    _round_trip(tmp_path, source, ".bmp")

    assert any("cannot store the ICC profile" in record.message for record in log_records.records)


# --- paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".png", ".jpg", ".tif", ".webp"])
def test_non_ascii_path_with_spaces(tmp_path: Path, extension: str) -> None:
    folder = tmp_path / "ph oto ü 写真"
    folder.mkdir()
    source = folder / f"ph oto ü 写真{extension}"
    Image.fromarray(_smooth_rgb(6, 6)).save(source)

    loaded = read_image(source)
    output = tmp_path / "結果 ü" / f"ph oto ü 写真{extension}"
    write_image(output, loaded.pixels, loaded)

    assert output.is_file()
    assert read_image(output).pixels.shape == (6, 6, 3)


def test_non_ascii_path_16bit(tmp_path: Path) -> None:
    # 16-bit files go through OpenCV, which must not be handed the path itself.
    source = tmp_path / "ph oto ü 写真.png"
    source.write_bytes(encode_png16(np.full((3, 4, 3), 1234, dtype=np.uint16)))

    loaded = read_image(source)
    output = tmp_path / "ü 出力.tif"
    write_image(output, loaded.pixels, loaded)

    assert loaded.bit_depth == 16
    assert read_image(output).bit_depth == 16


# --- read errors -----------------------------------------------------------------------------


def _assert_read_error(path: Path, words: str) -> None:
    with pytest.raises(ImageReadError) as raised:
        read_image(path)
    message = str(raised.value)
    assert str(path) in message
    assert words in message
    assert raised.value.path == path


def test_read_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_read_error(path, "empty")


def test_read_truncated_png(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(_random_uint8((64, 64, 3))).save(path)
    path.write_bytes(path.read_bytes()[:300])
    _assert_read_error(path, "truncated")


def test_read_truncated_16bit_png(tmp_path: Path) -> None:
    path = tmp_path / "cut16.png"
    samples = np.random.default_rng(0).integers(0, 65536, (64, 64, 3)).astype(np.uint16)
    path.write_bytes(encode_png16(samples)[:2000])
    _assert_read_error(path, "truncated")


def test_read_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.fromarray(_random_uint8((64, 64, 3))).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:1000])
    _assert_read_error(path, "truncated")


def test_read_text_renamed_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n")
    _assert_read_error(path, "not a PNG, JPEG, TIFF, BMP or WebP image")


def test_read_folder(tmp_path: Path) -> None:
    path = tmp_path / "album.png"
    path.mkdir()
    _assert_read_error(path, "folder")


def test_read_missing_file(tmp_path: Path) -> None:
    _assert_read_error(tmp_path / "missing.png", "not found")


def test_read_gif_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    Image.fromarray(_random_uint8((4, 4, 3))).save(path)
    _assert_read_error(path, "GIF images are not supported")


def test_read_animated_webp(tmp_path: Path) -> None:
    path = tmp_path / "anim.webp"
    frames = [Image.fromarray(_random_uint8((4, 4, 3), seed=seed)) for seed in range(2)]
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True)
    _assert_read_error(path, "animated")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_read_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "locked.png"
    Image.fromarray(_random_uint8((2, 2, 3))).save(path)
    path.chmod(0)
    try:
        _assert_read_error(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_read_error_pickles(tmp_path: Path) -> None:
    error = ImageReadError(tmp_path / "x.png", "the file is empty")

    copy = pickle.loads(pickle.dumps(error))

    assert str(copy) == str(error)
    assert copy.path == error.path


# --- writing ---------------------------------------------------------------------------------


def _loaded_rgb(tmp_path: Path, height: int = 2, width: int = 3) -> LoadedImage:
    source = tmp_path / "in.png"
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(source)
    return read_image(source)


def test_write_rounds_and_clips(tmp_path: Path) -> None:
    like = _loaded_rgb(tmp_path, 1, 4)
    pixels = np.zeros((1, 4, 3), dtype=np.float32)
    pixels[0, :, 0] = [100.4 / 255, 100.6 / 255, -0.5, 1.5]
    output = tmp_path / "out.png"

    write_image(output, pixels, like)
    written = np.asarray(Image.open(output))

    assert written[0, :, 0].tolist() == [100, 101, 0, 255]


def test_write_nan_as_zero(tmp_path: Path, log_records: pytest.LogCaptureFixture) -> None:
    like = _loaded_rgb(tmp_path)
    pixels = np.full((2, 3, 3), 0.5, dtype=np.float32)
    pixels[0, 0, 0] = np.nan
    output = tmp_path / "out.png"

    write_image(output, pixels, like)

    assert np.asarray(Image.open(output))[0, 0, 0] == 0
    assert any("NaN" in record.message for record in log_records.records)


def test_write_creates_folders_and_replaces(tmp_path: Path) -> None:
    like = _loaded_rgb(tmp_path)
    output = tmp_path / "a" / "b" / "out.png"

    write_image(output, np.zeros((2, 3, 3), dtype=np.float32), like)
    write_image(output, np.ones((2, 3, 3), dtype=np.float32), like)

    assert np.asarray(Image.open(output)).min() == 255
    assert sorted(path.name for path in output.parent.iterdir()) == ["out.png"]


def test_write_unsupported_extension(tmp_path: Path) -> None:
    like = _loaded_rgb(tmp_path)
    output = tmp_path / "out.gif"

    with pytest.raises(ImageWriteError) as raised:
        write_image(output, like.pixels, like)

    assert str(output) in str(raised.value)
    assert ".png" in str(raised.value)


def test_write_shape_mismatch(tmp_path: Path) -> None:
    like = _loaded_rgb(tmp_path)
    with pytest.raises(ValueError, match="shape"):
        write_image(tmp_path / "out.png", np.zeros((3, 3, 3), dtype=np.float32), like)


def test_write_onto_folder(tmp_path: Path) -> None:
    like = _loaded_rgb(tmp_path)
    output = tmp_path / "taken.png"
    output.mkdir()

    with pytest.raises(ImageWriteError, match="folder"):
        write_image(output, like.pixels, like)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_write_unwritable_folder(tmp_path: Path) -> None:
    like = _loaded_rgb(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ImageWriteError) as raised:
            write_image(locked / "out.png", like.pixels, like)
    finally:
        locked.chmod(0o700)

    assert "locked" in str(raised.value)
    assert "OUTPUT folder you can write to" in str(raised.value)
    assert list(locked.iterdir()) == []


def test_write_under_a_file(tmp_path: Path) -> None:
    like = _loaded_rgb(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed")

    with pytest.raises(ImageWriteError) as raised:
        write_image(blocker / "out.png", like.pixels, like)

    assert "could not be created" in str(raised.value)
    assert str(blocker / "out.png") in str(raised.value)


def test_write_webp_too_large(tmp_path: Path) -> None:
    like = _loaded_rgb(tmp_path, 1, 16_384)
    with pytest.raises(ImageWriteError, match="16383"):
        write_image(tmp_path / "wide.webp", like.pixels, like)


# --- encoders --------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png16_encoder_decodes_with_opencv(channels: int) -> None:
    shape = (5, 7) if channels == 1 else (5, 7, channels)
    samples = np.random.default_rng(channels).integers(0, 65536, shape).astype(np.uint16)

    decoded = cv2.imdecode(np.frombuffer(encode_png16(samples), np.uint8), cv2.IMREAD_UNCHANGED)

    assert decoded.dtype == np.uint16
    if channels == 1:
        assert np.array_equal(decoded, samples)
    elif channels == 2:
        assert np.array_equal(decoded[:, :, 0], samples[:, :, 0])
        assert np.array_equal(decoded[:, :, 3], samples[:, :, 1])
    else:
        order = [2, 1, 0] if channels == 3 else [2, 1, 0, 3]
        assert np.array_equal(decoded[:, :, order], samples)


def test_png16_encoder_chunks_valid() -> None:
    encoded = encode_png16(np.zeros((2, 2, 3), dtype=np.uint16), b"profile", b"Exif\0\0II*\0")
    position, kinds = 8, []
    while position < len(encoded):
        length = int.from_bytes(encoded[position : position + 4], "big")
        kind = encoded[position + 4 : position + 8]
        body = encoded[position + 8 : position + 8 + length]
        crc = int.from_bytes(encoded[position + 8 + length : position + 12 + length], "big")
        assert zlib.crc32(kind + body) == crc
        kinds.append(kind)
        position += 12 + length

    assert kinds == [b"IHDR", b"iCCP", b"eXIf", b"IDAT", b"IEND"]


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_tiff16_encoder_decodes_with_opencv(channels: int) -> None:
    # 300 rows of 120 pixels exceed one 64 KiB strip, so the strip offsets are exercised.
    shape = (300, 120) if channels == 1 else (300, 120, channels)
    samples = np.random.default_rng(channels).integers(0, 65536, shape).astype(np.uint16)

    encoded = encode_tiff(samples)
    decoded = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    header = Image.open(io.BytesIO(encoded))

    assert decoded.dtype == np.uint16
    order = [0] if channels == 1 else [2, 1, 0] if channels == 3 else [2, 1, 0, 3]
    assert np.array_equal(decoded.reshape(300, 120, -1)[:, :, order].reshape(shape), samples)
    assert header.size == (120, 300)
    assert len(header.tag_v2[273]) > 1


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")])
def test_tiff8_encoder_decodes_with_pillow(channels: int, mode: str) -> None:
    # Pillow, not OpenCV: OpenCV premultiplies the colour of 8-bit RGBA TIFFs by alpha.
    shape = (300, 120) if channels == 1 else (300, 120, channels)
    samples = _random_uint8(shape, seed=channels)

    decoded = Image.open(io.BytesIO(encode_tiff(samples)))

    assert decoded.mode == mode
    assert np.array_equal(np.asarray(decoded), samples)


def test_encoders_reject_wrong_dtype() -> None:
    with pytest.raises(ValueError, match="uint16"):
        encode_png16(np.zeros((2, 2, 3), dtype=np.uint8))
