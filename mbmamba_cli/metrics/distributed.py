"""Combining evaluation results over the ranks of an initialised process group.

The ranks are those of `torch.distributed`; `mbmamba eval` joins the group that `torchrun` sets
up from the environment with `mbmamba_cli.inference.distributed`. Only small CPU tensors and
Python objects travel, so gloo suffices whatever device the model runs on. Without a group every
function acts as a single process.
"""

from typing import Any

import numpy as np


def rank_and_world() -> tuple[int, int]:
    """Return (rank, world size) of the initialised process group, or (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Sum a float64 array over all ranks; returns the input unchanged without a process group."""
    rank, world = rank_and_world()
    if world == 1:
        return values

    import torch
    import torch.distributed as dist

    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.numpy()


def all_gather(value: Any) -> list[Any]:
    """Collect a picklable value from every rank, in rank order; [value] without a group."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]

    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered
