"""The evaluation runner: score image pairs (optionally deblurring them first) under a protocol.

`evaluate_pairs` is the entry point for `mbmamba eval` and for `mbmamba benchmark --with-psnr`.
With a `Deblurrer` it restores each blurred image and scores the result after rounding it to the
ground truth's bit depth, so the score equals that of the file `mbmamba deblur` would write.
Without one it scores the prediction files attached to the pairs.

Under `torchrun` (an initialised process group) rank r scores pairs r, r + world, r + 2 world, ...
of the list sorted by (dataset, name); the per-dataset sums are reduced over ranks and every rank
returns the same combined report.
"""

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from mbmamba_cli.log import get_logger
from mbmamba_cli.metrics.distributed import all_gather, all_reduce_sum, rank_and_world
from mbmamba_cli.metrics.pairing import ImagePair
from mbmamba_cli.metrics.protocols import IMPLEMENTATION, Protocol, get_protocol
from mbmamba_cli.metrics.report import DatasetSummary, EvalReport, PairFailure, PairResult

log = get_logger(__name__)

# Columns of the per-dataset sums that are reduced over ranks.
_COUNT, _PSNR, _SSIM, _GAP, _GAP_COUNT = range(5)


class PairScoreError(Exception):
    """A pair that cannot be scored (unreadable file, sizes that differ); names the file at fault."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def shard_pairs(pairs: Iterable[ImagePair]) -> list[ImagePair]:
    """Return this rank's pairs: every world-th pair of the (dataset, name) order, from its rank."""
    ordered = sorted(pairs, key=lambda pair: (pair.dataset, pair.name))
    rank, world = rank_and_world()
    return ordered[rank::world]


def _quantize(pixels: np.ndarray, bit_depth: int) -> np.ndarray:
    """Round (h, w, 3) values in [0, 1] to the levels of a `bit_depth`-bit file (8 or 16)."""
    levels = 65535.0 if bit_depth == 16 else 255.0
    return np.round(np.clip(pixels.astype(np.float64), 0.0, 1.0) * levels) / levels


def _read_pixels(path) -> tuple[np.ndarray, int]:
    """Read an image as (h, w, 3) float64 RGB in [0, 1] and its bit depth; alpha is dropped.

    The reader's float32 values are rounded back to the file's levels, so the float64 values are
    exactly sample / 255 (or / 65535) and two equal files score an infinite PSNR.
    """
    from mbmamba_cli.io.images import ImageReadError, read_image

    try:
        image = read_image(path)
    except ImageReadError as error:
        raise PairScoreError(str(path), str(error)) from error
    return _quantize(image.pixels, image.bit_depth), image.bit_depth


def _deblur(deblurrer: Any, pixels: np.ndarray, path, bit_depth: int) -> np.ndarray:
    """Restore (h, w, 3) pixels and round them to `bit_depth`.

    A DeblurError becomes a PairScoreError, so the runner records this pair as failed and goes on.
    """
    from mbmamba_cli.inference.engine import DeblurError

    try:
        restored = deblurrer.deblur(pixels.astype(np.float32))
    except DeblurError as error:
        raise PairScoreError(str(path), f"deblurring {path} failed: {error}") from error
    return _quantize(restored, bit_depth)


def whole_image_deblurrer(deblurrer: Any) -> Any:
    """Return a Deblurrer that shares `deblurrer`'s model and settings but runs whole images.

    It never falls back to tiles: an image that does not fit in memory in one piece fails with
    DeblurError instead of being tiled, so its "untiled" score is never a tiled one.
    """
    from mbmamba_cli.inference.engine import Deblurrer

    return Deblurrer(
        deblurrer.model,
        deblurrer.device,
        deblurrer.precision,
        0,
        deblurrer.tile_overlap,
        deblurrer.max_memory,
        min_tile=2**31,
    )


def _check_size(pair: ImagePair, path, pixels: np.ndarray, gt: np.ndarray, kind: str) -> None:
    """Raise PairScoreError when `pixels` and the ground truth differ in size."""
    if pixels.shape[:2] != gt.shape[:2]:
        height, width = pixels.shape[:2]
        gt_height, gt_width = gt.shape[:2]
        raise PairScoreError(
            str(path),
            f"{kind} {path} is {width}x{height} but its ground truth {pair.gt} is "
            f"{gt_width}x{gt_height}; both must have the same size",
        )


def _score_pair(
    pair: ImagePair, protocol: Protocol, deblurrer: Any | None, untiled_deblurrer: Any | None
) -> PairResult:
    """Read (and restore) one pair and score it; raises PairScoreError for a bad pair."""
    gt, bit_depth = _read_pixels(pair.gt)

    untiled = None
    if deblurrer is None:
        restored, _ = _read_pixels(pair.pred)
        _check_size(pair, pair.pred, restored, gt, "prediction")
    else:
        blurred, _ = _read_pixels(pair.blur)
        _check_size(pair, pair.blur, blurred, gt, "blurred image")
        restored = _deblur(deblurrer, blurred, pair.blur, bit_depth)
        if untiled_deblurrer is not None:
            untiled = _deblur(untiled_deblurrer, blurred, pair.blur, bit_depth)

    try:
        scores = protocol.score(restored, gt, pair.name)
        untiled_scores = protocol.score(untiled, gt, pair.name) if untiled is not None else None
    except ValueError as error:
        raise PairScoreError(str(pair.gt), f"{pair.name}: {error}") from error

    height, width = gt.shape[:2]
    return PairResult(
        dataset=pair.dataset,
        name=pair.name,
        psnr=scores.psnr,
        ssim=scores.ssim,
        width=width,
        height=height,
        psnr_untiled=None if untiled_scores is None else untiled_scores.psnr,
        max_abs_difference=(None if untiled is None else float(np.max(np.abs(restored - untiled)))),
        intensity_scale=scores.intensity_scale,
        ecc_converged=scores.ecc_converged,
    )


def _check_inputs(pairs: list[ImagePair], deblurrer: Any | None, untiled: Any | None) -> None:
    """Raise ValueError when pairs repeat a name or lack the file the run needs."""
    seen: set[tuple[str, str]] = set()
    for pair in pairs:
        key = (pair.dataset, pair.name)
        if key in seen:
            raise ValueError(f"pair {pair.name!r} of dataset {pair.dataset!r} is given twice")
        seen.add(key)

    if untiled is not None and deblurrer is None:
        raise ValueError("a whole-image deblurrer needs the tiled deblurrer too")
    if deblurrer is None:
        lacking = [pair.name for pair in pairs if pair.pred is None]
        problem = "no prediction file; attach them with attach_predictions or pass a deblurrer"
    else:
        lacking = [pair.name for pair in pairs if pair.blur is None]
        problem = "no blurred image to deblur"
    if lacking:
        raise ValueError(f"{len(lacking)} pair(s) have {problem}: {', '.join(lacking[:20])}")


def _summaries(sums: np.ndarray, datasets: list[str]) -> tuple[list[DatasetSummary], DatasetSummary]:
    """Turn per-dataset sums (one row per dataset) into mean scores, plus the overall row."""

    def summarise(name: str, row: np.ndarray) -> DatasetSummary:
        count = int(row[_COUNT])
        gap = row[_GAP] / row[_GAP_COUNT] if row[_GAP_COUNT] > 0 else None
        if count == 0:
            return DatasetSummary(name, 0, float("nan"), float("nan"), gap)
        return DatasetSummary(name, count, row[_PSNR] / count, row[_SSIM] / count, gap)

    per_dataset = [summarise(name, sums[index]) for index, name in enumerate(datasets)]
    return per_dataset, summarise("all", sums.sum(axis=0))


def evaluate_pairs(
    pairs: Iterable[ImagePair],
    protocol: str | Protocol = "gopro",
    deblurrer: Any | None = None,
    untiled_deblurrer: Any | None = None,
    on_pair_done: Callable[[PairResult | PairFailure], None] | None = None,
) -> EvalReport:
    """Score every pair under `protocol`, deblurring the blurred images first if given a deblurrer.

    Args:
        pairs: pairs from `mbmamba_cli.metrics.pairing`; each needs `pred` without a deblurrer and
            `blur` with one.
        protocol: "gopro", "realblur" or a `Protocol`.
        deblurrer: an object with `deblur(pixels (h, w, 3) float32) -> (h, w, 3) float32`, such as
            `mbmamba_cli.inference.engine.Deblurrer`.
        untiled_deblurrer: the same model with tile 0 (whole image); with it every result also
            reports the whole-image PSNR and the tiled minus whole-image difference.
        on_pair_done: called after each pair of this rank, for progress display.

    Returns:
        The report combined over all ranks. A pair that cannot be read or whose sizes differ is a
        `PairFailure` in the report, and the other pairs are still scored.

    Raises:
        ValueError: unknown protocol, no pairs, repeated names, or pairs that lack the needed file.
    """
    chosen = get_protocol(protocol) if isinstance(protocol, str) else protocol
    ordered = sorted(pairs, key=lambda pair: (pair.dataset, pair.name))
    if not ordered:
        raise ValueError("no pairs to evaluate")
    _check_inputs(ordered, deblurrer, untiled_deblurrer)

    rank, world = rank_and_world()
    shard = ordered[rank::world]
    log.info(
        "Scoring %d of %d pairs (rank %d of %d) under protocol %s%s",
        len(shard),
        len(ordered),
        rank,
        world,
        chosen.name,
        ", deblurring each blurred image first" if deblurrer is not None else "",
    )

    datasets = sorted({pair.dataset for pair in ordered})
    sums = np.zeros((len(datasets), 5), dtype=np.float64)
    results: list[PairResult] = []
    failures: list[PairFailure] = []
    for pair in shard:
        try:
            result = _score_pair(pair, chosen, deblurrer, untiled_deblurrer)
        except PairScoreError as error:
            failure = PairFailure(pair.dataset, pair.name, error.path, str(error))
            failures.append(failure)
            log.warning("Skipping pair %s: %s", pair.name, error)
            if on_pair_done is not None:
                on_pair_done(failure)
            continue

        row = sums[datasets.index(pair.dataset)]
        row[_COUNT] += 1
        row[_PSNR] += result.psnr
        row[_SSIM] += result.ssim
        if result.psnr_gap_db is not None:
            row[_GAP] += result.psnr_gap_db
            row[_GAP_COUNT] += 1
        results.append(result)
        log.debug("%s: PSNR %.3f dB, SSIM %.4f", pair.name, result.psnr, result.ssim)
        if on_pair_done is not None:
            on_pair_done(result)

    sums = all_reduce_sum(sums)
    gathered = all_gather((results, failures))
    all_results = sorted(
        (result for rank_results, _ in gathered for result in rank_results),
        key=lambda result: (result.dataset, result.name),
    )
    all_failures = sorted(
        (failure for _, rank_failures in gathered for failure in rank_failures),
        key=lambda failure: (failure.dataset, failure.name),
    )

    per_dataset, overall = _summaries(sums, datasets)
    return EvalReport(
        protocol=chosen,
        implementation=IMPLEMENTATION,
        results=all_results,
        failures=all_failures,
        datasets=per_dataset,
        overall=overall,
        world_size=world,
    )
