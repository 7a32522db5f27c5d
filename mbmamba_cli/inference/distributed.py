"""Process placement for batch inference: rank, world size and device, from the environment.

Under `torchrun` every process reads RANK, WORLD_SIZE and LOCAL_RANK from its environment, never
from a `--local_rank` argument. Each rank takes every WORLD_SIZE-th file of the planned file list,
starting at RANK, and runs on cuda:LOCAL_RANK. Rank 0 gathers the results and merges them into one
summary. The results travel over a gloo process group, so CPU-only ranks work too.
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from mbmamba_cli.log import get_logger

logger = get_logger(__name__)

# How long a collective waits for the slowest rank. The final gather waits for every rank to finish
# its share of the files, which on a large batch can take many hours.
GATHER_TIMEOUT = timedelta(hours=72)


class DeviceError(ValueError):
    """The requested device does not exist or this PyTorch build cannot use it."""


@dataclass(frozen=True)
class DistContext:
    """This process's place among the ranks; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        """True on rank 0, which merges and prints the summary."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """Return this rank's share: every world_size-th item, starting at rank."""
        return items[self.rank :: self.world_size]


def context_from_env(environ: dict[str, str] | None = None) -> DistContext:
    """Read RANK, WORLD_SIZE and LOCAL_RANK (set by torchrun); absent means a single process."""
    env = os.environ if environ is None else environ
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise ValueError(
            f"invalid RANK/WORLD_SIZE/LOCAL_RANK in the environment ({error}); launch with torchrun"
        ) from None

    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"invalid ranks in the environment: RANK={rank}, WORLD_SIZE={world_size}, "
            f"LOCAL_RANK={local_rank}; launch with torchrun"
        )
    return DistContext(rank, world_size, local_rank)


def resolve_device(requested: str, context: DistContext | None = None) -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a torch.device that exists.

    "auto" and "cuda" mean cuda:LOCAL_RANK under torchrun and cuda:0 otherwise; "auto" falls back to
    the CPU when CUDA is unavailable. Raises DeviceError naming the reason and the fix.
    """
    context = context or DistContext()
    name = requested.strip().lower()

    if name == "cpu":
        return torch.device("cpu")
    if name == "auto" and not torch.cuda.is_available():
        _warn_if_gpu_unused()
        return torch.device("cpu")
    if name not in ("auto", "cuda") and not name.startswith("cuda:"):
        raise DeviceError(f"invalid device {requested!r}: use auto, cpu, cuda or cuda:N")

    if not torch.cuda.is_available():
        build = "a CPU-only PyTorch build" if torch.version.cuda is None else "no visible GPU"
        raise DeviceError(
            f"device {requested!r} requested but CUDA is not available ({build}, torch {torch.__version__}); "
            "install a CUDA build of PyTorch or use --device cpu"
        )

    if name in ("auto", "cuda"):
        index = context.local_rank if context.is_distributed else 0
    else:
        try:
            index = int(name.removeprefix("cuda:"))
        except ValueError:
            raise DeviceError(f"invalid device {requested!r}: use auto, cpu, cuda or cuda:N") from None

    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise DeviceError(
            f"device cuda:{index} does not exist: {count} GPU(s) visible (cuda:0 to cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def _warn_if_gpu_unused() -> None:
    """Warn when an NVIDIA driver is installed but this PyTorch build cannot use CUDA."""
    import shutil

    has_driver = os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None
    if has_driver and torch.version.cuda is None:
        logger.warning(
            "an NVIDIA driver is installed but torch %s is a CPU-only build, so this runs on the CPU "
            "(much slower); install a CUDA build of PyTorch to use the GPU",
            torch.__version__,
        )


def init_process_group(context: DistContext) -> bool:
    """Join the gloo process group that the ranks use to share file lists and results.

    Returns True when this call joined it, False for a single process or a group joined earlier.
    """
    import torch.distributed as dist

    if not context.is_distributed or dist.is_initialized():
        return False
    dist.init_process_group("gloo", rank=context.rank, world_size=context.world_size, timeout=GATHER_TIMEOUT)
    logger.info("rank %d of %d joined the process group (gloo)", context.rank, context.world_size)
    return True


def broadcast_from_primary(context: DistContext, value: Any) -> Any:
    """Return rank 0's `value` on every rank (pickled; keep it small)."""
    if not context.is_distributed:
        return value

    import torch.distributed as dist

    box = [value if context.is_primary else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_primary(context: DistContext, value: Any) -> list[Any] | None:
    """Collect every rank's `value` on rank 0, in rank order; other ranks get None."""
    if not context.is_distributed:
        return [value]

    import torch.distributed as dist

    gathered: list[Any] | None = [None] * context.world_size if context.is_primary else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def close_process_group() -> None:
    """Leave the process group if this process joined one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
