"""Tests of tile planning, blending, tile size choice and out-of-memory handling in the engine."""

import itertools
import logging

import numpy as np
import pytest
import torch
from torch import nn

from mbmamba_cli.inference.engine import DeblurError, Deblurrer, is_out_of_memory
from mbmamba_cli.inference.tiling import (
    MEMORY_ESTIMATES,
    MemoryEstimate,
    TileShape,
    choose_tile,
    effective_overlap,
    halve_tile,
    memory_estimate_for,
    parse_memory_size,
    parse_tile_option,
    plan_grid,
)

ESTIMATE = MemoryEstimate(fixed_bytes=0, bytes_per_pixel=1000.0, source="test")


class ContextNet(nn.Module):
    """A model whose output depends on context: dilated convolutions (receptive field radius 15) and a
    small term from the mean of the whole input. Every tile's output therefore differs a little from
    the whole image's, as with the Mamba scans, which run over the whole tile."""

    def __init__(self, global_term: float = 0.02) -> None:
        super().__init__()
        self.global_term = global_term
        torch.manual_seed(1)
        layers: list[nn.Module] = []
        channels = 3
        for dilation in (1, 2, 4, 8):
            layers += [nn.Conv2d(channels, 8, 3, padding=dilation, dilation=dilation), nn.Tanh()]
            channels = 8
        layers.append(nn.Conv2d(8, 3, 1))
        self.body = nn.Sequential(*layers)
        self.largest_input = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.largest_input = max(self.largest_input, x.numel())
        return x + 0.1 * self.body(x) + self.global_term * x.mean()


class OutOfMemoryNet(nn.Module):
    """Identity that raises an out-of-memory RuntimeError for inputs above `limit` pixels."""

    def __init__(self, limit: int, message: str = "DefaultCPUAllocator: not enough memory") -> None:
        super().__init__()
        self.limit = limit
        self.message = message
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        if x.shape[-2] * x.shape[-1] > self.limit:
            raise RuntimeError(f"{self.message}: you tried to allocate 123456 bytes")
        return x.clone()


def gradient_image(height: int, width: int) -> np.ndarray:
    """A smooth colour gradient in [0.1, 0.9] (no clipping), where seams would show most."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 0.1 + 0.8 * xs / max(width - 1, 1)
    green = 0.1 + 0.8 * ys / max(height - 1, 1)
    blue = 0.5 + 0.3 * np.sin(xs / 40.0) * np.cos(ys / 55.0)
    return np.stack([red, green, blue], axis=-1).astype(np.float32)


def seam_mask(grid, height: int, width: int) -> np.ndarray:
    """Pixels within the shared bands between neighbouring tiles."""
    mask = np.zeros((height, width), dtype=bool)
    for starts, tile, length, axis in (
        (grid.ys, grid.tile_height, height, 0),
        (grid.xs, grid.tile_width, width, 1),
    ):
        for previous, start in itertools.pairwise(starts):
            end = min(previous + tile, length)
            if axis == 0:
                mask[start:end, :] = True
            else:
                mask[:, start:end] = True
    return mask


def deblur(model: nn.Module, image: np.ndarray, tile: int | str, overlap: int = 32, **kwargs) -> np.ndarray:
    engine = Deblurrer(
        model, "cpu", "fp32", tile=tile, tile_overlap=overlap, memory_estimate=ESTIMATE, **kwargs
    )
    return engine.deblur(image)


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(n, t, o) for n in (1, 15, 16, 17, 64, 100, 257, 1000) for t in (16, 64, 96, 256) for o in (0, 8, 32)],
)
def test_grid_covers_axis(length: int, tile: int, overlap: int) -> None:
    grid = plan_grid(length, 7, tile, 7, overlap)
    ends = [min(start + grid.tile_height, length) for start in grid.ys]

    assert grid.ys[0] == 0
    assert ends[-1] == length
    assert all(start % 16 == 0 for start in grid.ys)
    assert all(end - start <= tile for start, end in zip(grid.ys, ends, strict=True))
    assert all(b > a for a, b in itertools.pairwise(grid.ys))
    assert all(prev_end - start >= grid.overlap for prev_end, start in zip(ends, grid.ys[1:], strict=False))


def test_grid_overlap_clamped_small_tile() -> None:
    grid = plan_grid(500, 500, 64, 64, 32)

    assert grid.overlap == effective_overlap(64, 32) == 16


def test_weights_image_border_one() -> None:
    grid = plan_grid(200, 300, 96, 96, 32)
    tiles = list(grid.tiles())
    first_rows, first_cols, first_weight = tiles[0]
    last_rows, last_cols, last_weight = tiles[-1]

    assert first_weight[0, 0] == pytest.approx(1.0)
    assert last_weight[-1, -1] == pytest.approx(1.0)
    assert first_weight[0, -1] < 0.01  # inner right border of the first tile
    assert last_weight[0, 0] < 0.01  # inner top-left corner of the last tile


def test_weights_sum_to_one_in_overlap() -> None:
    grid = plan_grid(64, 300, 64, 96, 32)
    total = np.zeros((64, 300), dtype=np.float64)
    for rows, cols, weight in grid.tiles():
        total[rows, cols] += weight

    assert total.min() > 0.99
    assert total.max() < 1.01


def test_choose_tile_whole_image_fits() -> None:
    shape = choose_tile(100, 120, 10**9, ESTIMATE)

    assert (shape.height, shape.width) == (100, 120)
    assert "whole image" in shape.reason


def test_choose_tile_from_budget() -> None:
    shape = choose_tile(4000, 6000, 10**9, ESTIMATE)  # 1e6 pixels -> side 1000 -> 992

    assert (shape.height, shape.width) == (992, 992)
    assert ESTIMATE.bytes_for(shape.height, shape.width) <= 10**9


def test_choose_tile_thin_image_grows_along() -> None:
    shape = choose_tile(100, 50_000, 10**9, ESTIMATE)  # 1e6 pixels, 112 padded rows

    assert shape.height == 100
    assert shape.width == 8928
    assert ESTIMATE.bytes_for(shape.height, shape.width) <= 10**9


def test_choose_tile_fixed_bytes_counted() -> None:
    estimate = MemoryEstimate(fixed_bytes=500_000_000, bytes_per_pixel=1000.0, source="test")
    shape = choose_tile(4000, 6000, 10**9, estimate)  # 0.5e6 pixels left -> side 704

    assert (shape.height, shape.width) == (704, 704)


def test_choose_tile_tiny_budget_minimum() -> None:
    shape = choose_tile(4000, 6000, 1000, ESTIMATE, min_tile=64)

    assert (shape.height, shape.width) == (64, 64)
    assert "minimum" in shape.reason


def test_halve_tile_until_minimum() -> None:
    sides = []
    shape: TileShape | None = TileShape(512, 300, "")
    while shape is not None:
        sides.append((shape.height, shape.width))
        shape = halve_tile(shape, min_tile=64)

    assert sides == [(512, 300), (256, 144), (128, 64), (64, 64)]


def test_memory_estimate_unknown_variant_largest() -> None:
    estimate = memory_estimate_for(None, "float32")
    rows = [row for table in MEMORY_ESTIMATES.values() for row in table.values()]

    assert estimate.bytes_for(1024, 1024) == max(row.bytes_for(1024, 1024) for row in rows)


def test_memory_estimate_rows_per_variant() -> None:
    assert memory_estimate_for("s", "float32") is MEMORY_ESTIMATES["s"]["float32"]
    assert memory_estimate_for("s", "float16") is MEMORY_ESTIMATES["s"]["bfloat16"]
    assert all(set(MEMORY_ESTIMATES[name]) == {"float32", "bfloat16"} for name in ("s", "b", "l"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GB", 4 * 10**9),
        ("512MB", 512 * 10**6),
        ("1.5GiB", int(1.5 * 2**30)),
        ("2000", 2000),
        ("8g", 8 * 10**9),
    ],
)
def test_parse_memory_size_units(text: str, expected: int) -> None:
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["4 gigs", "", "-1GB", "0", "GB"])
def test_parse_memory_size_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="invalid memory size"):
        parse_memory_size(text)


def test_parse_tile_option_values() -> None:
    assert parse_tile_option("auto") == "auto"
    assert parse_tile_option("0") == 0
    assert parse_tile_option("512") == 512
    with pytest.raises(ValueError, match="invalid tile"):
        parse_tile_option("8")
    with pytest.raises(ValueError, match="invalid tile"):
        parse_tile_option("big")


def error_step(error: np.ndarray) -> float:
    """The largest jump of the error between neighbouring pixels: a visible seam is such a jump."""
    return float(max(np.abs(np.diff(error, axis=0)).max(), np.abs(np.diff(error, axis=1)).max()))


def test_seams_gradient_bounded() -> None:
    model = ContextNet()
    image = gradient_image(200, 264)
    whole = deblur(model, image, tile=0)
    tiled = deblur(model, image, tile=96, overlap=32)
    seams = seam_mask(plan_grid(200, 264, 96, 96, 32), 200, 264)
    error = np.abs(tiled - whole)

    assert seams.any()
    # The mean term gives every pixel of a tile some error; the seam bands must add nothing to it.
    assert error[seams].max() <= 1.1 * error[~seams].max()
    assert error[seams].max() < 6e-3  # 1.5 levels of an 8-bit image
    assert error_step(tiled - whole) < 1.5e-3


def test_seams_feathered_beat_hard_cuts() -> None:
    model = ContextNet()
    image = gradient_image(200, 264)
    whole = deblur(model, image, tile=0)
    feathered = deblur(model, image, tile=96, overlap=32)
    hard_cut = deblur(model, image, tile=96, overlap=0)
    seams = seam_mask(plan_grid(200, 264, 96, 96, 32), 200, 264)

    assert np.abs(feathered - whole)[seams].max() < 0.6 * np.abs(hard_cut - whole)[seams].max()
    assert error_step(feathered - whole) < 0.2 * error_step(hard_cut - whole)


def test_right_bottom_edges_match_untiled() -> None:
    model = ContextNet(global_term=0.0)  # local: pixels far from inner tile borders must be exact
    image = gradient_image(150, 170)  # neither side a multiple of the tile or of 16
    whole = deblur(model, image, tile=0)
    tiled = deblur(model, image, tile=64, overlap=16)
    error = np.abs(tiled - whole).max(axis=2)
    away_from_seams = ~seam_mask(plan_grid(150, 170, 64, 64, 16), 150, 170)

    assert error[-8:, :][away_from_seams[-8:, :]].max() < 1e-5
    assert error[:, -8:][away_from_seams[:, -8:]].max() < 1e-5
    assert error.max() < 5e-3


@pytest.mark.parametrize(("height", "width"), [(1, 1), (2, 2), (7, 13), (13, 7), (1, 300)])
@pytest.mark.parametrize("tile", ["auto", 0, 64])
def test_tiny_images_keep_shape(height: int, width: int, tile: int | str) -> None:
    image = gradient_image(height, width)
    output = deblur(ContextNet(), image, tile=tile)

    assert output.shape == (height, width, 3)
    assert output.dtype == np.float32
    assert np.isfinite(output).all()


def test_device_input_grows_with_tile_not_image() -> None:
    largest = []
    for size in (128, 256):
        model = ContextNet()
        deblur(model, gradient_image(size, size), tile=64)
        largest.append(model.largest_input)

    assert largest[0] == 3 * 64 * 64
    assert largest[1] == 3 * 64 * 64


def test_auto_tile_follows_budget() -> None:
    model = ContextNet()
    budget = 1000 * 100 * 100  # 1e4 pixels of 1000 B -> 96x96 tiles
    deblur(model, gradient_image(300, 300), tile="auto", max_memory=budget)

    assert model.largest_input <= 3 * 100 * 100
    assert model.largest_input >= 3 * 64 * 96


def test_oom_halves_and_next_image_fine() -> None:
    model = OutOfMemoryNet(limit=80 * 80)
    engine = Deblurrer(model, "cpu", "fp32", tile=256, tile_overlap=16, memory_estimate=ESTIMATE)
    first = gradient_image(300, 300)
    second = gradient_image(120, 90)

    first_output = engine.deblur(first)
    second_output = engine.deblur(second)

    assert (256, 256) in model.sizes
    assert max(h * w for h, w in model.sizes[model.sizes.index((64, 64)) :]) <= 80 * 80
    assert np.abs(first_output - first).max() < 1e-6
    assert np.abs(second_output - second).max() < 1e-6


def test_oom_at_minimum_fails_cleanly() -> None:
    engine = Deblurrer(OutOfMemoryNet(limit=10), "cpu", "fp32", tile=128, memory_estimate=ESTIMATE)

    with pytest.raises(DeblurError, match="out of memory"):
        engine.deblur(gradient_image(200, 200))


def test_oom_cuda_message_detected() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_non_oom_error_not_retried() -> None:
    class Broken(nn.Module):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Broken.calls += 1
            raise RuntimeError("shape mismatch")

    engine = Deblurrer(Broken(), "cpu", "fp32", tile=64, memory_estimate=ESTIMATE)

    with pytest.raises(RuntimeError, match="shape mismatch"):
        engine.deblur(gradient_image(200, 200))
    assert Broken.calls == 1


def test_wrong_output_shape_rejected() -> None:
    class Cropping(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[..., :-1, :]

    with pytest.raises(DeblurError, match="shape"):
        deblur(Cropping(), gradient_image(32, 32), tile=0)


def test_invalid_pixels_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(h, w, 3\)"):
        deblur(ContextNet(), np.zeros((10, 10), dtype=np.float32), tile=0)


@pytest.mark.slow
def test_tiled_real_mbmamba_seams() -> None:
    from conftest import tiny_mbmamba

    model = tiny_mbmamba()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.abs().max() == 0:  # zero-initialised residual scales: make every path count
                parameter.normal_(0.0, 0.1)
    image = gradient_image(64, 128)  # hard-cut tiles abut at column 64
    whole = deblur(model, image, tile=0)
    feathered = deblur(model, image, tile=64, overlap=32)
    hard_cut = deblur(model, image, tile=64, overlap=0)
    seams = seam_mask(plan_grid(64, 128, 64, 64, 32), 64, 128)
    feathered_error = np.abs(feathered - whole)

    assert feathered_error[seams].max() < np.abs(hard_cut - whole)[seams].max()
    assert feathered_error[seams].max() < 0.01  # 2.5 levels of an 8-bit image
    assert error_step(feathered - whole) < error_step(hard_cut - whole)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_follows_tile() -> None:
    model = ContextNet()
    peaks = []
    for size in (256, 1024):
        engine = Deblurrer(model, "cuda", "fp32", tile=128, tile_overlap=32, memory_estimate=ESTIMATE)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine.deblur(gradient_image(size, size))
        peaks.append(torch.cuda.max_memory_allocated() - before)

    # 16 times the pixels; the image would need 12 MB on the device, a tile 0.2 MB.
    assert peaks[1] < 1.5 * peaks[0]


def test_cpu_default_budget_is_capped(monkeypatch):
    from mbmamba_cli.inference import tiling

    monkeypatch.setattr(tiling, "available_host_memory", lambda: (64 * 1024**3, "test"))

    budget, reason = tiling.default_memory_budget(torch.device("cpu"))

    assert budget == tiling.CPU_BUDGET_CAP
    assert "--max-memory" in reason


def test_cpu_default_budget_follows_small_hosts(monkeypatch):
    from mbmamba_cli.inference import tiling

    monkeypatch.setattr(tiling, "available_host_memory", lambda: (2 * 1024**3, "test"))

    budget, _ = tiling.default_memory_budget(torch.device("cpu"))

    assert budget == 1024**3


@pytest.mark.parametrize("size", [(720, 1280), (4000, 6000), (1280, 720), (100, 5000), (700, 700)])
def test_fitted_tile_computes_few_pixels(size):
    from mbmamba_cli.inference.tiling import fit_tile_to_image

    height, width = size
    max_pixels = 672 * 672

    tile_h, tile_w, pixels = fit_tile_to_image(height, width, max_pixels, overlap=32)

    padded = (-(-tile_h // 16) * 16) * (-(-tile_w // 16) * 16)
    assert padded <= max_pixels
    assert pixels <= 1.2 * height * width
    square_h, square_w = min(672, height), min(672, width)
    square = plan_grid(height, width, square_h, square_w, 32)
    assert pixels <= square.count * (-(-square_h // 16) * 16) * (-(-square_w // 16) * 16)


def test_engine_reshapes_square_tiles_for_720p():
    model = nn.Conv2d(3, 3, 3, padding=1)
    estimate = MemoryEstimate(bytes_per_pixel=100, fixed_bytes=0, source="test")
    budget = 672 * 672 * 100
    engine = Deblurrer(model, "cpu", "fp32", tile="auto", max_memory=budget, memory_estimate=estimate)

    shape = engine._initial_tile(720, 1280)

    assert (shape.height, shape.width) == (720, 448)
    assert "reshaped from 672x672 (WxH)" in shape.reason


def test_small_tile_warns_about_lost_overlap(caplog):
    engine = Deblurrer(nn.Identity(), "cpu", "fp32", tile=32, tile_overlap=32)

    with caplog.at_level(logging.WARNING, logger="mbmamba"):
        engine.deblur(np.zeros((100, 100, 3), np.float32))

    assert "overlap" in caplog.text
    assert "--tile" in caplog.text
