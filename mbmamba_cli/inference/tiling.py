"""Tile planning for images larger than the device memory allows: tile size, grid and blend weights.

An image of h x w pixels is cut into overlapping tiles. Each tile goes through the network on the
device, and its output is added into host-side accumulators with a feather weight. The weight ramps
towards 0 at the tile's inner borders (the borders shared with a neighbouring tile) and stays 1 at
the image borders. Dividing by the summed weights gives the blended image. Neighbouring ramps are
raised-cosine halves over exactly the pixels the two tiles share, so the two weights sum to 1 there.

The tile size comes from a memory budget and a per-variant estimate of the memory a forward pass
needs per pixel (`MEMORY_ESTIMATES`). Tile starts are multiples of the model's `multiple_of`, so the
downsampling grid of every tile lines up with the grid of the whole image.

NOTE: MBMamba's scans run over the whole feature map, so a tile sees only tile-local context: tiled
and untiled outputs differ. Overlap and feathering keep the difference small and free of visible
seams, not zero.
"""

import itertools
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mbmamba_cli.log import get_logger

logger = get_logger(__name__)

# Smallest tile side the engine tries before it gives up on an image after out-of-memory errors.
MIN_TILE = 64

# Fractions of the free memory that the default budget uses. The rest is left for the allocator's
# fragmentation, the host-side image buffers, the decode/encode threads and other processes.
CUDA_BUDGET_FRACTION = 0.8
CPU_BUDGET_FRACTION = 0.5
# Cap of the default CPU budget. CPU time grows with the pixels, not the tile size, so larger tiles
# buy little speed there (32 px of overlap on 720 px tiles costs about 9%), while this cap keeps a
# 6000x4000 photo under 4 GB of host memory in all. --max-memory lifts it.
CPU_BUDGET_CAP = int(2.5 * 1024**3)

# Host bytes per image pixel held outside the tiles: float32 input and output (3 channels each) and
# the float32 weight sum.
HOST_BYTES_PER_PIXEL = 3 * 4 + 3 * 4 + 4

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one forward pass as `fixed_bytes + bytes_per_pixel * padded pixels`."""

    fixed_bytes: int
    bytes_per_pixel: float
    source: str

    def bytes_for(self, height: int, width: int, multiple_of: int = 16) -> int:
        """Estimate the peak bytes of a forward pass on a (1, 3, height, width) input."""
        pixels = _round_up(height, multiple_of) * _round_up(width, multiple_of)
        return int(self.fixed_bytes + self.bytes_per_pixel * pixels)

    def max_pixels(self, budget_bytes: int) -> int:
        """Return the largest padded pixel count whose estimate fits in `budget_bytes` (may be 0)."""
        return max(0, int((budget_bytes - self.fixed_bytes) / self.bytes_per_pixel))


# Peak memory of one eval-mode forward, keyed by variant name, then dtype name.
# Measured with `measure_memory_estimate(variant, "cpu", dtype, (128, 256))` (one fresh process per
# size, peak resident set above the resident set after the model was built) on a 2-core x86-64 CPU
# with torch 2.13.0+cpu and the PyTorch scan. `bytes_per_pixel` is the slope between the two sizes.
# The slope shrinks at larger inputs: for S in float32 it is 5553 B/px between 128 and 256 but
# 4676 B/px between 256 and 512, so these rows overestimate large tiles by about 20%.
# NOTE: every row, CUDA included, comes from these CPU runs: no GPU was available to measure the
# CUDA allocator, whose workspaces can need more. The default CUDA budget keeps 20% of the free
# memory back, and the engine halves the tile on out-of-memory.
_MEASURED = "measured on CPU at 128x128 and 256x256"
MEMORY_ESTIMATES: dict[str, dict[str, MemoryEstimate]] = {
    "s": {
        "float32": MemoryEstimate(55_705_600, 5553.0, _MEASURED),
        "bfloat16": MemoryEstimate(48_407_893, 4401.0, _MEASURED),
    },
    "b": {
        "float32": MemoryEstimate(40_797_525, 6293.0, _MEASURED),
        "bfloat16": MemoryEstimate(48_631_808, 5076.0, _MEASURED),
    },
    "l": {
        "float32": MemoryEstimate(28_528_640, 6865.0, _MEASURED),
        "bfloat16": MemoryEstimate(42_632_533, 5342.0, _MEASURED),
    },
    "unet": {
        "float32": MemoryEstimate(0, 6789.0, _MEASURED),
        "bfloat16": MemoryEstimate(7_270_400, 3895.0, _MEASURED),
    },
}


def memory_estimate_for(variant: str | None, dtype_name: str) -> MemoryEstimate:
    """Look up the estimate for a variant and dtype name.

    float16 uses the bfloat16 row (same element size). A variant without a row (a custom or test
    model) gets the largest row of the table, so it gets small tiles rather than out-of-memory errors.
    """
    rows = MEMORY_ESTIMATES.get(variant or "", {})
    for name in (dtype_name, "bfloat16" if dtype_name == "float16" else None, "float32"):
        if name in rows:
            return rows[name]

    largest = max(
        (estimate for row in MEMORY_ESTIMATES.values() for estimate in row.values()),
        key=lambda estimate: estimate.bytes_for(1024, 1024),
    )
    return MemoryEstimate(
        largest.fixed_bytes, largest.bytes_per_pixel, f"largest row, no row for {variant!r}"
    )


def parse_memory_size(text: str) -> int:
    """Parse a memory size such as "4GB", "512MB", "1.5GiB" or "2000000000" into bytes.

    K, M, G, T (with or without B) are powers of 1000; KiB, MiB, GiB, TiB are powers of 1024.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"invalid memory size {text!r}: use a number with an optional unit, e.g. 4GB, 512MB, "
            "1.5GiB (KB, MB, GB are powers of 1000; KiB, MiB, GiB powers of 1024)"
        )

    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"invalid memory size {text!r}: it must be larger than 0 bytes")
    return size


def parse_tile_option(text: str | int) -> int | str:
    """Parse the `--tile` value: "auto", 0 (whole image) or a tile side in pixels (at least 16)."""
    if isinstance(text, int):
        value = text
    elif text.strip().lower() == "auto":
        return "auto"
    else:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(
                f"invalid tile {text!r}: use auto, 0 for the whole image, or a side in pixels, e.g. 512"
            ) from None

    if value < 0 or 0 < value < 16:
        raise ValueError(f"invalid tile {value}: use 0 for the whole image or a side of at least 16 px")
    return value


def format_bytes(size: float) -> str:
    """Format a byte count for logs, in powers of 1000 ("4.0 GB")."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} TB"


def available_host_memory() -> tuple[int, str]:
    """Return the host memory free for this process in bytes, and where the number came from."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass

    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
        return pages * page_size, "free physical pages from sysconf"
    except (ValueError, OSError, AttributeError):
        # NOTE: a guess for platforms without /proc/meminfo or sysconf; --max-memory overrides it.
        return 4 * 1000**3, "a 4 GB guess (free memory unknown on this platform; set --max-memory)"


def default_memory_budget(device) -> tuple[int, str]:
    """Return the memory budget for tiles on `device` (a torch.device) and the reason, for the log."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(free * CUDA_BUDGET_FRACTION)
        return budget, (
            f"{CUDA_BUDGET_FRACTION:.0%} of {format_bytes(free)} free on {device} (of {format_bytes(total)})"
        )

    available, source = available_host_memory()
    budget = int(available * CPU_BUDGET_FRACTION)
    if budget > CPU_BUDGET_CAP:
        cap = format_bytes(CPU_BUDGET_CAP)
        return CPU_BUDGET_CAP, f"the default CPU cap of {cap} (--max-memory lifts it)"
    return budget, f"{CPU_BUDGET_FRACTION:.0%} of {format_bytes(available)} ({source})"


@dataclass(frozen=True)
class TileShape:
    """A tile's height and width in pixels, and why this size was chosen."""

    height: int
    width: int
    reason: str


def choose_tile(
    height: int,
    width: int,
    budget_bytes: int,
    estimate: MemoryEstimate,
    multiple_of: int = 16,
    min_tile: int = MIN_TILE,
) -> TileShape:
    """Choose the largest tile whose estimated forward fits in `budget_bytes`.

    The whole image is one tile when it fits. Otherwise the tile is square with a side that is a
    multiple of `multiple_of`. When the image is thinner than that square, the tile spans the thin
    side and grows along the other. The side never drops below `min_tile`, even when the budget is
    smaller than a `min_tile` tile needs; out-of-memory handling takes over from there.
    """
    needed = estimate.bytes_for(height, width, multiple_of)
    if needed <= budget_bytes:
        return TileShape(
            height,
            width,
            f"whole image fits: needs about {format_bytes(needed)} of {format_bytes(budget_bytes)}",
        )

    max_pixels = estimate.max_pixels(budget_bytes)
    side = max(min_tile, _round_down(int(math.sqrt(max_pixels)), multiple_of))
    tile_h, tile_w = min(side, height), min(side, width)

    # A thin image: the tile covers the thin side and uses the rest of the budget along the other.
    if height < side:
        tile_w = min(width, max(side, _round_down(max_pixels // _round_up(height, multiple_of), multiple_of)))
    elif width < side:
        tile_h = min(height, max(side, _round_down(max_pixels // _round_up(width, multiple_of), multiple_of)))

    tile_bytes = estimate.bytes_for(tile_h, tile_w, multiple_of)
    if tile_bytes > budget_bytes:
        reason = (
            f"budget {format_bytes(budget_bytes)} is below the {format_bytes(tile_bytes)} a "
            f"{tile_h}x{tile_w} tile needs; trying the minimum tile"
        )
    else:
        reason = (
            f"largest tile within {format_bytes(budget_bytes)}: needs about {format_bytes(tile_bytes)} "
            f"({estimate.bytes_per_pixel:.0f} B/px + {format_bytes(estimate.fixed_bytes)}, {estimate.source})"
        )
    return TileShape(tile_h, tile_w, reason)


def fit_tile_to_image(
    height: int,
    width: int,
    max_pixels: int,
    overlap: int,
    multiple_of: int = 16,
    min_tile: int = MIN_TILE,
) -> tuple[int, int, int] | None:
    """Shape the tile so the grid computes the fewest pixels: returns (tile_h, tile_w, pixels) or None.

    A square tile wastes work on images that are not multiples of it: 672x672 tiles over a 720x1280
    frame form a 2x2 grid that computes 1.96 times the frame, while 720x448 tiles need 3 tiles and
    1.05 times. Every row count is tried; for each, the tile spans its share of the height and takes
    the widest width the pixel budget (padded to `multiple_of`) allows, spread evenly over the columns.
    """
    best = None
    max_rows = max(1, math.ceil(height / max(multiple_of, min_tile - overlap)))
    for rows in range(1, max_rows + 1):
        tile_h = height if rows == 1 else math.ceil((height + (rows - 1) * overlap) / rows)
        tile_h = min(height, _round_up(tile_h, multiple_of))
        if rows > 1 and tile_h < min(min_tile, height):
            break
        max_w = _round_down(max_pixels // _round_up(tile_h, multiple_of), multiple_of)
        if max_w < min(min_tile, width):
            continue

        if max_w >= width:
            tile_w = width
        else:
            columns = math.ceil((width - overlap) / max(1, max_w - overlap))
            tile_w = _round_up(math.ceil((width + (columns - 1) * overlap) / columns), multiple_of)
            tile_w = min(width, tile_w, max_w)

        grid = plan_grid(height, width, tile_h, tile_w, overlap, multiple_of)
        pixels = grid.count * _round_up(tile_h, multiple_of) * _round_up(tile_w, multiple_of)
        if best is None or pixels < best[2]:
            best = (tile_h, tile_w, pixels)
    return best


def halve_tile(shape: TileShape, multiple_of: int = 16, min_tile: int = MIN_TILE) -> TileShape | None:
    """Halve both sides of a tile (rounded down to `multiple_of`), or return None below `min_tile`."""
    longest = max(shape.height, shape.width)
    if longest <= min_tile:
        return None

    def half(side: int) -> int:
        return min(side, max(min_tile, _round_down(side // 2, multiple_of)))

    return TileShape(half(shape.height), half(shape.width), f"halved from {shape.height}x{shape.width}")


@dataclass(frozen=True)
class TileGrid:
    """Tile layout of one image: start rows `ys` and start columns `xs` of tiles of at most
    `tile_height` x `tile_width` pixels (the last row and column of tiles may be smaller)."""

    image_height: int
    image_width: int
    tile_height: int
    tile_width: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def count(self) -> int:
        """Number of tiles."""
        return len(self.ys) * len(self.xs)

    @property
    def is_whole_image(self) -> bool:
        """True when one tile covers the image."""
        return self.count == 1

    def describe(self) -> str:
        """Describe the tile, overlap and grid sizes for a log line."""
        if self.is_whole_image:
            return f"whole image {self.image_width}x{self.image_height} (WxH) as one tile"
        rows, cols = len(self.ys), len(self.xs)
        return (
            f"tile {self.tile_width}x{self.tile_height} (WxH), overlap {self.overlap} px, "
            f"grid {cols}x{rows} ({self.count} tiles) over {self.image_width}x{self.image_height}"
        )

    def tiles(self) -> Iterator[tuple[slice, slice, np.ndarray]]:
        """Yield (rows, columns, weight) per tile; weight is float32 (tile h, tile w), > 0 everywhere."""
        row_ranges = _ranges(self.ys, self.tile_height, self.image_height)
        col_ranges = _ranges(self.xs, self.tile_width, self.image_width)
        row_weights = [_feather(i, row_ranges) for i in range(len(row_ranges))]
        col_weights = [_feather(j, col_ranges) for j in range(len(col_ranges))]

        for (y0, y1), weight_y in zip(row_ranges, row_weights, strict=True):
            for (x0, x1), weight_x in zip(col_ranges, col_weights, strict=True):
                yield slice(y0, y1), slice(x0, x1), np.outer(weight_y, weight_x)


def plan_grid(
    height: int, width: int, tile_height: int, tile_width: int, overlap: int, multiple_of: int = 16
) -> TileGrid:
    """Plan the tile grid of an image: tiles of at most `tile_height` x `tile_width`, neighbours sharing
    at least `overlap` pixels (less only where the tile is too small for it, see `effective_overlap`)."""
    if height < 1 or width < 1:
        raise ValueError(f"invalid image size {height}x{width}: both sides must be at least 1 pixel")
    if tile_height < 1 or tile_width < 1:
        raise ValueError(f"invalid tile size {tile_height}x{tile_width}: both sides must be at least 1 pixel")
    if overlap < 0:
        raise ValueError(f"invalid tile overlap {overlap}: it must be 0 or more pixels")

    tile_height, tile_width = min(tile_height, height), min(tile_width, width)
    used_overlap = min(
        overlap,
        effective_overlap(tile_height, overlap, multiple_of) if tile_height < height else overlap,
        effective_overlap(tile_width, overlap, multiple_of) if tile_width < width else overlap,
    )
    ys = _axis_starts(height, tile_height, used_overlap, multiple_of)
    xs = _axis_starts(width, tile_width, used_overlap, multiple_of)
    return TileGrid(height, width, tile_height, tile_width, used_overlap, tuple(ys), tuple(xs))


def effective_overlap(tile: int, overlap: int, multiple_of: int = 16) -> int:
    """Return the overlap a tile side can keep: at most (tile - 2 * multiple_of) / 2, so that tiles
    still advance after their starts are rounded to multiples of `multiple_of`."""
    return max(0, min(overlap, (tile - 2 * multiple_of) // 2))


def measure_forward_peak(model, height: int, width: int, device, dtype) -> int:
    """Measure the peak bytes of one eval-mode forward of `model` on a (1, 3, height, width) input.

    On CUDA this is the allocator's peak above the memory allocated before the call. On CPU it is
    the peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) above the resident set
    before the call. Memory freed by earlier forwards and kept by the C allocator hides part of the
    next peak, so measure each size in a fresh process (see `measure_memory_estimate`).
    """
    import torch

    x = torch.rand(1, 3, height, width, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode(), autocast:
            model(x)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before

    before = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    with torch.inference_mode(), autocast:
        model(x)
    return max(0, _proc_status_bytes("VmHWM") - before)


def _proc_status_bytes(field: str) -> int:
    """Read a memory field of /proc/self/status ("VmRSS", "VmHWM") in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field} line; CPU memory can only be measured on Linux")


def measure_memory_estimate(
    variant: str, device_name: str = "cpu", dtype_name: str = "float32", sizes: tuple[int, int] = (128, 256)
) -> MemoryEstimate:
    """Measure a variant's memory estimate from forwards at two square sizes, in fresh processes.

    Each size runs in its own Python process, so memory that an earlier forward freed into the C
    allocator's pools cannot hide part of the peak. `bytes_per_pixel` is the slope between the two
    sizes; `fixed_bytes` is the rest.
    """
    import json
    import subprocess
    import sys

    peaks = []
    for size in sizes:
        code = (
            "import json, torch\n"
            "from mbmamba_cli.models import build_model\n"
            "from mbmamba_cli.inference.tiling import measure_forward_peak\n"
            f"device = torch.device({device_name!r})\n"
            f"model = build_model({variant!r}).eval().to(device)\n"
            f"peak = measure_forward_peak(model, {size}, {size}, device, getattr(torch, {dtype_name!r}))\n"
            "print(json.dumps(peak))\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peaks.append(json.loads(result.stdout.strip().splitlines()[-1]))

    small, large = sizes[0] ** 2, sizes[1] ** 2
    slope = (peaks[1] - peaks[0]) / (large - small)
    fixed = max(0, int(peaks[0] - slope * small))
    source = f"measured at {sizes[0]}x{sizes[0]} and {sizes[1]}x{sizes[1]} on {device_name}, {dtype_name}"
    return MemoryEstimate(fixed, slope, source)


def _axis_starts(length: int, tile: int, overlap: int, align: int) -> list[int]:
    """Start offsets of the tiles along one axis: the fewest tiles whose neighbours share at least
    `overlap` pixels once the starts are rounded to multiples of `align`.

    Starts are spread evenly, then rounded to the nearest multiple of `align` (or, where rounding
    makes them collide, stepped by a multiple of `align`). The last tile ends at the image border;
    its start is rounded up, so it may be shorter than `tile`.
    """
    if tile >= length:
        return [0]

    span = length - tile
    last = _round_up(span, align) if _round_up(span, align) < length else span
    fewest = max(1, math.ceil(span / max(1, tile - overlap)))
    for gaps in range(fewest, fewest + 4):
        starts = [_round_nearest(i * span / gaps, align) for i in range(gaps)] + [last]
        shared = [previous + tile - start for previous, start in itertools.pairwise(starts)]
        advancing = all(start > previous for previous, start in itertools.pairwise(starts))
        if advancing and min(shared) >= overlap:
            return starts

    # Even spacing collides after rounding when the gaps are near `align`: step by whole multiples.
    stride = _round_down(tile - overlap, align)
    if stride > 0:
        return list(range(0, last, stride)) + [last]

    # No aligned plan exists (a tile barely larger than `align`): give up the alignment.
    gaps = math.ceil(span / max(1, tile - overlap))
    return sorted({round(i * span / gaps) for i in range(gaps + 1)})


def _ranges(starts: tuple[int, ...], tile: int, length: int) -> list[tuple[int, int]]:
    """(start, end) of each tile along one axis, clipped to the image."""
    return [(start, min(start + tile, length)) for start in starts]


def _feather(index: int, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Blend weights along one axis for tile `index`: raised-cosine ramps over the pixels shared with
    the previous and next tile, 1 elsewhere (and at the image borders). Values lie in (0, 1]."""
    start, end = ranges[index]
    positions = np.arange(end - start, dtype=np.float64) + 0.5
    weight = np.ones(end - start, dtype=np.float64)

    if index > 0:
        shared = ranges[index - 1][1] - start
        if shared > 0:
            weight = np.minimum(weight, _ramp(positions / shared))
    if index + 1 < len(ranges):
        shared = end - ranges[index + 1][0]
        if shared > 0:
            weight = np.minimum(weight, _ramp((end - start - positions) / shared))
    return weight.astype(np.float32)


def _ramp(fraction: np.ndarray) -> np.ndarray:
    """Raised-cosine ramp: 0 at fraction 0, 1 at fraction >= 1; ramp(f) + ramp(1 - f) = 1."""
    clipped = np.clip(fraction, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * clipped)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _round_down(value: int, multiple: int) -> int:
    return value // multiple * multiple


def _round_nearest(value: float, multiple: int) -> int:
    return int(round(value / multiple)) * multiple
