"""`mbmamba eval`: score restored images (or run the model first) against ground truth.

The command parses options, collects the pairs, calls `mbmamba_cli.metrics.evaluate.evaluate_pairs`
and renders the report as a table, JSON lines or CSV. Under `torchrun` every rank scores its share
of the pairs and rank 0 prints.

Exit codes: 0 when every pair was scored, 1 when pairing failed or a pair could not be scored
(the files are listed), 2 for invalid options.
"""

import math
from pathlib import Path

import typer

from mbmamba_cli.cli import app

PROTOCOL_HELP = (
    "Scoring protocol: gopro (RGB, full frame, no alignment; GoPro and HIDE) or realblur "
    "(intensity scale, ECC homography alignment, masked PSNR and SSIM; RealBlur-J/R)."
)


@app.command("eval")
def evaluate(
    pred: Path | None = typer.Option(
        None,
        "--pred",
        metavar="DIR",
        help="Folder of restored images to score, matched to the ground truth by name.",
    ),
    blur: Path | None = typer.Option(
        None,
        "--blur",
        metavar="DIR",
        help="Folder of blurred images: deblur each with the model, then score it.",
    ),
    gt: Path | None = typer.Option(
        None, "--gt", metavar="DIR", help="Folder of ground-truth (sharp) images."
    ),
    dataset: list[Path] | None = typer.Option(
        None,
        "--dataset",
        metavar="ROOT",
        help="Dataset root: GoPro (test/<scene>/blur and sharp), blur/ and sharp/, or input/ and "
        "target/. Repeat for several datasets.",
    ),
    list_file: list[Path] | None = typer.Option(
        None,
        "--list",
        metavar="FILE",
        help="List file with one `gt_path blur_path` line per pair (HIDE, RealBlur). Repeatable.",
    ),
    root: Path | None = typer.Option(
        None,
        "--root",
        metavar="DIR",
        help="Folder that --list paths are relative to (default: the list file's folder).",
    ),
    protocol: str = typer.Option("gopro", "--protocol", help=PROTOCOL_HELP),
    variant: str = typer.Option(
        "s", "--variant", help="Model variant when the model runs: s, b or l (the default matches deblur)."
    ),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        metavar="FILE",
        help="Weights file, .safetensors or .pth (default: the variant's shipped weights).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="Scan backend: auto, cuda or torch."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto, fp32, bf16 or fp16 (auto: fp32 on CPU, bf16 autocast on CUDA)."
    ),
    tile: str = typer.Option(
        "auto", "--tile", help="Tile side in pixels, 0 for the whole image, or auto (from the memory budget)."
    ),
    tile_overlap: int = typer.Option(32, "--tile-overlap", help="Pixels that neighbouring tiles share."),
    max_memory: str | None = typer.Option(
        None,
        "--max-memory",
        help="Memory budget for one tile, e.g. 4GB (default: the free memory of the device).",
    ),
    compare_untiled: bool = typer.Option(
        False,
        "--compare-untiled",
        help="Also deblur each image whole (tile 0) and report the tiled minus whole-image PSNR in dB.",
    ),
    csv_path: Path | None = typer.Option(
        None, "--csv", metavar="FILE", help="Write one row per image to this CSV file."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object per pair, then a summary object, instead of a table."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only; no progress bar."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Log debug messages too, with every pair's scores."
    ),
) -> None:
    """Score restored images with PSNR and SSIM under a named protocol.

    Pairs are matched by relative path without extension (a.png pairs with a.jpg).

    A missing or extra file is an error that names the files, and the exit code is then 1; weights
    that cannot be loaded give exit code 2, as in deblur.
    """
    from mbmamba_cli.inference.distributed import (
        close_process_group,
        context_from_env,
        init_process_group,
    )
    from mbmamba_cli.log import get_logger, setup_logging
    from mbmamba_cli.metrics.evaluate import evaluate_pairs, shard_pairs, whole_image_deblurrer
    from mbmamba_cli.metrics.pairing import PairingError, collect_pairs
    from mbmamba_cli.metrics.protocols import get_protocol

    setup_logging(quiet, verbose)
    log = get_logger(__name__)

    try:
        context = context_from_env()
        chosen = get_protocol(protocol)
        pairs = collect_pairs(
            gt=gt, pred=pred, blur=blur, datasets=dataset or [], lists=list_file or [], root=root
        )
    except PairingError as error:
        log.error("%s", error)
        raise typer.Exit(1) from None
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None

    runs_model = pred is None
    if compare_untiled and not runs_model:
        raise typer.BadParameter(
            "--compare-untiled needs the model to run: use --blur, --dataset or --list without --pred"
        )

    init_process_group(context)
    try:
        deblurrer = untiled = None
        if runs_model:
            deblurrer = _create_deblurrer(
                variant, weights, device, backend, precision, tile, tile_overlap, max_memory, context
            )
            if compare_untiled:
                untiled = whole_image_deblurrer(deblurrer)

        # Only rank 0 draws a progress bar, for its own share of the pairs.
        show_progress = context.is_primary and not quiet
        report = _run_with_progress(
            evaluate_pairs, shard_pairs(pairs), pairs, chosen, deblurrer, untiled, show_progress
        )
        if context.is_primary:
            _render(report, as_json, csv_path)
            if report.failures:
                log.error("%d of %d pairs could not be scored:", len(report.failures), len(pairs))
            for failure in report.failures:
                log.error("  %s: %s", failure.name, failure.error)
    finally:
        close_process_group()

    if not report.ok:
        raise typer.Exit(1)


def _create_deblurrer(variant, weights, device, backend, precision, tile, tile_overlap, max_memory, context):
    """Set up the engine's Deblurrer; invalid option values exit with code 2."""
    from mbmamba_cli.inference.engine import create_deblurrer
    from mbmamba_cli.log import get_logger

    try:
        return create_deblurrer(
            variant,
            weights,
            device=device,
            backend=backend,
            precision=precision,
            tile=tile,
            tile_overlap=tile_overlap,
            max_memory=max_memory,
            context=context,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    except RuntimeError as error:
        # Imported here, where create_deblurrer has already loaded the models package.
        from mbmamba_cli.models.weights import WeightsError

        if not isinstance(error, WeightsError):
            raise
        get_logger(__name__).error("%s", error)
        raise typer.Exit(2) from None  # the same status as deblur: the command could not start


def _run_with_progress(run, shard, pairs, protocol, deblurrer, untiled, show_progress):
    """Call the runner, with a progress bar on stderr when `show_progress` is set."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mbmamba_cli.log import stderr_console

    if not show_progress:
        return run(pairs, protocol, deblurrer, untiled)

    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr_console, transient=True) as progress:
        task = progress.add_task("scoring", total=len(shard))
        return run(pairs, protocol, deblurrer, untiled, lambda _: progress.advance(task))


def _format_psnr(value: float) -> str:
    """Format a PSNR in dB; NaN (a dataset with no scored pair) prints as "-" and inf as "inf"."""
    if math.isnan(value):
        return "-"
    return f"{value:.3f}"


def _render(report, as_json: bool, csv_path: Path | None) -> None:
    """Print the report as JSON lines or a Rich table, and write the CSV file when asked."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from mbmamba_cli.metrics.report import json_lines, write_csv

    if csv_path is not None:
        write_csv(report, csv_path)

    if as_json:
        for line in json_lines(report):
            typer.echo(line)
        return

    compare = report.overall.psnr_gap_db is not None
    table = Table(title=f"PSNR / SSIM, protocol {report.protocol.name}")
    table.add_column("dataset", overflow="fold")
    table.add_column("count", justify="right")
    table.add_column("PSNR (dB)", justify="right")
    table.add_column("SSIM", justify="right")
    if compare:
        table.add_column("tiled - whole (dB)", justify="right")

    rows = report.datasets + ([report.overall] if len(report.datasets) > 1 else [])
    for summary in rows:
        cells = [
            escape(summary.dataset),
            str(summary.count),
            _format_psnr(summary.psnr),
            f"{summary.ssim:.4f}",
        ]
        if compare:
            gap = summary.psnr_gap_db
            cells.append("-" if gap is None else f"{gap:+.3f}")
        table.add_row(*cells)

    # The caption lines are printed unwrapped, so they stay whole when copied from the terminal.
    console = Console()
    console.print(table)
    console.print(f"protocol {report.protocol.name}: {report.protocol.description}", soft_wrap=True)
    console.print(f"implementation: {report.implementation}", soft_wrap=True)
    if compare:
        console.print(_untiled_table(report))


def _untiled_table(report):
    """Per-image table of tiled against whole-image (tile 0) inference."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Tiled against whole-image inference, per image")
    # Names fold onto more lines instead of being cut, so each image stays identifiable.
    table.add_column("dataset", overflow="fold")
    table.add_column("name", overflow="fold")
    for header in ("tiled PSNR", "whole PSNR", "tiled - whole (dB)", "max |diff|"):
        table.add_column(header, justify="right")
    for result in report.results:
        gap = result.psnr_gap_db
        table.add_row(
            escape(result.dataset),
            escape(result.name),
            _format_psnr(result.psnr),
            _format_psnr(result.psnr_untiled),
            "-" if gap is None or math.isnan(gap) else f"{gap:+.3f}",
            f"{result.max_abs_difference:.4f}",
        )
    return table
