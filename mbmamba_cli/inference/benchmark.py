"""Model size and speed: params, MACs, latency and peak memory of several variants in one run.

`run_benchmark` measures every requested model with the same device, dtype, input size and thread
count, so ratios between rows are valid. For each model it:

1. counts params and MACs at the requested (b, 3, h, w) on the meta device with `count_macs`
   (convolutions and matrix products from `torch.utils.flop_counter`, plus 4.5 b l d n MACs per
   selective scan, element-wise ops excluded; FLOPs = 2 x MACs);
2. builds the model with random weights (seed 0), runs `warmup` untimed forward passes and then
   `runs` timed ones, and reports their median and 90th percentile (linear interpolation between
   runs). CPU runs are timed with `time.perf_counter`, and the process CPU time is recorded too;
   CUDA runs are timed with CUDA events. Models run one after the other, or round-robin with
   `interleave`, so that load from other processes falls on all of them alike;
3. measures peak memory during the runs. On CUDA this is `torch.cuda.max_memory_allocated`,
   counted as if the model were alone on the device (weights, input and activations). On Linux
   CPUs it is the peak resident set size (VmHWM) minus the resident size before the runs, which is
   the forward pass's working memory. Before the runs, glibc's `malloc_trim` hands freed heap pages
   back and a write to /proc/self/clear_refs resets the high-water mark;
4. with a paired folder, deblurs it with the variant's shipped weights and reports PSNR and SSIM.

"Latency per MAC over the baseline" divides a row's median latency per MAC by that of the U-Net
baseline: 1.0 means the network runs its MACs as fast as the convolution decoder runs its own.
"""

import ctypes
import gc
import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from mbmamba_cli.log import get_logger
from mbmamba_cli.models import (
    VARIANTS,
    build_model,
    get_variant,
    set_chunk_batching,
    set_scan_backend,
)
from mbmamba_cli.models.complexity import count_macs

logger = get_logger(__name__)

BASELINE = "unet"
DEFAULT_MODELS = ("s", "b", "l", "unet")
CHUNK_BATCHING_CHOICES = ("auto", "on", "off")

MAC_CONVENTION = (
    "MACs: multiply-accumulates of one inference forward pass at the size shown: convolutions and "
    "matrix products counted by torch.utils.flop_counter, plus 4.5 x b x l x d x n per selective "
    "scan, element-wise ops excluded. FLOPs = 2 x MACs. Papers in this field often print MACs "
    "under the name FLOPs."
)

_SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*(?:[xX\u00d7]\s*(\d+)\s*)?$")
_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


class BenchmarkError(ValueError):
    """An invalid benchmark option. The message names the value and the fix."""


def parse_size(text: str) -> tuple[int, int]:
    """Parse `--size` into (height, width).

    "256" means 256x256. "WIDTHxHEIGHT" puts the width first, as video resolutions are written, so
    "1280x720" is a landscape 720p frame and "720x1280" its portrait form.
    """
    match = _SIZE_PATTERN.match(text)
    if match is None:
        raise BenchmarkError(
            f"invalid size {text!r}: use N for an NxN input (e.g. 256) or WIDTHxHEIGHT (e.g. 1280x720)"
        )

    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) is not None else width
    if width < 1 or height < 1:
        raise BenchmarkError(f"invalid size {text!r}: width and height must be at least 1 pixel")
    return height, width


def parse_models(text: str) -> tuple[str, ...]:
    """Parse comma-separated variants ("s,b,l,unet" or "mbmamba-s") into short names, in order."""
    names: list[str] = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            name = get_variant(item).name
        except ValueError as error:
            raise BenchmarkError(f"invalid --models entry: {error}") from None
        if name not in names:
            names.append(name)

    if not names:
        raise BenchmarkError(f"invalid --models {text!r}: name at least one of {', '.join(VARIANTS)}")
    return tuple(names)


@dataclass(frozen=True)
class BenchmarkRequest:
    """Options of one benchmark run, shared by every model in `models`."""

    models: tuple[str, ...] = DEFAULT_MODELS
    height: int = 256
    width: int = 256
    batch: int = 1
    warmup: int = 2
    runs: int = 10
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    chunk_batching: str = "auto"
    quality_dir: Path | None = None
    count_only: bool = False  # params and MACs only: no model is built on the device or timed
    interleave: bool = False  # time the models round-robin instead of one after the other

    def __post_init__(self) -> None:
        if not self.models:
            raise BenchmarkError("no models to benchmark: pass --models, e.g. --models s,unet")
        if self.height < 1 or self.width < 1:
            raise BenchmarkError(
                f"invalid size {self.width}x{self.height}: both sides must be at least 1 pixel"
            )
        if self.batch < 1:
            raise BenchmarkError(f"invalid --batch {self.batch}: it must be at least 1")
        if self.warmup < 0:
            raise BenchmarkError(f"invalid --warmup {self.warmup}: it must be 0 or more")
        if self.runs < 1:
            raise BenchmarkError(f"invalid --runs {self.runs}: it must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise BenchmarkError(f"invalid --threads {self.threads}: it must be at least 1")
        if self.chunk_batching not in CHUNK_BATCHING_CHOICES:
            raise BenchmarkError(
                f"invalid --chunk-batching {self.chunk_batching!r}: use {', '.join(CHUNK_BATCHING_CHOICES)}"
            )
        if self.quality_dir is not None and not Path(self.quality_dir).is_dir():
            raise BenchmarkError(
                f"--with-psnr folder {self.quality_dir} not found; "
                "pass a folder that contains blur/ and sharp/"
            )


@dataclass
class BenchmarkRow:
    """One model's measurements; `to_json` gives its `--json` record."""

    model: str
    params: int
    macs: int
    scan_macs: int
    height: int
    width: int
    batch: int
    device: str
    device_name: str
    dtype: str
    backend: str | None  # None for a model without a selective scan
    chunk_batching: bool | None  # None for a model without MemVSSM blocks
    threads: int
    torch_version: str
    cuda_version: str | None
    warmup: int
    runs: int
    latencies_ms: list[float] = field(default_factory=list)
    cpu_times_ms: list[float] = field(default_factory=list)
    load_average: float | None = None  # 1-minute system load just before the runs (Unix)
    peak_memory_mb: float | None = None
    memory_method: str = ""
    latency_per_mac_vs_baseline: float | None = None
    cpu_time_per_mac_vs_baseline: float | None = None
    interleaved: bool = False
    psnr: float | None = None
    ssim: float | None = None
    quality_note: str | None = None
    error: str | None = None

    @property
    def flops(self) -> int:
        """FLOPs as 2 x MACs."""
        return 2 * self.macs

    @property
    def latency_ms_median(self) -> float | None:
        """Median of the timed runs in milliseconds; None when the model failed."""
        return float(np.median(self.latencies_ms)) if self.latencies_ms else None

    @property
    def latency_ms_p90(self) -> float | None:
        """90th percentile of the timed runs in milliseconds (linear interpolation)."""
        return float(np.percentile(self.latencies_ms, 90)) if self.latencies_ms else None

    @property
    def cpu_time_ms_median(self) -> float | None:
        """Median CPU time of this process per timed run in milliseconds; None on CUDA."""
        return float(np.median(self.cpu_times_ms)) if self.cpu_times_ms else None

    def add_timing(self, timing: "Timing") -> None:
        """Append one timed run."""
        self.latencies_ms.append(timing.wall_ms)
        if timing.cpu_ms is not None:
            self.cpu_times_ms.append(timing.cpu_ms)

    def to_json(self) -> dict[str, Any]:
        """Return the row as one `--json` record, without the per-run latencies."""
        record = asdict(self)
        del record["latencies_ms"], record["cpu_times_ms"]
        record["flops"] = self.flops
        record["latency_ms_median"] = _rounded(self.latency_ms_median, 3)
        record["latency_ms_p90"] = _rounded(self.latency_ms_p90, 3)
        record["cpu_time_ms_median"] = _rounded(self.cpu_time_ms_median, 3)
        record["peak_memory_mb"] = _rounded(self.peak_memory_mb, 1)
        record["latency_per_mac_vs_baseline"] = _rounded(self.latency_per_mac_vs_baseline, 3)
        record["cpu_time_per_mac_vs_baseline"] = _rounded(self.cpu_time_per_mac_vs_baseline, 3)
        return record


def json_lines(rows: list[BenchmarkRow]) -> list[str]:
    """Serialise each row as one line of JSON, for `--json`."""
    return [json.dumps(row.to_json()) for row in rows]


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def cpu_name() -> str:
    """Read the CPU's model name from /proc/cpuinfo; fall back to what `platform` reports."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""

    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """Return the GPU's name on CUDA and the CPU's model name otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


class PeakMemoryMeter:
    """Peak memory of the code run between `start` and `stop`, in MB (10^6 bytes).

    CUDA: `torch.cuda.max_memory_allocated` during the runs, minus what was allocated at `start`,
    plus `own_bytes` (the model's weights and input). The result is the footprint the model would
    have alone on the device, even when other models are resident. CPU (Linux): VmHWM minus the
    VmRSS at `start`, after resetting the high-water mark through /proc/self/clear_refs. Where that
    reset is not permitted, the value is exact only when the runs set a new high-water mark, and
    `stop` returns None otherwise. `method` describes what was measured.
    """

    def __init__(self, device: torch.device, own_bytes: int = 0) -> None:
        self.device = device
        self.own_bytes = own_bytes
        self.method = ""
        self._allocated_at_start = 0
        self._baseline_kb = 0
        self._hwm_at_start_kb = 0
        self._reset_ok = False

    def start(self) -> None:
        """Reset the peak counters; call it right before the runs to measure."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._allocated_at_start = torch.cuda.memory_allocated(self.device)
            self.method = (
                "CUDA max_memory_allocated during the runs, as if the model were alone on the "
                "device (weights, input and activations)"
            )
            return

        _release_free_heap()
        self._reset_ok = _reset_high_water_mark()
        status = _read_proc_status()
        if status is None:
            self.method = "unavailable: CPU peak memory needs Linux /proc/self/status"
            return

        self._baseline_kb = status["VmRSS"]
        self._hwm_at_start_kb = status["VmHWM"]
        reset = "reset through /proc/self/clear_refs" if self._reset_ok else "not resettable here"
        self.method = f"CPU peak RSS increase during the runs (VmHWM, {reset})"

    def stop(self) -> float | None:
        """Return the peak in MB since `start`, or None when it cannot be known."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._allocated_at_start
            return (peak + self.own_bytes) / 1e6

        status = _read_proc_status()
        if status is None:
            return None
        if not self._reset_ok and status["VmHWM"] <= self._hwm_at_start_kb:
            # The high-water mark still shows an earlier, higher peak, which hides this one.
            self.method += "; an earlier peak hides this one, so measure one model per call"
            return None
        return max(0, status["VmHWM"] - self._baseline_kb) * 1024 / 1e6


def _read_proc_status() -> dict[str, int] | None:
    """Return VmRSS and VmHWM of this process in kB, or None without /proc."""
    try:
        text = _PROC_STATUS.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None

    values = {}
    for key in ("VmRSS", "VmHWM"):
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
        if match is None:
            return None
        values[key] = int(match.group(1))
    return values


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where the kernel or sandbox forbids it."""
    try:
        _PROC_CLEAR_REFS.write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS, so an earlier model's free memory is not reused."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        # NOTE: without glibc, memory freed by an earlier model can be reused without raising the
        # RSS, so a later model's CPU peak can read low. Measure one model per call there.
        pass


class Timing(NamedTuple):
    """Latency of one forward pass, and the CPU time this process spent in it (CPU runs only)."""

    wall_ms: float
    cpu_ms: float | None


def forward_ms(model: nn.Module, x: torch.Tensor, autocast: Callable[[], Any]) -> Timing:
    """Run one forward pass on `x` (b, 3, h, w) and return its latency in milliseconds.

    `autocast` returns the context the forward runs in. Call it under `torch.inference_mode()`.
    """
    if x.device.type == "cuda":
        # NOTE: the CUDA timing and memory paths have not been run on a GPU yet.
        start_event = torch.cuda.Event(enable_timing=True)
        end_event = torch.cuda.Event(enable_timing=True)
        start_event.record()
        with autocast():
            model(x)
        end_event.record()
        end_event.synchronize()
        return Timing(start_event.elapsed_time(end_event), None)

    # CPU time sums all threads of this process. With one thread it is close to the latency the
    # pass would have on an idle machine, because time-slicing by other processes is not counted.
    start_cpu = time.process_time()
    start = time.perf_counter()
    with autocast():
        model(x)
    wall_ms = (time.perf_counter() - start) * 1000.0
    return Timing(wall_ms, (time.process_time() - start_cpu) * 1000.0)


def time_forward(
    model: nn.Module,
    x: torch.Tensor,
    warmup: int,
    runs: int,
    autocast: Callable[[], Any],
) -> list[Timing]:
    """Run `warmup` untimed and `runs` timed forward passes on `x` (b, 3, h, w); return the timings."""
    with torch.inference_mode():
        for _ in range(warmup):
            with autocast():
                model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

        return [forward_ms(model, x, autocast) for _ in range(runs)]


def _load_average() -> float | None:
    """Return the 1-minute system load average, or None where the OS does not report it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _chunk_batching_state(model: nn.Module) -> bool | None:
    """Return whether the MemVSSM blocks batch their chunks; None for a model without them."""
    from mbmamba_cli.models.memvssm import MemVSSMBlock

    states = {m.batch_chunks for m in model.modules() if isinstance(m, MemVSSMBlock)}
    return None if not states else all(states)


def _has_scan(model: nn.Module) -> bool:
    from mbmamba_cli.models.mamba import Mamba

    return any(isinstance(module, Mamba) for module in model.modules())


@dataclass(frozen=True)
class BenchmarkSetup:
    """Device, precision, scan backend and threads, resolved once and shared by every row."""

    device: torch.device
    precision: Any  # mbmamba_cli.inference.precision.Precision
    backend: str
    threads: int


def resolve_setup(request: BenchmarkRequest) -> BenchmarkSetup:
    """Resolve the device, one precision valid for every requested model, threads and backend.

    Raises DeviceError, PrecisionError or the backend's ValueError for an invalid option.
    """
    from mbmamba_cli.inference.distributed import resolve_device
    from mbmamba_cli.inference.precision import resolve_precision
    from mbmamba_cli.ops.backends import resolve_backend

    device = resolve_device(request.device)
    if request.threads is not None:
        torch.set_num_threads(request.threads)
    threads = torch.get_num_threads()

    # One dtype for all rows, or the ratios would compare different arithmetic.
    allowed = tuple(
        name
        for name in ("float32", "bfloat16", "float16")
        if all(name in VARIANTS[model].dtypes for model in request.models)
    )
    precision = resolve_precision(request.precision, device, allowed)
    backend, reason = resolve_backend(request.backend, device)

    logger.info(
        "benchmark on %s (%s), threads %d, dtype %s (%s), scan backend %s (%s)",
        device,
        device_name(device),
        threads,
        precision.describe(),
        precision.reason,
        backend,
        reason,
    )
    if device.type == "cpu" and threads > (os.cpu_count() or threads):
        logger.warning(
            "%d threads on %d visible CPU cores: the latencies include oversubscription",
            threads,
            os.cpu_count(),
        )
    return BenchmarkSetup(device, precision, backend, threads)


def _complexity_row(variant: str, request: BenchmarkRequest, setup: BenchmarkSetup) -> BenchmarkRow:
    """Build a row with the params, MACs and environment filled in, before any run."""
    with torch.device("meta"):
        meta_model = build_model(variant)
    report = count_macs(meta_model, (request.batch, 3, request.height, request.width))

    return BenchmarkRow(
        model=get_variant(variant).display_name,
        params=report.params,
        macs=report.macs,
        scan_macs=report.scan_macs,
        height=request.height,
        width=request.width,
        batch=request.batch,
        device=str(setup.device),
        device_name=device_name(setup.device),
        dtype=setup.precision.name,
        backend=setup.backend if _has_scan(meta_model) else None,
        chunk_batching=None,
        threads=setup.threads,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        warmup=request.warmup,
        runs=request.runs,
    )


@dataclass
class _Subject:
    """A model ready to time: its row, the module and input on the device, and their bytes."""

    row: BenchmarkRow
    model: nn.Module
    x: torch.Tensor  # (b, 3, h, w)
    own_bytes: int  # weights, buffers and input


def _log_complexity(row: BenchmarkRow) -> None:
    scan = f" ({row.scan_macs / 1e9:.2f} G of them in the scan)" if row.scan_macs else ""
    logger.info(
        "%s at %dx%d, batch %d: %.2f M params, %.2f G MACs%s",
        row.model,
        row.width,
        row.height,
        row.batch,
        row.params / 1e6,
        row.macs / 1e9,
        scan,
    )


def _prepare(row: BenchmarkRow, variant: str, request: BenchmarkRequest, setup: BenchmarkSetup):
    """Build the variant with seed-0 random weights on the device, with its (b, 3, h, w) input."""
    torch.manual_seed(0)
    model = build_model(variant).eval().to(setup.device)
    set_scan_backend(model, setup.backend)
    if request.chunk_batching != "auto":
        set_chunk_batching(model, request.chunk_batching == "on")
    row.chunk_batching = _chunk_batching_state(model)

    shape = (request.batch, 3, request.height, request.width)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(setup.device)
    tensors = [*model.parameters(), *model.buffers(), x]
    own_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return _Subject(row, model, x, own_bytes)


def _check_load(row: BenchmarkRow, setup: BenchmarkSetup) -> None:
    """Record the 1-minute load average and warn when other processes seem to use the CPU."""
    row.load_average = _load_average()
    if setup.device.type != "cpu" or row.load_average is None:
        return

    # This process adds up to `threads` to the load, so a load above that means other work.
    busy = row.load_average >= setup.threads + 1
    log = logger.warning if busy else logger.debug
    log(
        "1-minute load average %.1f before timing %s (threads %d)%s",
        row.load_average,
        row.model,
        setup.threads,
        ": other processes are using the CPU, so latencies will be inflated" if busy else "",
    )


def _fail_out_of_memory(row: BenchmarkRow, error: BaseException, setup: BenchmarkSetup) -> None:
    """Raise `error` unless it is an out-of-memory error; otherwise record it as the row's error."""
    from mbmamba_cli.inference.engine import is_out_of_memory

    if not is_out_of_memory(error):
        raise error
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
    row.error = (
        f"out of memory on {setup.device} at {row.width}x{row.height}, batch {row.batch} "
        f"({first_line}); lower --batch or --size"
    )
    row.latencies_ms = []
    row.cpu_times_ms = []
    row.peak_memory_mb = None
    logger.error("%s: %s", row.model, row.error)


def _log_result(row: BenchmarkRow) -> None:
    if row.error is not None:
        return
    peak = "n/a" if row.peak_memory_mb is None else f"{row.peak_memory_mb:.0f} MB"
    logger.info(
        "%s: median %.1f ms, p90 %.1f ms over %d runs, peak memory %s",
        row.model,
        row.latency_ms_median,
        row.latency_ms_p90,
        len(row.latencies_ms),
        peak,
    )


def _free_device_memory(setup: BenchmarkSetup) -> None:
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()


def measure_model(variant: str, request: BenchmarkRequest, setup: BenchmarkSetup) -> BenchmarkRow:
    """Count, build and time one variant: its warm-up runs, then its timed runs.

    An out-of-memory error becomes the row's `error`, so the other models still run.
    """
    from mbmamba_cli.inference.precision import autocast_context

    row = _complexity_row(variant, request, setup)
    _log_complexity(row)
    if request.count_only:
        row.warmup = row.runs = 0
        return row

    subject = _prepare(row, variant, request, setup)
    _check_load(row, setup)

    meter = PeakMemoryMeter(setup.device, subject.own_bytes)
    meter.start()
    try:
        timings = time_forward(
            subject.model,
            subject.x,
            request.warmup,
            request.runs,
            lambda: autocast_context(setup.precision, setup.device),
        )
        row.peak_memory_mb = meter.stop()
        for timing in timings:
            row.add_timing(timing)
    except Exception as error:  # noqa: BLE001  narrowed by _fail_out_of_memory
        _fail_out_of_memory(row, error, setup)
    row.memory_method = meter.method

    del subject
    _free_device_memory(setup)
    _log_result(row)
    return row


def measure_interleaved(request: BenchmarkRequest, setup: BenchmarkSetup) -> list[BenchmarkRow]:
    """Time all models round-robin, one forward pass each per round, with every model resident.

    Load from other processes then falls on every model alike, which keeps the ratios between
    rows valid on a shared machine. Round r starts with model r mod n, so no model always runs
    first. Peak memory is measured around each timed forward pass and the largest is kept.
    """
    from mbmamba_cli.inference.precision import autocast_context

    rows = [_complexity_row(variant, request, setup) for variant in request.models]
    for row in rows:
        row.interleaved = True
        _log_complexity(row)
    if request.count_only:
        for row in rows:
            row.warmup = row.runs = 0
        return rows

    subjects = [
        _prepare(row, variant, request, setup) for row, variant in zip(rows, request.models, strict=True)
    ]
    for subject in subjects:
        _check_load(subject.row, setup)

    def autocast():
        return autocast_context(setup.precision, setup.device)

    with torch.inference_mode():
        for subject in subjects:
            try:
                time_forward(subject.model, subject.x, request.warmup, 0, autocast)
            except Exception as error:  # noqa: BLE001  narrowed by _fail_out_of_memory
                _fail_out_of_memory(subject.row, error, setup)

        for round_index in range(request.runs):
            shift = round_index % len(subjects)
            for subject in subjects[shift:] + subjects[:shift]:
                row = subject.row
                if row.error is not None:
                    continue
                meter = PeakMemoryMeter(setup.device, subject.own_bytes)
                meter.start()
                try:
                    row.add_timing(forward_ms(subject.model, subject.x, autocast))
                except Exception as error:  # noqa: BLE001  narrowed by _fail_out_of_memory
                    _fail_out_of_memory(row, error, setup)
                    continue
                peak = meter.stop()
                if peak is not None:
                    row.peak_memory_mb = max(peak, row.peak_memory_mb or 0.0)
                row.memory_method = meter.method + ", largest of its timed runs, interleaved"

    del subjects
    _free_device_memory(setup)
    for row in rows:
        _log_result(row)
    return rows


def add_baseline_ratios(rows: list[BenchmarkRow]) -> None:
    """Divide each row's median latency (and CPU time) per MAC by the baseline's, where both ran."""
    baseline_name = VARIANTS[BASELINE].display_name
    baseline = next((r for r in rows if r.model == baseline_name and r.latencies_ms), None)
    if baseline is None:
        return

    for row in rows:
        if row is baseline or not row.latencies_ms or row.macs == 0:
            continue
        row.latency_per_mac_vs_baseline = (row.latency_ms_median / row.macs) / (
            baseline.latency_ms_median / baseline.macs
        )
        if row.cpu_times_ms and baseline.cpu_times_ms:
            row.cpu_time_per_mac_vs_baseline = (row.cpu_time_ms_median / row.macs) / (
                baseline.cpu_time_ms_median / baseline.macs
            )


def score_quality(
    variant: str, pairs: list, request: BenchmarkRequest, setup: BenchmarkSetup
) -> tuple[float | None, float | None, str]:
    """Deblur `pairs` (ImagePair objects) with the variant's shipped weights and score them.

    Returns (mean PSNR, mean SSIM, note). Without shipped weights both scores are None and the note
    is "n/a (no weights)". Tiling follows `mbmamba deblur`'s defaults on this device.
    """
    from mbmamba_cli.inference.engine import create_deblurrer
    from mbmamba_cli.metrics.evaluate import evaluate_pairs
    from mbmamba_cli.models.weights import WeightsNotFoundError

    display_name = get_variant(variant).display_name
    try:
        deblurrer = create_deblurrer(
            variant,
            None,
            device=str(setup.device),
            backend=setup.backend,
            precision=request.precision,
        )
    except WeightsNotFoundError as error:
        logger.warning("%s: no PSNR/SSIM without shipped weights (%s)", display_name, error)
        return None, None, "n/a (no weights)"

    report = evaluate_pairs(pairs, protocol="gopro", deblurrer=deblurrer)
    if report.failures:
        names = ", ".join(failure.name for failure in report.failures[:5])
        raise BenchmarkError(
            f"{len(report.failures)} pairs in {request.quality_dir} could not be scored "
            f"({names}); fix or remove them"
        )
    logger.info(
        "%s: PSNR %.2f dB, SSIM %.4f over %d pairs in %s",
        display_name,
        report.overall.psnr,
        report.overall.ssim,
        report.overall.count,
        request.quality_dir,
    )
    return report.overall.psnr, report.overall.ssim, f"{report.overall.count} pairs"


def run_benchmark(
    request: BenchmarkRequest, on_row: Callable[[BenchmarkRow], None] | None = None
) -> list[BenchmarkRow]:
    """Measure every model of `request` and return the rows with the baseline ratios set.

    Models run one after the other, or round-robin with `request.interleave`. `on_row` is called
    with each finished row, for progress display. Invalid options raise a ValueError subclass
    (BenchmarkError, DeviceError, PrecisionError, PairingError) before any model runs. PyTorch's
    thread count is restored on return.
    """
    threads_before = torch.get_num_threads()
    try:
        return _run(request, on_row)
    finally:
        torch.set_num_threads(threads_before)


def _run(request: BenchmarkRequest, on_row: Callable[[BenchmarkRow], None] | None) -> list[BenchmarkRow]:
    setup = resolve_setup(request)
    pairs = None
    if request.quality_dir is not None:
        from mbmamba_cli.metrics.pairing import pairs_from_dataset

        # Read before any timing, so a folder without pairs fails in seconds rather than minutes.
        pairs = pairs_from_dataset(Path(request.quality_dir))

    if request.interleave:
        rows = measure_interleaved(request, setup)
    else:
        rows = []
        for variant in request.models:
            rows.append(measure_model(variant, request, setup))

    for variant, row in zip(request.models, rows, strict=True):
        if pairs is not None and row.error is None:
            row.psnr, row.ssim, row.quality_note = score_quality(variant, pairs, request, setup)
        if on_row is not None:
            on_row(row)

    add_baseline_ratios(rows)
    return rows


def ratio_lines(rows: list[BenchmarkRow]) -> list[str]:
    """Format one line per row that has a latency-per-MAC ratio over the baseline."""
    baseline = VARIANTS[BASELINE].display_name
    lines = []
    for row in rows:
        if row.latency_per_mac_vs_baseline is None:
            continue
        line = f"{row.model}: latency per MAC {row.latency_per_mac_vs_baseline:.2f}x that of {baseline}"
        if row.cpu_time_per_mac_vs_baseline is not None:
            line += f" (CPU time per MAC {row.cpu_time_per_mac_vs_baseline:.2f}x)"
        lines.append(line)
    return lines


def caption_lines(rows: list[BenchmarkRow]) -> list[str]:
    """Format the notes under the table: MAC convention, timing, memory method and environment."""
    if not rows:
        return []

    first = rows[0]
    clock = "CUDA events" if first.device.startswith("cuda") else "wall clock (time.perf_counter)"
    lines = [MAC_CONVENTION]
    if any(row.latencies_ms for row in rows):
        order = "round-robin (--interleave)" if first.interleaved else "one after the other"
        lines.append(
            f"Latency: median and p90 of {first.runs} timed runs after {first.warmup} warm-up runs "
            f"on a {first.batch}x3x{first.height}x{first.width} (b x c x h x w) input, random "
            f"weights, {clock}, models timed {order}."
        )
    if any(row.cpu_times_ms for row in rows):
        lines.append(
            "CPU time: median CPU time of this process per run, all threads summed. With --threads 1 "
            "it estimates the latency on an idle machine, because time taken by other processes is "
            "not counted."
        )
    methods = sorted({row.memory_method for row in rows if row.memory_method})
    lines.extend(f"Peak memory: {method}." for method in methods)

    cuda = f", CUDA {first.cuda_version}" if first.cuda_version else ""
    lines.append(
        f"Device {first.device} ({first.device_name}), threads {first.threads}, "
        f"torch {first.torch_version}{cuda}."
    )
    return lines
