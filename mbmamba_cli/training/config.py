"""Training configuration: typed sections loaded from JSON, with `section.key=value` overrides.

A config file is a JSON object whose top-level keys are the sections below (`model`, `data`,
`optim`, `loss`, `train`, `val`, `output`) plus an optional `description` string. Every entry has a
default that follows the MBMamba paper's recipe (Gao et al. 2025: Adam (0.9, 0.999), lr 1e-3 cosine
to 1e-7, 256x256 patches, batch 32, 300k iterations, horizontal and vertical flips), so a file only
lists what it changes.
Unknown sections or keys raise `ConfigError` naming the valid ones, in files and in overrides alike.

Relative paths in a config are resolved against the current working directory when training starts.
"""

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mbmamba_cli.log import get_logger

logger = get_logger(__name__)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the entry and the valid choices."""


@dataclass
class ArchitectureConfig:
    """A custom network size, used instead of a named variant's (tiny dry runs and tests)."""

    width: int = 16
    encoder_blocks: tuple[int, ...] = (1, 1, 1, 1)
    middle_blocks: int = 1
    decoder_blocks: tuple[int, ...] = (1, 1, 1, 1)
    sub_decoders: int = 1
    block: str = "memvssm"  # "memvssm" (MBMamba) or "naf" (U-Net baseline)
    chunks: int = 4
    memory_depth: int = 4


@dataclass
class ModelConfig:
    """Network to train and the sources of its starting weights."""

    variant: str = "s"
    # Replaces the variant's size when set; the trained weights then fit no shipped variant.
    architecture: ArchitectureConfig | None = None
    # Full starting weights: None (random), "shipped" or a checkpoint path (safetensors or .pth).
    init: str | None = None
    # Encoder weights: None, "shipped" or a checkpoint path; only its `encoder.*` tensors are used.
    encoder_init: str | None = None
    # Sub-decoder weights from another checkpoint: decoder k is copied for every k both models have.
    decoder_init: str | None = None
    # Selective scan implementation: "auto", "torch" or "cuda".
    scan_backend: str = "auto"


@dataclass
class DataConfig:
    """Training data: paired folders, synthetic blur from sharp images, or both concatenated."""

    paired: str | None = None
    synthetic: str | None = None
    kernels: str | None = None
    kernel_prob: float = 0.3
    linear_light: bool = False
    noise: tuple[float, float] = (0.0, 0.02)
    jpeg_prob: float = 0.3
    saturation_prob: float = 0.2
    samples_per_epoch: int = 10000
    cache_mb: int = 512
    patch_size: int = 256
    # Global batch: it is split evenly over the DDP ranks.
    batch_size: int = 32
    augment: bool = True
    workers: int = 4


@dataclass
class OptimConfig:
    """Adam (AdamW when weight_decay > 0), learning rate schedule and gradient clipping."""

    lr: float = 1e-3
    min_lr: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" or "constant"
    warmup_steps: int = 0
    # Max global L2 norm of the gradients; 0 disables clipping.
    grad_clip: float = 0.01


@dataclass
class LossConfig:
    """Weights of the multi-scale loss terms."""

    edge_weight: float = 0.05
    fft_weight: float = 0.1
    lambda_ising: float = 0.001
    ising_neighbours: int = 4


@dataclass
class TrainConfig:
    """Length of the run, precision, EMA and the cadence of logs and checkpoints."""

    steps: int = 300_000
    freeze_encoder: bool = True
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16"
    # Deterministic kernels (slower on CUDA); CPU runs are reproducible without it.
    deterministic: bool = False
    ema_decay: float = 0.999
    # Wall-clock budget in minutes for this process; a checkpoint and final weights end the run.
    minutes: float | None = None
    log_every: int = 100
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3


@dataclass
class ValConfig:
    """Periodic validation of the EMA weights on a held-out paired folder."""

    paired: str | None = None
    every: int = 5000
    at_start: bool = False
    # Centre crop (pixels) of every validation pair, to bound the cost; None scores whole images.
    crop: int | None = None
    max_images: int | None = None


@dataclass
class OutputConfig:
    """Run folder and console progress bar."""

    dir: str = "runs/train"
    progress: bool = True


@dataclass
class TrainingConfig:
    """The whole training configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    description: str = ""


# ---------------------------------------------------------------------------------------------
# Conversion between dicts and dataclasses


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """Return (inner type, whether None is allowed) for `X | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _type_name(annotation: Any) -> str:
    inner, optional = _unwrap_optional(annotation)
    if dataclasses.is_dataclass(inner):
        name = "object"
    elif typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        item = args[0].__name__
        name = f"list of {item}" if args[-1] is Ellipsis else f"list of {len(args)} {item}"
    else:
        name = inner.__name__
    return f"{name} or null" if optional else name


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert a JSON value to the annotated type; `where` names the entry in errors."""
    inner, optional = _unwrap_optional(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must be a {_type_name(annotation)}, got null")

    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where} must be an object with keys {_valid_keys(inner)}, got {value!r}"
            )
        return _from_dict(inner, value, where)

    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a {_type_name(annotation)}, got {value!r}")
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{where} must be a {_type_name(annotation)}, got {len(value)} items")
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        return tuple(
            _convert(item, item_type, f"{where}[{i}]")
            for i, (item, item_type) in enumerate(zip(value, item_types, strict=True))
        )

    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if inner is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if inner is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where} has an unsupported type {annotation!r}")


def _valid_keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys."""
    types_by_name = _field_types(cls)
    unknown = sorted(set(data) - set(types_by_name))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys"
            f"{' in ' + where if where else ''}: {_valid_keys(cls)}"
        )

    values = {}
    for name, value in data.items():
        values[name] = _convert(value, types_by_name[name], f"{where}.{name}" if where else name)
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """Convert a config dataclass to plain JSON-ready data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(item) for item in value]
        return value

    return plain(config)


def from_dict(data: dict[str, Any]) -> TrainingConfig:
    """Build and validate a TrainingConfig from parsed JSON."""
    if not isinstance(data, dict):
        raise ConfigError(f"a training config must be a JSON object, got {type(data).__name__}")
    config = _from_dict(TrainingConfig, data, "")
    validate(config)
    return config


def load_config(path: Path | str) -> TrainingConfig:
    """Read a JSON config file; unknown keys or wrong types raise ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; the shipped ones are in configs/")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"config file {path} is not valid JSON: {error}") from error
    try:
        return from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Overrides


def _parse_value(text: str) -> Any:
    """Parse an override value as JSON (numbers, true/false, null, lists), else as a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(config: TrainingConfig, assignment: str) -> TrainingConfig:
    """Return a copy of config with one `section.key=value` applied.

    The value is parsed as JSON where it parses (`2e-4`, `true`, `null`, `[1,1,2,2]`), else taken as
    a string, then checked against the entry's type.
    """
    if "=" not in assignment:
        raise ConfigError(
            f"override {assignment!r} must look like section.key=value, e.g. optim.lr=2e-4"
        )
    dotted, text = assignment.split("=", 1)
    path = [part.strip() for part in dotted.strip().split(".")]
    if len(path) < 2 or not all(path):
        raise ConfigError(
            f"override {assignment!r} must name a section and a key, e.g. optim.lr=2e-4; "
            f"sections: {_valid_keys(TrainingConfig)}"
        )

    data = to_dict(config)
    node: dict[str, Any] = data
    cls: Any = TrainingConfig
    for depth, name in enumerate(path[:-1]):
        types_by_name = _field_types(cls)
        where = ".".join(path[:depth])
        if name not in types_by_name:
            raise ConfigError(
                f"unknown config key {'.'.join(path[: depth + 1])} in override {assignment!r}; "
                f"valid keys{' in ' + where if where else ''}: {_valid_keys(cls)}"
            )
        inner, _ = _unwrap_optional(types_by_name[name])
        if not dataclasses.is_dataclass(inner):
            raise ConfigError(
                f"{'.'.join(path[: depth + 1])} is a value, not a section; drop the rest"
            )
        if node.get(name) is None:
            node[name] = to_dict(inner())
        node = node[name]
        cls = inner

    key = path[-1]
    if key not in _field_types(cls):
        raise ConfigError(
            f"unknown config key {dotted.strip()} in override {assignment!r}; "
            f"valid keys in {'.'.join(path[:-1])}: {_valid_keys(cls)}"
        )
    node[key] = _parse_value(text.strip())
    return from_dict(data)


def apply_overrides(config: TrainingConfig, assignments: list[str]) -> TrainingConfig:
    """Apply `section.key=value` overrides in order."""
    for assignment in assignments:
        config = apply_override(config, assignment)
    return config


# ---------------------------------------------------------------------------------------------
# Validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: TrainingConfig) -> None:
    """Check value ranges and choices that the types alone do not catch."""
    model, data, optim, train, val = (
        config.model,
        config.data,
        config.optim,
        config.train,
        config.val,
    )

    _check(
        model.scan_backend in ("auto", "torch", "cuda"),
        "model.scan_backend must be auto, torch or cuda",
    )
    if model.architecture is not None:
        arch = model.architecture
        _check(arch.block in ("memvssm", "naf"), "model.architecture.block must be memvssm or naf")
        _check(
            arch.width >= 1 and arch.width % 2 == 0,
            "model.architecture.width must be a positive even number",
        )
        _check(arch.sub_decoders >= 1, "model.architecture.sub_decoders must be >= 1")
        _check(
            len(arch.encoder_blocks) == len(arch.decoder_blocks) == 4,
            "model.architecture.encoder_blocks and decoder_blocks must each list 4 block counts",
        )
        _check(arch.chunks >= 1 and arch.memory_depth >= 1, "chunks and memory_depth must be >= 1")

    _check(data.patch_size >= 16, f"data.patch_size must be >= 16 pixels, got {data.patch_size}")
    _check(data.batch_size >= 1, f"data.batch_size must be >= 1, got {data.batch_size}")
    _check(data.workers >= 0, f"data.workers must be >= 0, got {data.workers}")
    _check(data.samples_per_epoch >= 1, "data.samples_per_epoch must be >= 1")

    _check(optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}")
    _check(
        0 <= optim.min_lr <= optim.lr, f"optim.min_lr must be in [0, optim.lr], got {optim.min_lr}"
    )
    _check(optim.schedule in ("cosine", "constant"), "optim.schedule must be cosine or constant")
    _check(optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _check(optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
    _check(
        all(0 <= b < 1 for b in optim.betas), f"optim.betas must be in [0, 1), got {optim.betas}"
    )

    _check(train.steps >= 1, f"train.steps must be >= 1, got {train.steps}")
    _check(
        train.precision in ("auto", "fp32", "bf16"), "train.precision must be auto, fp32 or bf16"
    )
    _check(
        train.device == "auto" or train.device == "cpu" or train.device.startswith("cuda"),
        f"train.device must be auto, cpu, cuda or cuda:N, got {train.device!r}",
    )
    _check(0 <= train.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {train.ema_decay}")
    _check(train.minutes is None or train.minutes > 0, "train.minutes must be > 0 or null")
    _check(train.log_every >= 1, "train.log_every must be >= 1")
    _check(train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1")
    _check(train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
    _check(config.loss.ising_neighbours in (4, 8), "loss.ising_neighbours must be 4 or 8")

    _check(val.every >= 1, "val.every must be >= 1")
    _check(val.crop is None or val.crop >= 16, "val.crop must be >= 16 pixels or null")
    _check(val.max_images is None or val.max_images >= 1, "val.max_images must be >= 1 or null")


def describe_changes(before: TrainingConfig, after: TrainingConfig) -> list[str]:
    """List `key: old -> new` for every entry that differs, for logs."""

    def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        flat = {}
        for key, value in data.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    old, new = flatten(to_dict(before)), flatten(to_dict(after))
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(new)
        if old.get(key) != new.get(key)
    ]


def resolve_config(
    config_file: Path | str | None, overrides: list[str], resume: Path | str | None
) -> TrainingConfig:
    """Return the run's config: a file, the defaults or a checkpoint's saved config, plus overrides.

    When resuming, the checkpoint's config is the base and `config_file` must be None, so that a
    resumed run continues the same training. Overrides still apply, e.g. `train.steps`. The run
    folder becomes the checkpoint's, unless an override sets `output.dir`.
    """
    if resume is not None:
        if config_file is not None:
            raise ConfigError(
                "--config and --resume were both given; a resumed run uses the config saved in its "
                "checkpoint, so change entries with --set section.key=value instead"
            )
        from mbmamba_cli.training.checkpoint import CHECKPOINTS_DIR, read_meta, resolve_checkpoint

        folder = resolve_checkpoint(resume)
        base = from_dict(read_meta(folder)["config"])
        if folder.parent.name == CHECKPOINTS_DIR:
            base.output.dir = str(folder.parent.parent)
    elif config_file is not None:
        base = load_config(config_file)
    else:
        base = TrainingConfig()

    config = apply_overrides(base, overrides)
    for change in describe_changes(base, config):
        logger.info("config override %s", change)
    return config
