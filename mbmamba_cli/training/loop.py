"""The training loop behind `mbmamba train`: `run_training(config)` for one process or one DDP rank.

Each step draws a batch of (blurred, sharp) patches and runs the model in training mode, which
returns every sub-decoder's outputs at 1/4, 1/2 and full scale. It then takes the multi-scale loss
against the sharp patch, clips the global gradient norm, steps Adam with the scheduled learning
rate and updates the EMA weights. Under CUDA the forward pass runs in bfloat16 autocast while the
weights, the optimiser state, the loss and the selective scan stay in float32.

The run stops after `train.steps` steps, when the wall-clock budget `train.minutes` would be
exceeded by one more step, or at the end of the step in which SIGTERM or SIGINT arrived (a second
SIGINT aborts at once). Every stop writes a checkpoint; the first two also write `final.safetensors`
(the EMA weights). Resuming from a checkpoint restores the weights, EMA, optimiser, RNG states and
data position, so on the CPU the resumed run ends with the same tensors as an uninterrupted one.

NOTE: exact resume is tested on the CPU only. On CUDA, cuDNN autotuning and atomic adds in some
backward kernels are not bitwise reproducible unless `train.deterministic` is set, so a resumed
run there is expected to match closely rather than exactly.
"""

import json
import math
import resource
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from mbmamba_cli.log import get_logger
from mbmamba_cli.models import set_chunk_batching, set_scan_backend
from mbmamba_cli.models.weights import save_safetensors
from mbmamba_cli.ops.backends import resolve_backend
from mbmamba_cli.training.checkpoint import (
    Checkpoint,
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from mbmamba_cli.training.config import ConfigError, OptimConfig, TrainingConfig, to_dict
from mbmamba_cli.training.data import PairedFolderDataset, SyntheticBlurDataset
from mbmamba_cli.training.distributed import (
    ResumableShardedSampler,
    TrainingPlacement,
    agree_flags,
    all_reduce_sum,
    barrier,
    batches_per_epoch,
    close_placement,
    gather_objects,
    setup_placement,
    split_batch,
)
from mbmamba_cli.training.ema import ModelEma
from mbmamba_cli.training.losses import MultiScaleLoss
from mbmamba_cli.training.model_setup import (
    build_from_config,
    count_parameters,
    freeze_encoder,
    load_initial_weights,
)
from mbmamba_cli.training.run_log import RunRecords
from mbmamba_cli.training.validation import Validator

logger = get_logger(__name__)

FINAL_WEIGHTS = "final.safetensors"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"

# Consecutive steps with a non-finite gradient norm after which training gives up.
MAX_SKIPPED_STEPS = 20


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message gives the reason and the fix."""


@dataclass
class TrainingResult:
    """Outcome of a run: its end status, step and output files."""

    status: str  # "finished", "time_budget" or "interrupted"
    step: int
    run_dir: Path
    checkpoint: Path | None
    final_weights: Path | None
    signal_name: str | None = None
    primary: bool = True  # False on DDP ranks other than 0, which write no files
    validation: dict[str, Any] | None = None
    start_validation: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Learning rate and stop requests


def learning_rate(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Return the learning rate of 0-based `step`: linear warm-up, then cosine or constant."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr

    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


class StopRequest:
    """SIGTERM/SIGINT handler: the first signal requests a stop after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: Any = None) -> None:
        """Record the signal; a second SIGINT raises KeyboardInterrupt to abort without saving."""
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            logger.warning(
                "received %s: saving a checkpoint after the current step, then exiting "
                "(press Ctrl-C again to abort without saving)",
                signal.Signals(signum).name,
            )
        self.signum = signum

    def install(self) -> None:
        """Route SIGTERM and SIGINT to `handle` (only possible in the main thread)."""
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self.handle)
        except ValueError:
            logger.debug("not in the main thread: SIGTERM/SIGINT keep their default handlers")

    def restore(self) -> None:
        """Put back the handlers that `install` replaced."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


# ---------------------------------------------------------------------------------------------
# Data


class _EpochConcat(ConcatDataset):
    """ConcatDataset that forwards `set_epoch` to its parts."""

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_epoch(epoch)


def build_dataset(config: TrainingConfig) -> Dataset:
    """Build the training dataset: paired folders, synthetic blur, or both concatenated."""
    data, seed = config.data, config.train.seed
    parts: list[Dataset] = []
    if data.paired is not None:
        parts.append(
            PairedFolderDataset(data.paired, data.patch_size, augment=data.augment, seed=seed)
        )
    if data.synthetic is not None:
        parts.append(
            SyntheticBlurDataset(
                data.synthetic,
                data.patch_size,
                kernels_dir=data.kernels,
                kernel_prob=data.kernel_prob,
                linear_light=data.linear_light,
                noise=data.noise,
                jpeg_prob=data.jpeg_prob,
                saturation_prob=data.saturation_prob,
                samples_per_epoch=data.samples_per_epoch,
                seed=seed,
                cache_mb=data.cache_mb,
            )
        )
    if not parts:
        raise ConfigError(
            "no training data: set data.paired=FOLDER (blur/ and sharp/ pairs) and/or "
            "data.synthetic=FOLDER (sharp images to blur on the fly)"
        )
    return parts[0] if len(parts) == 1 else _EpochConcat(parts)


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Holds the model, optimiser, data and counters of one run on one rank."""

    def __init__(
        self, config: TrainingConfig, placement: TrainingPlacement, checkpoint: Checkpoint | None
    ):
        self.config = config
        self.placement = placement
        self.device = placement.device
        self.run_dir = Path(config.output.dir)

        self.step = 0
        self.samples_seen = 0
        self.data_epoch = 0
        self.data_offset = 0
        self.previous_wall_time = 0.0
        self.skipped_in_a_row = 0

        self._choose_precision()
        self._setup_model()
        self._setup_optimizer()
        self._setup_data()
        self._setup_validation()
        if checkpoint is not None:
            self._restore(checkpoint)

    # --- set-up -----------------------------------------------------------------------------

    def _choose_precision(self) -> None:
        precision = self.config.train.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        if self.device.type == "cuda" and not self.config.train.deterministic:
            torch.backends.cudnn.benchmark = True
        if self.config.train.deterministic:
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        logger.info(
            "precision %s on %s%s",
            "bfloat16 autocast (weights, optimiser, loss and scan in float32)"
            if self.autocast_dtype
            else "float32",
            self.device,
            ", deterministic algorithms" if self.config.train.deterministic else "",
        )

    def _setup_model(self) -> None:
        config = self.config
        torch.manual_seed(config.train.seed)
        model = build_from_config(config.model)
        load_initial_weights(model, config.model)
        if config.train.freeze_encoder:
            freeze_encoder(model)
        trainable, total = count_parameters(model)
        if trainable == 0:
            raise TrainingError(
                "the model has no trainable parameters; set train.freeze_encoder=false"
            )
        logger.info(
            "model %s: %.2f M parameters, %.2f M trainable (encoder %s)",
            model.spec.display_name,
            total / 1e6,
            trainable / 1e6,
            "frozen" if config.train.freeze_encoder else "trained",
        )

        backend, reason = resolve_backend(config.model.scan_backend, self.device)
        set_scan_backend(model, backend)
        set_chunk_batching(model, self.device.type == "cuda")  # as the inference engine does
        logger.info("scan backend %s (%s)", backend, reason)

        self.model = model.to(self.device)
        self.ema = ModelEma(self.model, config.train.ema_decay)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.placement.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped: nn.Module = DistributedDataParallel(self.model, device_ids=device_ids)
        else:
            self.wrapped = self.model

    def _setup_optimizer(self) -> None:
        optim = self.config.optim
        kind = torch.optim.AdamW if optim.weight_decay > 0 else torch.optim.Adam
        self.optimizer = kind(
            self.trainable,
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )

        loss = self.config.loss
        self.loss_fn = MultiScaleLoss(
            edge_weight=loss.edge_weight,
            fft_weight=loss.fft_weight,
            lambda_ising=loss.lambda_ising,
            ising_neighbours=loss.ising_neighbours,
        )
        logger.info(
            "%s lr %.3g (%s to %.3g over %d steps, %d warm-up), betas %s, gradient clip %s; "
            "loss %s",
            kind.__name__,
            optim.lr,
            optim.schedule,
            optim.min_lr,
            self.config.train.steps,
            optim.warmup_steps,
            optim.betas,
            optim.grad_clip or "off",
            self.loss_fn.extra_repr(),
        )

    def _setup_data(self) -> None:
        data = self.config.data
        self.batch_per_rank = split_batch(data.batch_size, self.placement.world_size)
        self.dataset = build_dataset(self.config)
        self.sampler = ResumableShardedSampler(
            len(self.dataset),
            self.placement.rank,
            self.placement.world_size,
            self.config.train.seed,
        )
        self.batches_in_epoch = batches_per_epoch(self.sampler, self.batch_per_rank)
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.batch_per_rank,
            sampler=self.sampler,
            num_workers=data.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
        )
        logger.info(
            "data: %d samples per epoch, global batch %d (%d per rank x %d ranks) of %dx%d "
            "patches, %d batches per epoch, %d loader workers per rank",
            len(self.dataset),
            data.batch_size,
            self.batch_per_rank,
            self.placement.world_size,
            data.patch_size,
            data.patch_size,
            self.batches_in_epoch,
            data.workers,
        )

    def _setup_validation(self) -> None:
        self.validator = None
        if self.config.val.paired is not None:
            val = self.config.val
            self.validator = Validator(
                val.paired, self.placement, val.crop, val.max_images, self.autocast_dtype
            )

    def _restore(self, checkpoint: Checkpoint) -> None:
        meta = checkpoint.meta
        self.model.load_state_dict(
            {k: v.to(self.device) for k, v in checkpoint.model.items()}, strict=True
        )
        self.ema.load_state_dict(checkpoint.ema, int(meta["ema_updates"]))
        try:
            self.optimizer.load_state_dict(checkpoint.optimizer)
        except (ValueError, KeyError) as error:
            raise TrainingError(
                f"the optimiser state of {checkpoint.path} does not fit this model ({error}); was "
                "train.freeze_encoder changed since the checkpoint?"
            ) from error

        self.step = checkpoint.step
        self.samples_seen = int(meta["samples_seen"])
        self.previous_wall_time = float(meta["wall_time_s"])

        same_layout = (
            meta["world_size"] == self.placement.world_size
            and meta["batch_per_rank"] == self.batch_per_rank
            and meta["dataset_size"] == len(self.dataset)
        )
        if same_layout:
            self.data_epoch, self.data_offset = int(meta["data_epoch"]), int(meta["data_offset"])
        else:
            self.data_epoch, self.data_offset = int(meta["data_epoch"]) + 1, 0
            logger.warning(
                "world size, per-rank batch or dataset size differ from the checkpoint (%s ranks "
                "x %s, %s samples); continuing at the start of epoch %d, so the data order differs "
                "from an uninterrupted run",
                meta["world_size"],
                meta["batch_per_rank"],
                meta["dataset_size"],
                self.data_epoch,
            )

        rank = self.placement.rank
        if rank < len(meta["rng"]) and rank in checkpoint.torch_rng:
            rng = meta["rng"][rank]
            restore_rng_state(
                rng["python"],
                rng["numpy"],
                checkpoint.torch_rng[rank],
                checkpoint.cuda_rng.get(rank, []),
            )
        else:
            logger.warning(
                "the checkpoint has no RNG state for rank %d; RNG streams restart from the seed",
                rank,
            )
        logger.info(
            "resumed from %s: step %d, %d samples seen, epoch %d at sample %d, %.0f s trained "
            "before",
            checkpoint.path,
            self.step,
            self.samples_seen,
            self.data_epoch,
            self.data_offset,
            self.previous_wall_time,
        )

    # --- steps ------------------------------------------------------------------------------

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches forever from the current data position, epoch after epoch."""
        epoch, skip = self.data_epoch, self.data_offset
        while True:
            self.sampler.set_position(epoch, skip)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            yield from self.loader
            epoch, skip = epoch + 1, 0

    def _advance_position(self) -> None:
        self.data_offset += self.batch_per_rank
        if self.data_offset // self.batch_per_rank >= self.batches_in_epoch:
            self.data_epoch, self.data_offset = self.data_epoch + 1, 0

    def train_step(self, blurred: torch.Tensor, sharp: torch.Tensor) -> dict[str, float]:
        """Run one optimisation step on a (b, 3, p, p) batch; return loss parts, grad norm, lr."""
        lr = learning_rate(self.step, self.config.optim, self.config.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        blurred = blurred.to(self.device, non_blocking=True)
        sharp = sharp.to(self.device, non_blocking=True)
        self.wrapped.train()
        if self.config.train.freeze_encoder:
            self.model.encoder.eval()

        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            outputs = self.wrapped(blurred)
        total, parts = self.loss_fn(outputs, sharp)

        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))

        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.ema.update(self.model)
            self.skipped_in_a_row = 0
        else:
            self.skipped_in_a_row += 1
            logger.warning(
                "step %d: gradient norm is %s, so the update was skipped (%d in a row)",
                self.step + 1,
                grad_norm,
                self.skipped_in_a_row,
            )
            if self.skipped_in_a_row >= MAX_SKIPPED_STEPS:
                raise TrainingError(
                    f"{MAX_SKIPPED_STEPS} steps in a row had non-finite gradients (last at step "
                    f"{self.step + 1}); "
                    "lower optim.lr, set train.precision=fp32, or resume from an earlier checkpoint"
                )

        self.step += 1
        self.samples_seen += self.config.data.batch_size
        self._advance_position()
        return {**parts, "grad_norm": grad_norm, "lr": lr}

    # --- checkpoints and weights ------------------------------------------------------------

    def save(self, wall_time: float) -> Path | None:
        """Write a checkpoint of the current step; rank 0 writes it with every rank's RNG state."""
        rng_states = gather_objects(self.placement, capture_rng_state())
        path = None
        if self.placement.is_primary:
            meta = {
                "samples_seen": self.samples_seen,
                "data_epoch": self.data_epoch,
                "data_offset": self.data_offset,
                "batch_per_rank": self.batch_per_rank,
                "dataset_size": len(self.dataset),
                "world_size": self.placement.world_size,
                "wall_time_s": wall_time,
                "ema_updates": self.ema.updates,
                # The learning rate is a function of the step and optim.*; this records its state.
                "scheduler": {
                    "schedule": self.config.optim.schedule,
                    "warmup_steps": self.config.optim.warmup_steps,
                    "total_steps": self.config.train.steps,
                    "next_lr": learning_rate(self.step, self.config.optim, self.config.train.steps),
                },
                "variant": self.model.spec.name,
                "config": to_dict(self.config),
            }
            path = save_checkpoint(
                self.run_dir,
                self.step,
                self.model.state_dict(),
                self.ema.state_dict(),
                self.optimizer.state_dict(),
                rng_states,
                meta,
                self.config.train.keep_checkpoints,
            )
            logger.info("checkpoint at step %d written to %s", self.step, path)
        barrier(self.placement)
        return path

    def write_final_weights(self) -> Path:
        """Write the EMA weights as `final.safetensors` with the model's own keys (rank 0)."""
        spec = self.model.spec
        metadata = {
            "format": "mbmamba-weights",
            "variant": spec.name,
            "display_name": spec.display_name,
            "steps": str(self.step),
            "samples_seen": str(self.samples_seen),
            "weights": "ema",
            "ema_decay": str(self.config.train.ema_decay),
            "config": json.dumps(to_dict(self.config)),
        }
        path = self.run_dir / FINAL_WEIGHTS
        save_safetensors(self.ema.state_dict(), path, metadata)
        logger.info("final EMA weights (step %d) written to %s", self.step, path)
        return path


# ---------------------------------------------------------------------------------------------
# The run


def _peak_memory_gb(device: torch.device) -> float:
    """Return peak memory in GB: the CUDA allocator's peak on a GPU, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run_training(
    config: TrainingConfig,
    resume: Path | str | None = None,
    on_step: Callable[["Trainer"], None] | None = None,
) -> TrainingResult:
    """Train the model that `config` describes, in this process (one DDP rank under torchrun).

    Args:
        config: the full configuration (see `mbmamba_cli.training.config`).
        resume: a checkpoint folder (or a run folder, for its newest checkpoint) to continue from.
            The caller passes the checkpoint's own config (`resolve_config` does this).
        on_step: called with the Trainer after every finished step (tests use it to send signals
            and read weights).

    Returns:
        the TrainingResult; on ranks other than 0 its paths are those rank 0 wrote.
    """
    placement = setup_placement(config.train.device)
    stop = StopRequest()
    stop.install()
    records = None
    try:
        checkpoint = load_checkpoint(resume) if resume is not None else None
        run_dir = Path(config.output.dir)
        if checkpoint is None and list_checkpoints(run_dir):
            raise TrainingError(
                f"run folder {run_dir} already has checkpoints; continue it with --resume "
                f"{run_dir}, or choose another --out"
            )

        trainer = Trainer(config, placement, checkpoint)
        if placement.is_primary:
            records = RunRecords(
                run_dir,
                trainer.step if checkpoint is not None else None,
                config.train.steps,
                config.output.progress,
            )
            (run_dir / CONFIG_FILE).write_text(
                json.dumps(to_dict(config), indent=1) + "\n", encoding="utf-8"
            )
            logger.info(
                "run folder %s (train.log, metrics.csv, checkpoints/, %s)", run_dir, FINAL_WEIGHTS
            )
        return _train(trainer, stop, records, on_step)
    finally:
        stop.restore()
        if records is not None:
            records.close()
        close_placement(placement)


def _validate(
    trainer: Trainer, records: RunRecords | None, elapsed: float
) -> dict[str, Any] | None:
    """Score the EMA weights on the validation pairs and record them (None without val.paired).

    Returns the CSV columns of the scores plus "groups", the per-scene means.
    """
    if trainer.validator is None:
        return None
    scores = trainer.validator.run(trainer.ema.module)
    logger.info(
        "validation at step %d on %d pairs: PSNR %.3f dB, SSIM %.4f (blurred input %.3f dB, %.4f)",
        trainer.step,
        scores.pairs,
        scores.psnr,
        scores.ssim,
        scores.input_psnr,
        scores.input_ssim,
    )
    for name, group in scores.groups.items():
        logger.info(
            "  %s (%d pairs): PSNR %.3f dB, SSIM %.4f (blurred input %.3f dB, %.4f)",
            name,
            group["pairs"],
            group["psnr"],
            group["ssim"],
            group["input_psnr"],
            group["input_ssim"],
        )

    row = scores.as_row()
    if records is not None:
        records.write_row(
            {
                "step": trainer.step,
                "epoch": trainer.data_epoch,
                "samples": trainer.samples_seen,
                "elapsed_s": elapsed,
                **row,
            }
        )
    return {**row, "groups": scores.groups}


class _LossWindow:
    """Sums of the loss parts over the steps since the last log line."""

    KEYS = ("total", "charbonnier", "edge", "fft", "ising", "grad_norm")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.steps = 0
        self.start = time.monotonic()

    def add(self, parts: dict[str, float]) -> None:
        for key in self.KEYS:
            self.sums[key] += parts[key]
        self.steps += 1

    def means(self, placement: TrainingPlacement) -> dict[str, float]:
        """Return the mean of every part over the window and over all ranks."""
        local = [self.sums[key] / self.steps for key in self.KEYS]
        summed = all_reduce_sum(placement, local)
        return {
            key: value / placement.world_size for key, value in zip(self.KEYS, summed, strict=True)
        }

    def rate(self) -> float:
        """Return the steps per second over the window."""
        return self.steps / max(time.monotonic() - self.start, 1e-9)


def _log_window(
    trainer: Trainer, window: _LossWindow, lr: float, records: RunRecords | None, elapsed: float
) -> None:
    """Write one log line and one CSV row with the window's mean losses, lr and speed."""
    means, rate = window.means(trainer.placement), window.rate()
    logger.info(
        "step %d/%d loss %.5f (charbonnier %.5f, edge %.5f, fft %.4f, ising %.4f) grad norm "
        "%.3g, lr %.3g, %.2f it/s, peak memory %.2f GB",
        trainer.step,
        trainer.config.train.steps,
        means["total"],
        means["charbonnier"],
        means["edge"],
        means["fft"],
        means["ising"],
        means["grad_norm"],
        lr,
        rate,
        _peak_memory_gb(trainer.device),
    )
    if records is None:
        return

    row = {key: means[key] for key in ("charbonnier", "edge", "fft", "ising", "grad_norm")}
    records.write_row(
        {
            "step": trainer.step,
            "epoch": trainer.data_epoch,
            "samples": trainer.samples_seen,
            "loss": means["total"],
            **row,
            "lr": lr,
            "it_per_s": rate,
            "elapsed_s": elapsed,
        }
    )
    records.advance(trainer.step, rate, means["total"])


def _train(
    trainer: Trainer,
    stop: StopRequest,
    records: RunRecords | None,
    on_step: Callable[[Trainer], None] | None,
) -> TrainingResult:
    """Run steps until the end, the time budget or a signal, then save and summarise."""
    config, placement = trainer.config, trainer.placement
    total_steps = config.train.steps
    started = time.monotonic()
    deadline = started + config.train.minutes * 60 if config.train.minutes is not None else None

    def elapsed() -> float:
        return trainer.previous_wall_time + time.monotonic() - started

    start_validation = None
    if config.val.at_start and trainer.step == 0:
        start_validation = _validate(trainer, records, elapsed())
    validation = None

    logger.info("training from step %d to %d", trainer.step, total_steps)
    window = _LossWindow()
    step_seconds = 0.0  # moving average, used to stop before the deadline
    status = "finished"
    batches = trainer.batches()

    while trainer.step < total_steps:
        step_start = time.monotonic()
        blurred, sharp = next(batches)
        parts = trainer.train_step(blurred, sharp)
        duration = time.monotonic() - step_start
        step_seconds = duration if step_seconds == 0 else 0.9 * step_seconds + 0.1 * duration
        window.add(parts)
        step = trainer.step
        if on_step is not None:
            on_step(trainer)

        if step % config.train.log_every == 0 or step == total_steps:
            _log_window(trainer, window, parts["lr"], records, elapsed())
            window = _LossWindow()
        elif records is not None:
            records.advance(step, None, None)

        if step % config.val.every == 0 and step < total_steps:
            validation = _validate(trainer, records, elapsed()) or validation

        time_up = deadline is not None and time.monotonic() + step_seconds > deadline
        signalled, time_up = agree_flags(placement, [stop.requested, time_up])
        if signalled or time_up:
            status = "interrupted" if signalled else "time_budget"
            break

        if step % config.train.checkpoint_every == 0 and step < total_steps:
            trainer.save(elapsed())

    if status == "time_budget":
        logger.info(
            "wall-clock budget of %.1f minutes reached after step %d",
            config.train.minutes,
            trainer.step,
        )
    if status != "interrupted":
        validation = _validate(trainer, records, elapsed()) or validation
    return _finish(trainer, status, stop, elapsed(), step_seconds, start_validation, validation)


def _finish(
    trainer: Trainer,
    status: str,
    stop: StopRequest,
    wall_time: float,
    step_seconds: float,
    start_validation: dict[str, Any] | None,
    validation: dict[str, Any] | None,
) -> TrainingResult:
    """Write the last checkpoint, the final weights (unless interrupted) and summary.json."""
    placement = trainer.placement
    checkpoint = trainer.save(wall_time)
    final_weights = None
    if status != "interrupted":
        if placement.is_primary:
            final_weights = trainer.write_final_weights()
        else:
            final_weights = trainer.run_dir / FINAL_WEIGHTS

    signal_name = signal.Signals(stop.signum).name if stop.signum is not None else None
    summary = {
        "status": status,
        "signal": signal_name,
        "step": trainer.step,
        "steps_planned": trainer.config.train.steps,
        "samples_seen": trainer.samples_seen,
        "wall_time_s": round(wall_time, 3),
        "seconds_per_step": round(step_seconds, 4),
        "peak_memory_gb": round(_peak_memory_gb(trainer.device), 3),
        "variant": trainer.model.spec.name,
        "world_size": placement.world_size,
        "final_weights": str(final_weights) if final_weights else None,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "validation_start": start_validation,
        "validation": validation,
    }
    if placement.is_primary:
        summary_path = trainer.run_dir / SUMMARY_FILE
        summary_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        logger.info(
            "training %s at step %d; summary in %s",
            status.replace("_", " "),
            trainer.step,
            summary_path,
        )

    return TrainingResult(
        status=status,
        step=trainer.step,
        run_dir=trainer.run_dir,
        checkpoint=checkpoint,
        final_weights=final_weights,
        signal_name=signal_name,
        primary=placement.is_primary,
        validation=validation,
        start_validation=start_validation,
        summary=summary,
    )
