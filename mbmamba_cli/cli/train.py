"""`mbmamba train`: options -> training config -> `run_training(config)`.

Shortcut options (`--variant`, `--steps`, ...) become `section.key=value` overrides applied before
those given with `--set`, so `--set` wins. Under `torchrun` every rank runs this command with the
same arguments; ranks come from the environment.

Exit codes:
- 0: training finished or used up its `--minutes` budget;
- 1: training failed;
- 2: invalid config or option;
- 3: the GPU ran out of memory (retry with a smaller batch);
- 128 + the signal number (143 for SIGTERM, 130 for SIGINT): stopped by a signal after writing a
  checkpoint.
"""

import json
from pathlib import Path

import typer

from mbmamba_cli.cli import app


def shortcut_overrides(
    variant: str | None,
    steps: int | None,
    batch_size: int | None,
    patch_size: int | None,
    lr: float | None,
    out: Path | None,
    device: str | None,
    minutes: float | None,
    paired: Path | None,
    synthetic: Path | None,
    kernels: Path | None,
    linear_light: bool | None,
    val: Path | None,
    workers: int | None,
) -> list[str]:
    """Turn the shortcut options that were given into `section.key=value` overrides."""
    pairs = {
        "model.variant": variant,
        "train.steps": steps,
        "data.batch_size": batch_size,
        "data.patch_size": patch_size,
        "optim.lr": lr,
        "output.dir": out,
        "train.device": device,
        "train.minutes": minutes,
        "data.paired": paired,
        "data.synthetic": synthetic,
        "data.kernels": kernels,
        "data.linear_light": linear_light,
        "val.paired": val,
        "data.workers": workers,
    }
    return [
        f"{key}={json.dumps(_plain(value))}" for key, value in pairs.items() if value is not None
    ]


def _plain(value: object) -> object:
    return str(value) if isinstance(value, Path) else value


@app.command("train")
def train(
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        metavar="FILE",
        help="JSON training config (see configs/); default: the paper recipe.",
    ),
    overrides: list[str] | None = typer.Option(
        None,
        "--set",
        metavar="SECTION.KEY=VALUE",
        help="Override one config entry, e.g. --set optim.lr=2e-4; repeatable. Values are JSON.",
    ),
    resume: Path | None = typer.Option(
        None,
        "--resume",
        metavar="DIR",
        help="Continue from a run folder (its newest checkpoint) or a checkpoint folder, with the "
        "config saved there.",
    ),
    variant: str | None = typer.Option(None, "--variant", help="Model variant: s, b, l or unet."),
    steps: int | None = typer.Option(
        None, "--steps", help="Total optimisation steps (train.steps)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Global batch, split over the DDP ranks (data.batch_size)."
    ),
    patch_size: int | None = typer.Option(
        None, "--patch-size", help="Training patch side in pixels."
    ),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (optim.lr)."),
    out: Path | None = typer.Option(None, "--out", metavar="DIR", help="Run folder (output.dir)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    minutes: float | None = typer.Option(
        None,
        "--minutes",
        help="Wall-clock budget: stop before it runs out, saving a checkpoint and final weights.",
    ),
    paired: Path | None = typer.Option(
        None,
        "--paired",
        metavar="DIR",
        help="Training pairs: DIR/blur + DIR/sharp, or DIR/<scene>/blur + sharp.",
    ),
    synthetic: Path | None = typer.Option(
        None, "--synthetic", metavar="SHARP_DIR", help="Sharp images to blur on the fly."
    ),
    kernels: Path | None = typer.Option(
        None,
        "--kernels",
        metavar="DIR",
        help="Published blur kernels to mix into the synthetic blur.",
    ),
    linear_light: bool | None = typer.Option(
        None,
        "--linear-light/--srgb-blur",
        help="Blur synthetic images in linear light instead of sRGB values.",
    ),
    val: Path | None = typer.Option(
        None,
        "--val",
        metavar="DIR",
        help="Held-out pairs for PSNR/SSIM of the EMA weights (val.paired).",
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="Data loader worker processes per rank."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the run summary as one JSON object on stdout."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Log warnings and errors only; no progress bar."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages too."),
) -> None:
    """Train MBMamba or the U-Net baseline: checkpoints, metrics.csv, train.log, final.safetensors.

    Run on several GPUs or nodes with `torchrun --nproc_per_node=G -m mbmamba_cli train ...`.
    """
    from mbmamba_cli.log import get_logger, setup_logging
    from mbmamba_cli.models.weights import WeightsError
    from mbmamba_cli.training.checkpoint import CheckpointError
    from mbmamba_cli.training.config import ConfigError, resolve_config
    from mbmamba_cli.training.loop import TrainingError, run_training

    setup_logging(quiet, verbose)
    log = get_logger(__name__)

    shortcuts = shortcut_overrides(
        variant, steps, batch_size, patch_size, lr, out, device, minutes,
        paired, synthetic, kernels, linear_light, val, workers,
    )  # fmt: skip
    if quiet:
        shortcuts.append("output.progress=false")
    try:
        run_config = resolve_config(config, shortcuts + list(overrides or []), resume)
    except (ConfigError, CheckpointError) as error:
        log.error("%s", error)
        raise typer.Exit(2) from None

    import torch

    try:
        result = run_training(run_config, resume=resume)
    except torch.cuda.OutOfMemoryError as error:
        log.error(
            "out of GPU memory with a global batch of %d patches of %dx%d (%s); lower --batch-size "
            "or --patch-size",
            run_config.data.batch_size,
            run_config.data.patch_size,
            run_config.data.patch_size,
            str(error).splitlines()[0],
        )
        raise typer.Exit(3) from None
    except (ConfigError, ValueError, FileNotFoundError) as error:
        if verbose:
            raise
        log.error("%s", error)
        raise typer.Exit(2) from None
    except (TrainingError, CheckpointError, WeightsError) as error:
        if verbose:
            raise
        log.error("%s", error)
        raise typer.Exit(1) from None

    if as_json and result.primary:
        typer.echo(json.dumps(result.summary))
    if result.status == "interrupted":
        import signal

        raise typer.Exit(128 + int(signal.Signals[result.signal_name]))
