"""Batch deblurring: a list of image files in, one result per file out, whatever fails on the way.

`run_batch` plans the jobs (inputs, output paths, skips), then overlaps the three stages of every
file: a reader thread decodes the next images into a small queue, the calling thread deblurs, and a
writer thread encodes and saves. The queues are bounded, so at most about
`prefetch + WRITE_QUEUE_SIZE + 2` images are in memory at once. A file that cannot be read,
deblurred or written becomes a `failed` result and the batch goes on.

Output rules: an output that already exists is overwritten, or skipped with `skip_existing`. A
batch where an output path would be an input file, or the output of another input, is refused
before any work (`mbmamba_cli.io.paths.plan_outputs`).

Under torchrun, rank 0 plans the jobs and sends the list to every rank, each rank runs its share
(see `DistContext.shard`), and rank 0 merges the results.
"""

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from mbmamba_cli.inference.distributed import (
    DistContext,
    broadcast_from_primary,
    close_process_group,
    context_from_env,
    gather_to_primary,
    init_process_group,
)
from mbmamba_cli.inference.tiling import parse_memory_size, parse_tile_option
from mbmamba_cli.log import get_logger

logger = get_logger(__name__)

Status = Literal["done", "skipped", "failed"]

DEFAULT_PREFETCH = 2
WRITE_QUEUE_SIZE = 2

# How often a thread blocked on a full or empty queue checks whether the batch was stopped.
_QUEUE_POLL_SECONDS = 0.2
_END = object()


class BatchSetupError(Exception):
    """The batch could not start: invalid options, missing input, weights or device."""


@dataclass(frozen=True)
class DeblurRequest:
    """Everything `mbmamba deblur` was asked to do."""

    input: str  # an image file, a folder, or "-" for a list of paths on standard input
    output: Path
    variant: str = "s"
    weights: Path | None = None
    recursive: bool = False
    suffix: str = ""
    ext: str | None = None
    skip_existing: bool = False
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"
    tile: str | int = "auto"
    tile_overlap: int = 32
    max_memory: str | int | None = None
    prefetch: int = DEFAULT_PREFETCH

    def validate(self) -> None:
        """Raise BatchSetupError for option values that are invalid before any file is looked at."""
        try:
            parse_tile_option(self.tile)
            if isinstance(self.max_memory, str):
                parse_memory_size(self.max_memory)
        except ValueError as error:
            raise BatchSetupError(str(error)) from None

        if self.tile_overlap < 0:
            raise BatchSetupError(f"invalid --tile-overlap {self.tile_overlap}: use 0 or more pixels")
        if self.prefetch < 1:
            raise BatchSetupError(f"invalid prefetch {self.prefetch}: at least 1 image must be read ahead")
        if self.weights is not None and not Path(self.weights).is_file():
            raise BatchSetupError(f"weights file {self.weights} not found; check the path given to --weights")


@dataclass(frozen=True)
class Job:
    """One input file and its output path; `index` is its place in the planned list."""

    index: int
    input: Path
    output: Path


@dataclass
class FileResult:
    """Outcome of one input file: status, output path, seconds spent and the failure reason."""

    index: int
    input: str
    output: str | None
    status: Status
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the `--json` object of this file."""
        return {
            "input": self.input,
            "output": self.output,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }


@dataclass
class BatchSummary:
    """Results of a batch, in input order. `merged` is False on ranks other than 0 under torchrun."""

    results: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0
    merged: bool = True

    def count(self, status: Status) -> int:
        """Number of results with `status`."""
        return sum(result.status == status for result in self.results)

    @property
    def failures(self) -> list[FileResult]:
        """The failed results."""
        return [result for result in self.results if result.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when no file failed, else 1. Ranks other than 0 return 0: rank 0 reports for all."""
        return 1 if self.merged and self.failures else 0

    def to_json(self) -> dict[str, Any]:
        """Return the final `--json` object: counts per status and the wall-clock seconds."""
        return {
            "done": self.count("done"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "seconds": round(self.seconds, 3),
        }


class BatchObserver:
    """Receives progress from `run_batch`; the command line draws it. Any object with these two
    methods will do. They may be called from the writer thread, one call at a time."""

    def planned(self, total: int) -> None:
        """Called once with the number of files this process handles (skipped ones included)."""

    def finished(self, result: FileResult) -> None:
        """Called once per file as soon as its result is known."""


def run_batch(
    request: DeblurRequest,
    observer: BatchObserver | None = None,
    stdin: TextIO | None = None,
    deblurrer_factory: Callable[..., Any] | None = None,
    context: DistContext | None = None,
) -> BatchSummary:
    """Deblur every input of `request` and return the results (merged over ranks on rank 0).

    `deblurrer_factory` takes create_deblurrer's keyword arguments (the default is create_deblurrer).
    Raises BatchSetupError when the batch cannot start; a file's failure is a result, not an error.
    """
    started = time.perf_counter()
    observer = observer or BatchObserver()
    request.validate()
    context = context or context_from_env()
    joined = init_process_group(context)

    try:
        jobs = _plan_on_primary(request, stdin, context)
        my_jobs = context.shard(jobs)
        if context.is_distributed:
            logger.info(
                "rank %d of %d takes %d of %d files",
                context.rank,
                context.world_size,
                len(my_jobs),
                len(jobs),
            )
        results = _run_jobs(request, my_jobs, observer, deblurrer_factory, context)

        gathered = gather_to_primary(context, results)
    finally:
        if joined:
            close_process_group()

    seconds = time.perf_counter() - started
    if gathered is None:
        return BatchSummary(results, seconds, merged=False)
    return merge_rank_results(gathered, seconds)


def merge_rank_results(per_rank: list[list[FileResult]], seconds: float) -> BatchSummary:
    """Merge the results of every rank into one summary in input order.

    Raises ValueError when two ranks report the same file, which means the ranks did not shard the
    same file list.
    """
    results = sorted((result for rank in per_rank for result in rank), key=lambda result: result.index)
    indices = [result.index for result in results]
    if len(set(indices)) != len(indices):
        duplicates = sorted({index for index in indices if indices.count(index) > 1})
        raise ValueError(
            f"ranks reported the same files (indices {duplicates[:5]}); their file lists differed"
        )
    return BatchSummary(results, seconds)


def plan_jobs(request: DeblurRequest, stdin: TextIO | None = None) -> list[Job]:
    """List the inputs (folders in sorted order, lists in their order) and give each its output.

    Raises BatchSetupError when the input is missing or contains no images, or when an output would
    overwrite an input file or another input's output. Such a batch is rejected before any work.
    """
    from mbmamba_cli.io import paths

    try:
        items = paths.collect_inputs(request.input, request.recursive, stdin, exclude=Path(request.output))
        planned = paths.plan_outputs(items, Path(request.output), request.suffix, request.ext)
    except (FileNotFoundError, ValueError) as error:
        raise BatchSetupError(str(error)) from None
    return [Job(index, item.path, output) for index, (item, output) in enumerate(planned)]


def _plan_on_primary(request: DeblurRequest, stdin: TextIO | None, context: DistContext) -> list[Job]:
    """Plan on rank 0 and share the plan, so every rank shards the same list (and only rank 0
    reads standard input)."""
    planned: list[Job] | str
    if context.is_primary:
        try:
            planned = plan_jobs(request, stdin)
        except BatchSetupError as error:
            planned = str(error)
    else:
        planned = ""

    planned = broadcast_from_primary(context, planned)
    if isinstance(planned, str):
        raise BatchSetupError(planned)
    return planned


def _run_jobs(
    request: DeblurRequest,
    jobs: list[Job],
    observer: BatchObserver,
    deblurrer_factory: Callable[..., Any] | None,
    context: DistContext,
) -> list[FileResult]:
    """Report the skipped jobs, then deblur the rest; returns every result in input order."""
    lock = threading.Lock()
    results: list[FileResult] = []

    def emit(result: FileResult) -> None:
        with lock:
            results.append(result)
            if result.status == "failed":
                logger.error("failed: %s: %s", result.input, result.error)
            observer.finished(result)

    observer.planned(len(jobs))
    pending = []
    for job in jobs:
        if request.skip_existing and job.output.exists():
            emit(FileResult(job.index, str(job.input), str(job.output), "skipped"))
        else:
            pending.append(job)

    # The deblurrer's set-up line comes first in the log, so the skip count is logged after it.
    deblurrer = _create_deblurrer(request, deblurrer_factory, context) if pending else None
    skipped = sum(result.status == "skipped" for result in results)
    if skipped:
        logger.info("skipped %d file(s) whose output exists (--skip-existing)", skipped)
    if deblurrer is not None:
        _Pipeline(deblurrer, request.prefetch, emit).run(pending)
    return sorted(results, key=lambda result: result.index)


def _create_deblurrer(
    request: DeblurRequest, factory: Callable[..., Any] | None, context: DistContext
) -> Any:
    """Build the deblurrer, turning option and set-up errors into BatchSetupError."""
    from mbmamba_cli.inference.engine import create_deblurrer
    from mbmamba_cli.models.weights import WeightsError

    factory = factory or create_deblurrer
    try:
        return factory(
            variant=request.variant,
            weights=request.weights,
            device=request.device,
            backend=request.backend,
            precision=request.precision,
            tile=request.tile,
            tile_overlap=request.tile_overlap,
            max_memory=request.max_memory,
            context=context,
        )
    except (ValueError, WeightsError) as error:
        raise BatchSetupError(str(error)) from None


@dataclass
class _Decoded:
    job: Job
    image: Any = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class _Deblurred:
    job: Job
    image: Any = None
    pixels: Any = None
    error: str | None = None
    seconds: float = 0.0


class _Pipeline:
    """Reader thread -> deblur on the calling thread -> writer thread, joined by bounded queues."""

    def __init__(self, deblurrer: Any, prefetch: int, emit: Callable[[FileResult], None]) -> None:
        self.deblurrer = deblurrer
        self.emit = emit
        self.decoded: queue.Queue = queue.Queue(maxsize=prefetch)
        self.deblurred: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_SIZE)
        self.stop = threading.Event()
        self.thread_errors: list[BaseException] = []

    def run(self, jobs: list[Job]) -> None:
        """Process `jobs`; returns when every result was emitted. Re-raises a crash of either thread."""
        reader = threading.Thread(
            target=self._guard, args=(self._read_all, jobs), name="mbmamba-reader", daemon=True
        )
        writer = threading.Thread(
            target=self._guard, args=(self._write_all,), name="mbmamba-writer", daemon=True
        )
        reader.start()
        writer.start()

        try:
            self._deblur_all()
        except BaseException:
            self.stop.set()
            raise
        finally:
            self._put(self.deblurred, _END, force=True)
            writer.join()
            self.stop.set()
            reader.join()

        if self.thread_errors:
            raise self.thread_errors[0]

    def _guard(self, target: Callable, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as error:  # noqa: BLE001  re-raised on the calling thread by run()
            self.thread_errors.append(error)
            self.stop.set()

    def _read_all(self, jobs: list[Job]) -> None:
        from mbmamba_cli.io.images import read_image

        for job in jobs:
            if self.stop.is_set():
                break
            started = time.perf_counter()
            try:
                item = _Decoded(job, image=read_image(job.input))
            except Exception as error:  # noqa: BLE001  one unreadable file must not stop the batch
                item = _Decoded(job, error=_describe(error))
            item.seconds = time.perf_counter() - started
            if not self._put(self.decoded, item):
                return
        self._put(self.decoded, _END)

    def _deblur_all(self) -> None:
        while True:
            item = self._get(self.decoded)
            if item is _END or item is None:
                return

            result = _Deblurred(item.job, item.image, error=item.error, seconds=item.seconds)
            if item.error is None:
                started = time.perf_counter()
                try:
                    result.pixels = self.deblurrer.deblur(item.image.pixels)
                except Exception as error:  # noqa: BLE001  one failing image must not stop the batch
                    result.error = _describe(error)
                result.seconds += time.perf_counter() - started
            if not self._put(self.deblurred, result):
                return

    def _write_all(self) -> None:
        from mbmamba_cli.io.images import write_image

        while True:
            item = self._get(self.deblurred, wait_for_end=True)
            if item is _END or item is None:
                return

            job = item.job
            if item.error is None:
                started = time.perf_counter()
                try:
                    write_image(job.output, item.pixels, like=item.image)
                except Exception as error:  # noqa: BLE001  one unwritable file must not stop the batch
                    item.error = _describe(error)
                item.seconds += time.perf_counter() - started

            status: Status = "failed" if item.error else "done"
            self.emit(
                FileResult(job.index, str(job.input), str(job.output), status, item.seconds, item.error)
            )

    def _put(self, target: queue.Queue, item: Any, force: bool = False) -> bool:
        """Put `item`, waiting for space; gives up (False) when the batch stops, unless `force`."""
        while True:
            if self.stop.is_set() and not force:
                return False
            try:
                target.put(item, timeout=_QUEUE_POLL_SECONDS)
                return True
            except queue.Full:
                if force and self.thread_errors:
                    return False

    def _get(self, source: queue.Queue, wait_for_end: bool = False) -> Any:
        """Take the next item; None when the batch stops (the writer drains until the end marker)."""
        while True:
            if self.stop.is_set() and not wait_for_end:
                return None
            try:
                return source.get(timeout=_QUEUE_POLL_SECONDS)
            except queue.Empty:
                if wait_for_end and self.thread_errors:
                    return None


def _describe(error: BaseException) -> str:
    """Describe a failure for the summary: the message of the project's errors, else type and message."""
    from mbmamba_cli.inference.engine import DeblurError
    from mbmamba_cli.io.images import ImageIOError

    message = str(error).strip()
    if isinstance(error, DeblurError | ImageIOError | OSError) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _resolved(path: Path) -> Path:
    return Path(path).expanduser().resolve()
