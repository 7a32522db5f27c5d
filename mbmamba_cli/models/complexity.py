"""Parameter and MAC counting, shared by `mbmamba benchmark` and the variant table.

Convolutions and matrix products are counted by `torch.utils.flop_counter.FlopCounterMode` (it reports
FLOPs = 2 x MACs). The selective scan is a loop of element-wise ops that the counter cannot see, so during
counting each scan call is replaced by the `mbmamba::selective_scan_cost` op, whose registered formula is
9 b l d n FLOPs (4.5 b l d n MACs): per step and state, the discretisation exp(delta A) and delta B u, the
state update, and the contraction with C. Element-wise ops are not counted, as is usual in this field.

Counting runs on the meta device: no memory is allocated and no arithmetic is done, so counting L at
1280x720 takes seconds.
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

SCAN_FLOPS_PER_ELEMENT = 9  # per (batch, position, channel, state) element


@torch.library.custom_op("mbmamba::selective_scan_cost", mutates_args=())
def selective_scan_cost(u: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Stand-in for the scan while counting: returns a tensor shaped like u (b, d, l)."""
    return u.clone()


@selective_scan_cost.register_fake
def _selective_scan_cost_fake(u: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(u)


@register_flop_formula(torch.ops.mbmamba.selective_scan_cost)
def _selective_scan_flops(u_shape, B_shape, *args, out_shape=None, **kwargs) -> int:
    batch, channels, length = u_shape
    states = B_shape[-2]
    return SCAN_FLOPS_PER_ELEMENT * batch * length * channels * states


@dataclass(frozen=True)
class MacsReport:
    """Multiply-accumulates of one inference forward pass."""

    macs: int
    scan_macs: int
    params: int
    input_shape: tuple[int, ...]

    @property
    def flops(self) -> int:
        """FLOPs as 2 x MACs."""
        return 2 * self.macs


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or frozen)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _counting_scan() -> Iterator[None]:
    def scan_stand_in(u, delta, A, B, C, D=None, z=None, **kwargs):
        return torch.ops.mbmamba.selective_scan_cost(u, B)

    with mock.patch("mbmamba_cli.models.mamba.selective_scan", scan_stand_in):
        yield


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 256, 256)) -> MacsReport:
    """Count the MACs of `model` in eval mode for one input of `input_shape` (b, 3, h, w).

    The model is copied to the meta device, so `model` itself is not touched and nothing is computed.
    """
    meta_model = _to_meta(model)
    meta_model.eval()
    x = torch.zeros(input_shape, device="meta")

    counter = FlopCounterMode(display=False)
    with _counting_scan(), counter, torch.no_grad():
        meta_model(x)

    counts = counter.get_flop_counts()["Global"]
    scan_flops = counts.get(torch.ops.mbmamba.selective_scan_cost, 0)
    return MacsReport(
        macs=counter.get_total_flops() // 2,
        scan_macs=scan_flops // 2,
        params=count_params(model),
        input_shape=tuple(input_shape),
    )


def _to_meta(model: nn.Module) -> nn.Module:
    """Return `model` itself when it is on the meta device, else a copy of it moved there."""
    if all(p.is_meta for p in model.parameters()):
        return model
    return copy.deepcopy(model).to("meta")
