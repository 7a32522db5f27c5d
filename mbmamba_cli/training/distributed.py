"""Distributed data-parallel training: process group, sharded resumable sampling and rank agreement.

`torchrun --nproc_per_node=G [--nnodes=...] -m mbmamba_cli train ...` starts one process per GPU and
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each one's environment; nothing
is passed as a `--local_rank` argument. The ranks join an NCCL group on CUDA and a gloo group on the
CPU.
A single process without those variables trains alone, with the same code path.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from mbmamba_cli.inference.distributed import DistContext, context_from_env, resolve_device
from mbmamba_cli.log import get_logger

logger = get_logger(__name__)

# How long a collective waits for the slowest rank. Validation and checkpoint writing happen on
# every rank at the same step, so the wait stays short unless a rank hangs.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class TrainingPlacement:
    """This process's rank, the world size, its device and the process-group backend."""

    context: DistContext
    device: torch.device
    backend: str | None  # "nccl", "gloo" or None for a single process

    @property
    def rank(self) -> int:
        return self.context.rank

    @property
    def world_size(self) -> int:
        return self.context.world_size

    @property
    def is_primary(self) -> bool:
        """True on rank 0, which logs, writes checkpoints and writes the final weights."""
        return self.context.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.context.world_size > 1


def setup_placement(device_request: str) -> TrainingPlacement:
    """Read the ranks from the environment, pick the device and join the process group.

    The backend is NCCL when the device is CUDA and gloo on the CPU. A process group that was
    initialised before (by a test or a wrapping script) is used as it is.
    """
    context = context_from_env()
    device = resolve_device(device_request, context)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if not context.is_distributed:
        return TrainingPlacement(context, device, None)

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=context.rank, world_size=context.world_size, timeout=COLLECTIVE_TIMEOUT
        )
    else:
        backend = dist.get_backend()
    logger.info(
        "rank %d of %d (local rank %d) on %s, process group backend %s",
        context.rank,
        context.world_size,
        context.local_rank,
        device,
        backend,
    )
    return TrainingPlacement(context, device, backend)


def close_placement(placement: TrainingPlacement) -> None:
    """Leave the process group that `setup_placement` joined."""
    if placement.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def agree_flags(placement: TrainingPlacement, flags: list[bool]) -> list[bool]:
    """Return, for each flag, True on every rank when it is True on at least one (stop requests)."""
    if not placement.is_distributed:
        return list(flags)
    tensor = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=placement.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [value > 0 for value in tensor.cpu().tolist()]


def all_reduce_sum(placement: TrainingPlacement, values: list[float]) -> list[float]:
    """Sum a short list of floats over the ranks (float64)."""
    if not placement.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=placement.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def gather_objects(placement: TrainingPlacement, value: Any) -> list[Any]:
    """Collect a picklable value from every rank, in rank order, on every rank."""
    if not placement.is_distributed:
        return [value]
    gathered: list[Any] = [None] * placement.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(placement: TrainingPlacement) -> None:
    """Wait until every rank reaches this point."""
    if placement.is_distributed:
        dist.barrier()


class ResumableShardedSampler(Sampler[int]):
    """Shuffled dataset indices, sharded over ranks, that can start in the middle of an epoch.

    Epoch e's order is a permutation drawn from a generator seeded from seed and e, so it is the
    same on every rank. Rank r takes positions r, r + world, r + 2 world, ... of it. The epoch
    length per rank is floor(len(dataset) / world), so every rank gets the same number of samples.
    The few samples left over change from epoch to epoch. `set_position(epoch, skip)` makes the next
    iteration yield that epoch's order from its `skip`-th sample on, which is how a resumed run
    continues with exactly the batches the uninterrupted run would have drawn.
    """

    def __init__(
        self, dataset_size: int, rank: int, world_size: int, seed: int, shuffle: bool = True
    ):
        if dataset_size < world_size:
            raise ValueError(
                f"the dataset has {dataset_size} samples, fewer than the {world_size} ranks; "
                "add data or use fewer processes"
            )
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.skip = 0
        self.per_rank = dataset_size // world_size

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch and how many of this rank's samples of it to leave out at the start."""
        if not 0 <= skip <= self.per_rank:
            raise ValueError(f"skip {skip} is outside 0..{self.per_rank}")
        self.epoch = epoch
        self.skip = skip

    def epoch_order(self, epoch: int) -> list[int]:
        """Return this rank's indices for an epoch, in order."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        used = order[: self.per_rank * self.world_size]
        return used[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order(self.epoch)[self.skip :])

    def __len__(self) -> int:
        return self.per_rank - self.skip


def batches_per_epoch(sampler: ResumableShardedSampler, batch_size_per_rank: int) -> int:
    """Full batches in one epoch of one rank (the last partial batch is dropped)."""
    count = sampler.per_rank // batch_size_per_rank
    if count == 0:
        raise ValueError(
            f"one rank's share of an epoch ({sampler.per_rank} samples) is smaller than its batch "
            f"({batch_size_per_rank}); add data, raise data.samples_per_epoch or lower "
            "data.batch_size"
        )
    return count


def split_batch(global_batch: int, world_size: int) -> int:
    """Return the per-rank batch of a global batch, which must divide evenly."""
    if global_batch % world_size != 0:
        raise ValueError(
            f"data.batch_size {global_batch} is the global batch and must be divisible by the "
            f"{world_size} ranks; use a multiple of {world_size}, e.g. "
            f"{math.ceil(global_batch / world_size) * world_size}"
        )
    return global_batch // world_size
