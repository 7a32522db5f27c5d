"""Training checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a folder `<run>/checkpoints/step_<step>/` with two files:
- `state.safetensors`: `model.<key>` (trained weights), `ema.<key>` (EMA weights), optimiser state
  flattened as `optim.state.<param_index>.<key>` (Adam's `step`, `exp_avg`, `exp_avg_sq`), and the
  torch RNG states `rng.torch.rank<r>` and `rng.cuda.rank<r>.<device>` of every rank.
- `state.json`: step, samples seen, data position, cumulative wall time, the run's config, the
  optimiser's param groups (hyper-parameters), the EMA update count, the Python and NumPy RNG states
  of every rank, and the world size.

The folder is written under a temporary name and renamed, so a crash mid-write never leaves a
half checkpoint under a real name. `<key>` is always a key of the unwrapped model's `state_dict()`.
"""

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mbmamba_cli.log import get_logger
from mbmamba_cli.models.weights import save_safetensors

logger = get_logger(__name__)

FORMAT = "mbmamba-train-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"
CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the run."""


@dataclass
class Checkpoint:
    """A training checkpoint read back into memory (tensors on the CPU)."""

    path: Path
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    torch_rng: dict[int, torch.Tensor] = field(default_factory=dict)
    cuda_rng: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.meta["step"])


# ---------------------------------------------------------------------------------------------
# RNG states


def capture_rng_state() -> dict[str, Any]:
    """Return this process's Python, NumPy, torch and CUDA RNG states (picklable, CPU tensors)."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": _to_json(random.getstate()),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": numpy_state["state"]["key"].tolist(),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
    }
    return state


def restore_rng_state(
    python: Any, numpy_state: dict[str, Any], torch_state: torch.Tensor, cuda: list
) -> None:
    """Set this process's RNG states to those captured by `capture_rng_state`."""
    random.setstate(_from_json(python))
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": np.asarray(numpy_state["key"], dtype=np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(torch_state.to(torch.uint8))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda[: torch.cuda.device_count()]])


def _to_json(value: Any) -> Any:
    """Turn nested tuples (Python's RNG state) into lists."""
    if isinstance(value, tuple | list):
        return [_to_json(item) for item in value]
    return value


def _from_json(value: Any) -> Any:
    """Turn nested lists back into tuples, as `random.setstate` expects."""
    if isinstance(value, list):
        return tuple(_from_json(item) for item in value)
    return value


# ---------------------------------------------------------------------------------------------
# Optimiser state


def flatten_optimizer(
    state: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split `optimizer.state_dict()` into flat tensors and JSON-ready param groups.

    Non-tensor per-parameter entries (none for Adam) are stored as 0-dim float64 tensors.
    """
    tensors = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            tensor = (
                value
                if isinstance(value, torch.Tensor)
                else torch.tensor(value, dtype=torch.float64)
            )
            tensors[f"optim.state.{index}.{key}"] = tensor
    groups = [
        {key: _to_json(value) for key, value in group.items()} for group in state["param_groups"]
    ]
    return tensors, groups


def unflatten_optimizer(
    tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """Rebuild an optimiser state dict from `flatten_optimizer`'s output."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, key = name.removeprefix("optim.state.").split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    param_groups = []
    for group in groups:
        restored = dict(group)
        if "betas" in restored:
            restored["betas"] = tuple(restored["betas"])
        param_groups.append(restored)
    return {"state": state, "param_groups": param_groups}


# ---------------------------------------------------------------------------------------------
# Writing


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Return the folder of the checkpoint at `step` inside a run folder."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"{STEP_PREFIX}{step:08d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint of `step` and delete all but the newest `keep` ones; return its folder.

    rng_states contains one `capture_rng_state()` per rank, in rank order. `meta` adds run facts
    (samples seen, data position, wall time, config) to the JSON file.
    """
    target = checkpoint_dir(run_dir, step)
    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)

    optim_tensors, groups = flatten_optimizer(optimizer_state)
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"model.{key}": value for key, value in model_state.items()})
    tensors.update({f"ema.{key}": value for key, value in ema_state.items()})
    tensors.update(optim_tensors)
    for rank, rng in enumerate(rng_states):
        tensors[f"rng.torch.rank{rank}"] = rng["torch"]
        for device, cuda_state in enumerate(rng["cuda"]):
            tensors[f"rng.cuda.rank{rank}.{device}"] = cuda_state
    save_safetensors(tensors, temporary / TENSORS_FILE, {"format": FORMAT, "step": str(step)})

    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        **meta,
        "optimizer_param_groups": groups,
        "rng": [{"python": rng["python"], "numpy": rng["numpy"]} for rng in rng_states],
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (temporary / META_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

    if target.exists():
        shutil.rmtree(target)
    os.replace(temporary, target)
    prune_checkpoints(run_dir, keep)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Return the complete checkpoints of a run folder, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        suffix = child.name.removeprefix(STEP_PREFIX)
        if (
            child.name.startswith(STEP_PREFIX)
            and suffix.isdigit()
            and (child / META_FILE).is_file()
        ):
            found.append((int(suffix), child))
    return [path for _, path in sorted(found)]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of interrupted writes."""
    for stale in (Path(run_dir) / CHECKPOINTS_DIR).glob(f"{STEP_PREFIX}*.tmp-*"):
        if stale.name.rsplit("-", 1)[-1] != str(os.getpid()):
            shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
        logger.debug("deleted old checkpoint %s (keeping the newest %d)", old, keep)


# ---------------------------------------------------------------------------------------------
# Reading


def resolve_checkpoint(path: Path | str) -> Path:
    """Find a checkpoint folder from a run folder (its newest), a checkpoint folder or its files."""
    path = Path(path)
    if path.is_file() and path.name in (TENSORS_FILE, META_FILE):
        path = path.parent
    if not path.exists():
        raise CheckpointError(
            f"--resume path {path} not found; pass a run folder or a checkpoint folder"
        )
    if (path / META_FILE).is_file():
        if not (path / TENSORS_FILE).is_file():
            raise CheckpointError(
                f"checkpoint {path} has {META_FILE} but no {TENSORS_FILE}; it is incomplete"
            )
        return path

    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"no checkpoint in {path}: expected "
            f"{path}/{CHECKPOINTS_DIR}/{STEP_PREFIX}NNNNNNNN/{META_FILE} "
            "or a checkpoint folder itself"
        )
    return found[-1]


def read_meta(path: Path | str) -> dict[str, Any]:
    """Read only the JSON part of a checkpoint (found as by `resolve_checkpoint`)."""
    folder = resolve_checkpoint(path)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{folder / META_FILE} is not valid JSON: {error}") from error
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{folder / META_FILE} is not an mbmamba training checkpoint "
            f"(format {meta.get('format')!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} has checkpoint format version {meta.get('format_version')}, but this "
            f"mbmamba reads version {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read a whole checkpoint (tensors on the CPU)."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{folder / TENSORS_FILE} could not be read: {error}") from error

    model, ema, optim, torch_rng, cuda_rng = {}, {}, {}, {}, {}
    for name, tensor in tensors.items():
        if name.startswith("model."):
            model[name.removeprefix("model.")] = tensor
        elif name.startswith("ema."):
            ema[name.removeprefix("ema.")] = tensor
        elif name.startswith("optim.state."):
            optim[name] = tensor
        elif name.startswith("rng.torch.rank"):
            torch_rng[int(name.removeprefix("rng.torch.rank"))] = tensor
        elif name.startswith("rng.cuda.rank"):
            rank, device = name.removeprefix("rng.cuda.rank").split(".")
            cuda_rng.setdefault(int(rank), {})[int(device)] = tensor

    if not model or not ema:
        raise CheckpointError(
            f"{folder / TENSORS_FILE} has no model or EMA tensors, so it is not a training "
            "checkpoint"
        )
    optimizer = unflatten_optimizer(optim, meta["optimizer_param_groups"])
    cuda_lists = {rank: [states[i] for i in sorted(states)] for rank, states in cuda_rng.items()}
    return Checkpoint(folder, meta, model, ema, optimizer, torch_rng, cuda_lists)
