"""`mbmamba benchmark`: params, MACs, latency and peak memory of the variants side by side."""

from pathlib import Path

import typer

from mbmamba_cli.cli import app

_LEFT_ALIGNED = ("Method", "Device", "Dtype", "Backend")


@app.command("benchmark")
def benchmark(
    size: str = typer.Option(
        "256",
        "--size",
        help="Input size: N for NxN, or WIDTHxHEIGHT as video resolutions are written (1280x720).",
    ),
    models: str = typer.Option(
        "s,b,l,unet", "--models", help="Comma-separated variants to measure: s, b, l, unet."
    ),
    batch: int = typer.Option(1, "--batch", help="Images per forward pass."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed forward passes before timing a model."),
    runs: int = typer.Option(10, "--runs", help="Timed forward passes per model."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="Scan backend: auto, cuda or torch."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto, fp32, bf16 or fp16 (auto: fp32 on CPU, bf16 on CUDA)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads for PyTorch (default: PyTorch's own choice)."
    ),
    chunk_batching: str = typer.Option(
        "auto",
        "--chunk-batching",
        help="on: run a MemVSSM block's chunks as one batched Mamba call; off: one call per "
        "chunk; auto: the model's default.",
    ),
    with_psnr: Path | None = typer.Option(
        None,
        "--with-psnr",
        metavar="DIR",
        help="Also deblur DIR/blur with the shipped weights; report PSNR/SSIM against DIR/sharp.",
    ),
    count_only: bool = typer.Option(
        False, "--count-only", help="Count params and MACs only; skip building and timing models."
    ),
    interleave: bool = typer.Option(
        False,
        "--interleave",
        help="Time the models round-robin, one run each per round, so load from other processes "
        "falls on all of them alike (all models stay in memory together).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object per model instead of the table."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages too."),
) -> None:
    """Measure params, MACs, latency and peak memory of MBMamba S, B, L and the U-Net baseline."""
    from mbmamba_cli.inference.benchmark import (
        BenchmarkRequest,
        json_lines,
        parse_models,
        parse_size,
        run_benchmark,
    )
    from mbmamba_cli.log import setup_logging

    logger = setup_logging(quiet, verbose)
    try:
        height, width = parse_size(size)
        request = BenchmarkRequest(
            models=parse_models(models),
            height=height,
            width=width,
            batch=batch,
            warmup=warmup,
            runs=runs,
            device=device,
            backend=backend,
            precision=precision,
            threads=threads,
            chunk_batching=chunk_batching.strip().lower(),
            quality_dir=with_psnr,
            count_only=count_only,
            interleave=interleave,
        )
        rows = run_benchmark(request)
    except ValueError as error:
        logger.error("%s", error)
        raise typer.Exit(2) from None

    if as_json:
        for line in json_lines(rows):
            typer.echo(line)
    else:
        _render_table(rows, with_quality=with_psnr is not None, count_only=count_only)

    if any(row.error for row in rows):
        raise typer.Exit(1)


def _render_table(rows: list, with_quality: bool, count_only: bool) -> None:
    """Print the rows as a Rich table, then the ratio lines, errors and caption."""
    from rich.console import Console
    from rich.table import Table

    from mbmamba_cli.inference.benchmark import caption_lines, ratio_lines

    first = rows[0]
    table = Table(
        title=f"Model size and speed at {first.width}x{first.height} (width x height), batch {first.batch}"
    )
    with_cpu_time = any(row.cpu_times_ms for row in rows)
    headers = ["Method", "Params (M)", "MACs (G)", "FLOPs (G) = 2 x MACs", "Median (ms)", "p90 (ms)"]
    headers += ["CPU time (ms)"] if with_cpu_time else []
    headers += ["Peak memory (MB)", "Device", "Dtype", "Backend"]
    headers += ["PSNR (dB)", "SSIM"] if with_quality else []
    for header in headers:
        table.add_column(header, justify="left" if header in _LEFT_ALIGNED else "right")

    for row in rows:
        cells = [
            row.model,
            f"{row.params / 1e6:.2f}",
            f"{row.macs / 1e9:.2f}",
            f"{row.flops / 1e9:.2f}",
            _number(row.latency_ms_median, row.error, not_run=count_only),
            _number(row.latency_ms_p90, row.error, not_run=count_only),
        ]
        if with_cpu_time:
            cells.append(_number(row.cpu_time_ms_median, row.error))
        cells += [
            _number(row.peak_memory_mb, row.error, digits=0, not_run=count_only),
            row.device,
            row.dtype,
            row.backend or "- (no scan)",
        ]
        if with_quality:
            missing = row.quality_note if row.psnr is None else None
            cells.append(missing or _number(row.psnr, row.error, digits=2))
            cells.append(missing or _number(row.ssim, row.error, digits=4))
        table.add_row(*cells)

    console = Console()
    if not console.is_terminal:
        # Piped output: one line per row rather than Rich's 80-column default.
        console = Console(width=200)
    console.print(table)
    for line in ratio_lines(rows):
        console.print(line)
    for row in rows:
        if row.error:
            console.print(f"{row.model} failed: {row.error}")
    for line in caption_lines(rows):
        console.print(line, style="dim")


def _number(value: float | None, error: str | None, digits: int = 1, not_run: bool = False) -> str:
    if not_run:
        return "-"
    if error:
        return "failed"
    return "n/a" if value is None else f"{value:.{digits}f}"
