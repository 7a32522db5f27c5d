"""Records of a training run, written by rank 0: a plain-text log, a metrics CSV and a progress bar.

`train.log` receives every line the package logger emits during the run. `metrics.csv` gets one row
per logging interval and one per validation, with the columns of `CSV_COLUMNS`. A resumed run keeps
the rows up to its checkpoint's step and appends after them, so the file reads like one run.
"""

import csv
import logging
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mbmamba_cli.log import LOGGER_NAME, stderr_console

CSV_COLUMNS = (
    "step",
    "epoch",
    "samples",
    "loss",
    "charbonnier",
    "edge",
    "fft",
    "ising",
    "grad_norm",
    "lr",
    "it_per_s",
    "elapsed_s",
    "val_psnr",
    "val_ssim",
    "val_input_psnr",
    "val_input_ssim",
)


class RunRecords:
    """The log file handler, the metrics CSV and the progress bar of one run (rank 0 only)."""

    def __init__(
        self, run_dir: Path, resume_step: int | None, total_steps: int, progress: bool
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / "metrics.csv"
        self.log_path = self.run_dir / "train.log"

        self.handler = logging.FileHandler(self.log_path, encoding="utf-8")
        self.handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        self.handler.setLevel(logging.DEBUG)
        # The file keeps INFO lines even when the console shows only warnings (--quiet), so the
        # console handlers get the old threshold and the logger itself lets INFO through.
        package_logger = logging.getLogger(LOGGER_NAME)
        self._saved_level = package_logger.level
        self._saved_handler_levels = {handler: handler.level for handler in package_logger.handlers}
        console_level = package_logger.getEffectiveLevel()
        if console_level > logging.INFO:
            for handler in package_logger.handlers:
                handler.setLevel(max(handler.level, console_level))
            package_logger.setLevel(logging.INFO)
        package_logger.addHandler(self.handler)

        self._start_csv(resume_step)

        self.progress: Progress | None = None
        self.task = None
        if progress:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} it/s  loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=stderr_console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=total_steps, completed=resume_step or 0, rate="-", loss="-"
            )

    def _start_csv(self, resume_step: int | None) -> None:
        """Create the CSV, or keep the rows up to resume_step of an existing one."""
        kept: list[dict[str, str]] = []
        if resume_step is not None and self.csv_path.is_file():
            with self.csv_path.open(newline="", encoding="utf-8") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]

        with self.csv_path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for row in kept:
                writer.writerow({key: row.get(key, "") for key in CSV_COLUMNS})

    def write_row(self, row: dict[str, float | int]) -> None:
        """Append one metrics row; missing columns stay empty."""
        unknown = set(row) - set(CSV_COLUMNS)
        if unknown:
            raise ValueError(
                f"unknown metrics columns {sorted(unknown)}; valid: {', '.join(CSV_COLUMNS)}"
            )
        with self.csv_path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writerow({key: _format(row.get(key)) for key in CSV_COLUMNS})

    def advance(self, step: int, rate: float | None, loss: float | None) -> None:
        """Move the progress bar to `step`."""
        if self.progress is None:
            return
        fields = {}
        if rate is not None:
            fields["rate"] = f"{rate:.2f}"
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        self.progress.update(self.task, completed=step, **fields)

    def close(self) -> None:
        """Stop the progress bar and detach the log file."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        package_logger = logging.getLogger(LOGGER_NAME)
        package_logger.removeHandler(self.handler)
        self.handler.close()
        package_logger.setLevel(self._saved_level)
        for handler, level in self._saved_handler_levels.items():
            handler.setLevel(level)


def _format(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
