"""The inference engine: deblur one image held in host memory, tile by tile on the device.

`Deblurrer.deblur` takes an (h, w, 3) float32 array and returns one of the same shape. The image
and the blended output stay in host memory; only one tile at a time goes to the device. The tile
size is fixed (`tile=N`), the whole image (`tile=0`), or chosen from a memory budget (`tile="auto"`).
On an out-of-memory error the engine frees the device caches, halves the tile and retries the
image. Below `MIN_TILE` it stops, and the image fails with `DeblurError`.

`create_deblurrer` does the set-up for the command line: device, precision, scan backend, weights,
and the start-up log line that names all four.
"""

import gc
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mbmamba_cli.inference.distributed import DistContext, resolve_device
from mbmamba_cli.inference.precision import Precision, autocast_context, resolve_precision
from mbmamba_cli.inference.tiling import (
    HOST_BYTES_PER_PIXEL,
    MIN_TILE,
    MemoryEstimate,
    TileGrid,
    TileShape,
    choose_tile,
    default_memory_budget,
    fit_tile_to_image,
    format_bytes,
    halve_tile,
    memory_estimate_for,
    parse_memory_size,
    parse_tile_option,
    plan_grid,
)
from mbmamba_cli.log import get_logger

logger = get_logger(__name__)

DEFAULT_TILE_OVERLAP = 32

# Substrings (lower case) of the RuntimeError messages that PyTorch's CPU and CUDA allocators, cuBLAS
# and cuDNN raise when memory runs out.
_OOM_MESSAGES = ("out of memory", "not enough memory", "failed to allocate memory", "alloc_failed")


class DeblurError(RuntimeError):
    """An image could not be deblurred (out of memory at the smallest tile, non-finite output)."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for the device and host out-of-memory errors that a smaller tile can avoid."""
    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in _OOM_MESSAGES)


class Deblurrer:
    """Runs a deblurring model over images of any size, tile by tile.

    Args:
        model: maps (b, 3, h, w) in [0, 1] to (b, 3, h, w); already on `device`. Its `spec`
            (a VariantSpec), when present, gives `multiple_of`, `dtypes` and the memory estimate.
        device: where tiles run.
        precision: a resolved `Precision`, or "auto"/"fp32"/"bf16"/"fp16".
        tile: "auto", 0 (whole image) or a tile side in pixels.
        tile_overlap: pixels that neighbouring tiles share.
        max_memory: memory budget for one tile's forward, bytes or "4GB"; None measures free memory.
        memory_estimate: overrides the variant's row of the memory table (models without a spec).
        min_tile: smallest tile side tried after out-of-memory errors.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str = "cpu",
        precision: Precision | str = "auto",
        tile: int | str = "auto",
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        max_memory: int | str | None = None,
        *,
        memory_estimate: MemoryEstimate | None = None,
        min_tile: int = MIN_TILE,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        spec = getattr(model, "spec", None)
        self.multiple_of = int(getattr(spec, "multiple_of", 16))
        allowed = tuple(getattr(spec, "dtypes", ("float32", "bfloat16", "float16")))

        self.precision = (
            precision
            if isinstance(precision, Precision)
            else resolve_precision(precision, self.device, allowed)
        )
        self.tile = parse_tile_option(tile)
        if tile_overlap < 0:
            raise ValueError(f"invalid tile overlap {tile_overlap}: it must be 0 or more pixels")
        self.tile_overlap = tile_overlap
        self.max_memory = parse_memory_size(max_memory) if isinstance(max_memory, str) else max_memory
        self.memory_estimate = memory_estimate or memory_estimate_for(
            getattr(spec, "name", None), self.precision.name
        )
        self.min_tile = min_tile

        # Lowered after an out-of-memory error and kept for the rest of the run, so later images
        # start at a tile size that is known to fit.
        self._tile_limit: TileShape | None = None
        self._last_plan: str | None = None

    def deblur(self, pixels: np.ndarray) -> np.ndarray:
        """Deblur an (h, w, 3) float32 RGB image in [0, 1]; returns (h, w, 3) float32 in [0, 1].

        Raises DeblurError when even the smallest tile runs out of memory, or when the model's
        output is not finite in float32 either.
        """
        pixels = _check_pixels(pixels)
        height, width = pixels.shape[:2]
        shape = self._initial_tile(height, width)

        while True:
            grid = plan_grid(height, width, shape.height, shape.width, self.tile_overlap, self.multiple_of)
            self._log_plan(grid, shape.reason)
            try:
                return self._run_grid(pixels, grid)
            except Exception as error:  # noqa: BLE001  narrowed just below
                if not is_out_of_memory(error):
                    raise
                message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__

            # Outside the except block, so the traceback's references to the tile tensors are gone.
            self._free_memory()
            smaller = halve_tile(
                TileShape(grid.tile_height, grid.tile_width, ""), self.multiple_of, self.min_tile
            )
            if smaller is None:
                raise DeblurError(
                    f"out of memory on {self.device} even with {grid.tile_height}x{grid.tile_width} tiles "
                    f"({message}); free memory on the device, lower --max-memory or use --device cpu"
                )
            logger.warning(
                "out of memory on %s with %dx%d tiles (%s); retrying this image with %dx%d tiles",
                self.device,
                grid.tile_height,
                grid.tile_width,
                message,
                smaller.height,
                smaller.width,
            )
            self._tile_limit = smaller
            shape = TileShape(smaller.height, smaller.width, "halved after out of memory")

    def _initial_tile(self, height: int, width: int) -> TileShape:
        """Choose the first tile to try for an image: the requested one, capped after out-of-memory errors."""
        if self.tile == 0:
            shape = TileShape(height, width, "--tile 0: whole image")
        elif self.tile != "auto":
            shape = TileShape(self.tile, self.tile, f"--tile {self.tile}")
        else:
            budget, source = self._budget(height, width)
            shape = choose_tile(height, width, budget, self.memory_estimate, self.multiple_of, self.min_tile)
            shape = TileShape(shape.height, shape.width, f"auto: {shape.reason}; budget from {source}")
            shape = self._fit_to_image(shape, height, width, budget)

        limit = self._tile_limit
        if limit is not None and (shape.height > limit.height or shape.width > limit.width):
            shape = TileShape(
                min(shape.height, limit.height),
                min(shape.width, limit.width),
                f"capped at {limit.height}x{limit.width} after an earlier out-of-memory error",
            )
        return shape

    def _fit_to_image(self, shape: TileShape, height: int, width: int, budget: int) -> TileShape:
        """Reshape a square auto tile when another shape within the budget computes fewer pixels."""
        if (shape.height, shape.width) == (height, width):
            return shape
        fitted = fit_tile_to_image(
            height,
            width,
            self.memory_estimate.max_pixels(budget),
            self.tile_overlap,
            self.multiple_of,
            self.min_tile,
        )
        square = plan_grid(height, width, shape.height, shape.width, self.tile_overlap, self.multiple_of)
        square_pixels = square.count * shape.height * shape.width
        if fitted is None or fitted[2] >= square_pixels:
            return shape
        tile_h, tile_w, pixels = fitted
        return TileShape(
            tile_h,
            tile_w,
            f"{shape.reason}; reshaped from {shape.width}x{shape.height} (WxH) to compute "
            f"{pixels / (height * width):.2f}x the image instead of {square_pixels / (height * width):.2f}x",
        )

    def _budget(self, height: int, width: int) -> tuple[int, str]:
        """Return the bytes one tile's forward may use, and where the number came from."""
        if self.max_memory is not None:
            return self.max_memory, f"--max-memory {format_bytes(self.max_memory)}"

        budget, source = default_memory_budget(self.device)
        if self.device.type == "cpu":
            # The image, the output and the weight sums share the host memory with the tiles.
            host = HOST_BYTES_PER_PIXEL * height * width
            budget = max(0, budget - host)
            source = f"{source}, less {format_bytes(host)} for the image buffers"
        return budget, source

    def _log_plan(self, grid: TileGrid, reason: str) -> None:
        """Log a tiling decision when its grid differs from the previous image's."""
        plan = grid.describe()
        if plan != self._last_plan:
            logger.info("tiling: %s (%s)", plan, reason)
            if not grid.is_whole_image and grid.overlap < self.tile_overlap:
                logger.warning(
                    "%dx%d tiles can keep only %d px of the requested %d px overlap, so seams may show; "
                    "use a larger --tile",
                    grid.tile_height,
                    grid.tile_width,
                    grid.overlap,
                    self.tile_overlap,
                )
            self._last_plan = plan

    def _run_grid(self, pixels: np.ndarray, grid: TileGrid) -> np.ndarray:
        """Deblur every tile of `grid` and blend them into a new (h, w, 3) float32 host array."""
        if grid.is_whole_image:
            output, recomputed = self._forward_tile(pixels)
            self._warn_recomputed(recomputed, 1)
            return np.clip(output, 0.0, 1.0, out=output)

        output = np.zeros_like(pixels)
        weight_sum = np.zeros(pixels.shape[:2], dtype=np.float32)
        recomputed_tiles = 0
        for rows, cols, weight in grid.tiles():
            tile_output, recomputed = self._forward_tile(pixels[rows, cols])
            recomputed_tiles += recomputed
            output[rows, cols] += tile_output * weight[..., None]
            weight_sum[rows, cols] += weight

        self._warn_recomputed(recomputed_tiles, grid.count)
        output /= weight_sum[..., None]
        return np.clip(output, 0.0, 1.0, out=output)

    def _forward_tile(self, tile: np.ndarray) -> tuple[np.ndarray, bool]:
        """Run one (th, tw, 3) host tile through the model on the device.

        Returns the (th, tw, 3) float32 host output and whether it had to be recomputed in float32
        because the reduced-precision output was not finite.
        """
        x = torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))[None].to(self.device)

        with torch.inference_mode(), autocast_context(self.precision, self.device):
            y = self._model_output(x)
        recomputed = False
        if self.precision.uses_autocast and not bool(torch.isfinite(y).all()):
            recomputed = True
            with torch.inference_mode():
                y = self._model_output(x)

        if not bool(torch.isfinite(y).all()):
            raise DeblurError(
                f"the model returned NaN or infinite values in float32 for a {tile.shape[0]}x{tile.shape[1]} "
                "tile; the weights may be corrupt: check them with `mbmamba info`"
            )
        return np.ascontiguousarray(y[0].permute(1, 2, 0).float().cpu().numpy()), recomputed

    def _model_output(self, x: torch.Tensor) -> torch.Tensor:
        """Call the model on (1, 3, th, tw) and return (1, 3, th, tw) float32, checking the shape."""
        y = self.model(x)
        if isinstance(y, list | tuple):
            y = y[-1]
        if y.shape != x.shape:
            raise DeblurError(
                f"the model returned shape {tuple(y.shape)} for an input of shape {tuple(x.shape)}"
            )
        return y.float()

    def _warn_recomputed(self, recomputed: int, total: int) -> None:
        if recomputed:
            logger.warning(
                "%d of %d tile(s) had NaN or infinite values in %s and were recomputed in float32",
                recomputed,
                total,
                self.precision.name,
            )

    def _free_memory(self) -> None:
        """Drop cached allocations after an out-of-memory error, so the retry starts clean."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


def _check_pixels(pixels: np.ndarray) -> np.ndarray:
    """Validate an (h, w, 3) image and return it as contiguous float32."""
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 3 or pixels.shape[2] != 3:
        shape = getattr(pixels, "shape", type(pixels).__name__)
        raise ValueError(f"expected an (h, w, 3) RGB array, got {shape}")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"expected an image of at least 1x1 pixels, got {pixels.shape[0]}x{pixels.shape[1]}")
    return np.ascontiguousarray(pixels, dtype=np.float32)


def create_deblurrer(
    variant: str,
    weights: Path | None = None,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    tile: int | str = "auto",
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    max_memory: int | str | None = None,
    context: DistContext | None = None,
) -> Deblurrer:
    """Set up a Deblurrer for a variant: device, precision, scan backend and weights.

    Logs one line naming the device, dtype, backend and weights, and one warning when the weights'
    manifest records that they do not beat the blurred input. Raises ValueError subclasses for invalid
    options (DeviceError, PrecisionError) and the loader's WeightsNotFoundError.
    """
    from mbmamba_cli.models import get_variant, set_chunk_batching, set_scan_backend
    from mbmamba_cli.models.weights import load_model
    from mbmamba_cli.ops.backends import resolve_backend

    spec = get_variant(variant)
    torch_device = resolve_device(device, context)
    chosen = resolve_precision(precision, torch_device, spec.dtypes)
    backend_name, backend_reason = resolve_backend(backend, torch_device)
    if isinstance(max_memory, str):
        max_memory = parse_memory_size(max_memory)
    tile = parse_tile_option(tile)

    if torch_device.type == "cuda":
        # Kernels that launch on the current device (the CUDA scan) must use this rank's GPU.
        torch.cuda.set_device(torch_device)
    model, info = load_model(spec.name, weights, device=torch_device)
    set_scan_backend(model, backend_name)
    # One Mamba call per chunk was faster on CPU (docs/benchmarks.md); on CUDA one batched call
    # launches 4x fewer kernels. NOTE: the CUDA choice has not been timed yet.
    set_chunk_batching(model, torch_device.type == "cuda")
    logger.info(
        "device %s, dtype %s (%s), backend %s (%s), weights %s",
        _describe_device(torch_device),
        chosen.describe(),
        chosen.reason,
        backend_name,
        backend_reason,
        info.summary,
    )
    quality_warning = info.quality_warning()
    if quality_warning:
        logger.warning("%s", quality_warning)

    return Deblurrer(model, torch_device, chosen, tile, tile_overlap, max_memory)


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
