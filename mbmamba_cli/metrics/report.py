"""Result objects of an evaluation and their JSON-lines and CSV forms.

A non-finite PSNR (identical images give `inf`) is written as `null` in JSON, which has no
infinity, and as `inf` in CSV.
"""

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbmamba_cli.metrics.protocols import Protocol


@dataclass(frozen=True)
class PairResult:
    """Scores of one pair.

    `psnr_untiled` and `max_abs_difference` are set with `--compare-untiled`: the PSNR of
    whole-image inference and the largest per-pixel difference (in [0, 1] units) between the
    tiled and the whole-image output. `intensity_scale` and `ecc_converged` are set under the
    `realblur` protocol.
    """

    dataset: str
    name: str
    psnr: float
    ssim: float
    width: int
    height: int
    psnr_untiled: float | None = None
    max_abs_difference: float | None = None
    intensity_scale: float | None = None
    ecc_converged: bool | None = None

    @property
    def psnr_gap_db(self) -> float | None:
        """Tiled minus whole-image PSNR in dB, or None without `--compare-untiled`."""
        if self.psnr_untiled is None:
            return None
        return self.psnr - self.psnr_untiled


@dataclass(frozen=True)
class PairFailure:
    """A pair that could not be scored: the file at fault and the error message."""

    dataset: str
    name: str
    path: str
    error: str


@dataclass(frozen=True)
class DatasetSummary:
    """Mean per-image scores of one dataset (or of all pairs, under the name "all")."""

    dataset: str
    count: int
    psnr: float
    ssim: float
    psnr_gap_db: float | None = None


@dataclass(frozen=True)
class EvalReport:
    """Everything an evaluation produced, on rank 0 combined over all ranks."""

    protocol: Protocol
    implementation: str
    results: list[PairResult]
    failures: list[PairFailure]
    datasets: list[DatasetSummary]
    overall: DatasetSummary
    world_size: int = 1

    @property
    def ok(self) -> bool:
        """True when every pair was scored."""
        return not self.failures


def _finite_or_none(value: float | None) -> float | None:
    """Map inf and NaN to None so that the value is valid JSON."""
    if value is None or not math.isfinite(value):
        return None
    return value


def pair_record(result: PairResult) -> dict[str, Any]:
    """Return the JSON object of one pair: dataset, name, psnr, ssim and the optional fields."""
    record: dict[str, Any] = {
        "dataset": result.dataset,
        "name": result.name,
        "psnr": _finite_or_none(result.psnr),
        "ssim": result.ssim,
    }
    if result.psnr_untiled is not None:
        record["psnr_untiled"] = _finite_or_none(result.psnr_untiled)
        record["psnr_gap_db"] = _finite_or_none(result.psnr_gap_db)
        record["max_abs_difference"] = result.max_abs_difference
    if result.intensity_scale is not None:
        record["intensity_scale"] = result.intensity_scale
        record["ecc_converged"] = result.ecc_converged
    return record


def summary_record(report: EvalReport) -> dict[str, Any]:
    """Return the summary object: protocol, implementation, count, mean psnr and ssim, and more."""
    overall = report.overall
    record: dict[str, Any] = {
        "protocol": report.protocol.name,
        "protocol_description": report.protocol.description,
        "implementation": report.implementation,
        "count": overall.count,
        "psnr": _finite_or_none(overall.psnr),
        "ssim": _finite_or_none(overall.ssim),
    }
    if overall.psnr_gap_db is not None:
        record["psnr_gap_db"] = _finite_or_none(overall.psnr_gap_db)
    record["datasets"] = [
        {
            "dataset": summary.dataset,
            "count": summary.count,
            "psnr": _finite_or_none(summary.psnr),
            "ssim": _finite_or_none(summary.ssim),
            **(
                {"psnr_gap_db": _finite_or_none(summary.psnr_gap_db)}
                if summary.psnr_gap_db is not None
                else {}
            ),
        }
        for summary in report.datasets
    ]
    record["failures"] = [
        {"dataset": f.dataset, "name": f.name, "path": f.path, "error": f.error} for f in report.failures
    ]
    return record


def json_lines(report: EvalReport) -> list[str]:
    """Return one JSON object per scored pair, then the summary object, one per line."""
    lines = [json.dumps(pair_record(result), allow_nan=False) for result in report.results]
    lines.append(json.dumps(summary_record(report), allow_nan=False))
    return lines


def write_csv(report: EvalReport, path: Path) -> None:
    """Write one row per scored pair, with the protocol named in every row."""
    columns = ["dataset", "name", "protocol", "psnr", "ssim", "width", "height"]
    if any(result.psnr_untiled is not None for result in report.results):
        columns += ["psnr_untiled", "psnr_gap_db", "max_abs_difference"]
    if any(result.intensity_scale is not None for result in report.results):
        columns += ["intensity_scale", "ecc_converged"]

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for result in report.results:
            row = {
                "dataset": result.dataset,
                "name": result.name,
                "protocol": report.protocol.name,
                "psnr": result.psnr,
                "ssim": result.ssim,
                "width": result.width,
                "height": result.height,
                "psnr_untiled": result.psnr_untiled,
                "psnr_gap_db": result.psnr_gap_db,
                "max_abs_difference": result.max_abs_difference,
                "intensity_scale": result.intensity_scale,
                "ecc_converged": result.ecc_converged,
            }
            writer.writerow(row)
