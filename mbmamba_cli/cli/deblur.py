"""`mbmamba deblur`: deblur an image, a folder or a list of paths; report each file's result."""

import os
from pathlib import Path

import typer

from mbmamba_cli.cli import app

EXIT_FAILED_FILES = 1
EXIT_SETUP = 2
EXIT_INTERRUPTED = 130


HELP = (
    "Remove motion blur from photos with MBMamba.\n\n"
    "Files that cannot be read, deblurred or written are reported, and the other files still finish.\n\n"
    "Exit status: 0 when every file was deblurred or skipped, 1 when some files failed, 2 when the "
    "command could not start (invalid option, missing INPUT, weights or device, or an output that would "
    "overwrite an input).\n\n"
    "Under torchrun each process takes its share of the files, and rank 0 prints the merged summary."
)


@app.command("deblur", help=HELP)
def deblur(
    input_path: str = typer.Argument(
        ...,
        metavar="INPUT",
        help="An image file, a folder of images, or - to read one image path per line from stdin.",
    ),
    output: Path = typer.Argument(
        ...,
        metavar="OUTPUT",
        help="Output folder; outputs keep the inputs' relative paths. A file name for a single INPUT file.",
    ),
    variant: str = typer.Option("s", "--variant", help="Model variant: s, b or l (larger: slower, sharper)."),
    weights: Path | None = typer.Option(
        None, "--weights", metavar="FILE", help="Checkpoint to use instead of the shipped weights."
    ),
    recursive: bool = typer.Option(
        False, "--recursive", "-r", help="Include images in sub-folders of INPUT."
    ),
    suffix: str = typer.Option("", "--suffix", help="Text added to output file names before the extension."),
    ext: str | None = typer.Option(
        None, "--ext", help="Output format by extension (png, jpg, tif, webp, bmp); default: the input's."
    ),
    skip_existing: bool = typer.Option(
        False,
        "--skip-existing",
        help="Skip inputs whose output file exists, to resume a batch. Without it, existing outputs are "
        "overwritten. Input files are never overwritten.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="Scan backend: auto, torch or cuda."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto, fp32, bf16 or fp16 (auto: fp32 on CPU, bf16 autocast on CUDA)."
    ),
    tile: str = typer.Option(
        "auto",
        "--tile",
        help="Tile side in pixels; auto: the largest tile that fits --max-memory; 0: the whole image.",
    ),
    tile_overlap: int = typer.Option(
        32, "--tile-overlap", help="Pixels shared by neighbouring tiles, blended with feathered weights."
    ),
    max_memory: str | None = typer.Option(
        None,
        "--max-memory",
        help="Memory budget for one tile, e.g. 4GB or 512MB (default: 80% of the free GPU memory, "
        "or 50% of the available host memory on CPU).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object per file and a final summary object on stdout."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only; no progress bar."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages too."),
) -> None:
    """Deblur INPUT into OUTPUT; the help text is `HELP`."""
    from mbmamba_cli.inference.batch import BatchSetupError, DeblurRequest, run_batch
    from mbmamba_cli.log import setup_logging

    logger = setup_logging(quiet, verbose)
    request = DeblurRequest(
        input=input_path,
        output=output,
        variant=variant,
        weights=weights,
        recursive=recursive,
        suffix=suffix,
        ext=ext,
        skip_existing=skip_existing,
        device=device,
        backend=backend,
        precision=precision,
        tile=tile,
        tile_overlap=tile_overlap,
        max_memory=max_memory,
    )

    # Under torchrun only rank 0 draws a progress bar; the ranks share one terminal.
    is_primary = os.environ.get("RANK", "0") == "0"
    reporter = _Reporter(as_json=as_json, show_progress=is_primary and not (quiet or as_json))
    try:
        with reporter:
            summary = run_batch(request, reporter)
    except BatchSetupError as error:
        logger.error("%s", error)
        raise typer.Exit(EXIT_SETUP) from None
    except KeyboardInterrupt:
        logger.error("interrupted; outputs written so far are complete, rerun with --skip-existing to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None

    if summary.merged:
        _render_summary(summary, as_json=as_json, quiet=quiet)
    raise typer.Exit(summary.exit_code)


class _Reporter:
    """A BatchObserver that prints `--json` lines and advances the progress bar as results arrive."""

    def __init__(self, as_json: bool, show_progress: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from mbmamba_cli.log import stderr_console

        self.as_json = as_json
        self.progress = Progress(
            TextColumn("deblurring"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=stderr_console,
            disable=not (show_progress and stderr_console.is_terminal),
        )
        self.task = None

    def __enter__(self) -> "_Reporter":
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def planned(self, total: int) -> None:
        self.task = self.progress.add_task("deblur", total=total, rate="")

    def finished(self, result) -> None:
        if self.as_json:
            import json

            typer.echo(json.dumps(result.to_json()))
        if self.task is not None:
            self.progress.advance(self.task)
            task = self.progress.tasks[0]
            if task.elapsed:
                self.progress.update(self.task, rate=f"{task.completed / task.elapsed:.2f} images/s")


def _render_summary(summary, as_json: bool, quiet: bool) -> None:
    """Print the final JSON object, or the summary table (counts, then each failure's reason)."""
    if as_json:
        import json

        typer.echo(json.dumps(summary.to_json()))
        return
    if quiet:
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(caption=f"{len(summary.results)} files in {summary.seconds:.1f} s")
    table.add_column("status")
    table.add_column("files", justify="right")
    for status in ("done", "skipped", "failed"):
        table.add_row(status, str(summary.count(status)))

    console = Console()
    console.print(table)
    if summary.failures:
        failures = Table(title="failed files")
        failures.add_column("input", overflow="fold")
        failures.add_column("reason", overflow="fold")
        for result in summary.failures:
            failures.add_row(result.input, result.error or "")
        console.print(failures)
