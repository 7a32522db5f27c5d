"""Mamba (selective state space) block with the parameter layout of `mamba_ssm` v1.

Parameter names and shapes equal `mamba_ssm.modules.mamba_simple.Mamba` (mamba-ssm 1.x and 2.x, without
the inference cache): `in_proj`, `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`, `out_proj`. A state dict saved
from either class loads into the other with `strict=True`. The scan and the causal conv come from
`mbmamba_cli.ops`, which picks the project's PyTorch kernels or the `mamba_ssm` CUDA kernels; this file
never imports `mamba_ssm`.

Glossary (Gu and Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023):
    b        batch size
    l        sequence length (pixels of a flattened feature map, raster order)
    d_model  channels of the block input and output
    d        d_inner = expand * d_model, channels inside the block
    n        d_state, size of the hidden state per channel
    r        dt_rank = ceil(d_model / 16), rank of the step-size projection
    delta    input-dependent step size, (b, d, l)
    A        state matrix (diagonal, negative), (d, n), stored as A_log = log(-A)
    B, C     input-dependent input and output projections of the state, (b, n, l)
"""

import math

import torch
from torch import nn

from mbmamba_cli.ops.causal_conv import causal_conv1d
from mbmamba_cli.ops.selective_scan import selective_scan


class Mamba(nn.Module):
    """One selective state space block: (b, l, d_model) -> (b, l, d_model)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.backend = "torch"

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=True
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

        # Step sizes start log-uniform in [dt_min, dt_max]; the bias stores softplus^-1 of them.
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

        # S4D-real initialisation: A = -(1, 2, ..., n) for every channel. Kept in float32 always.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(b, l, d_model) -> (b, l, d_model)."""
        batch, length, _ = hidden.shape

        xz = self.in_proj(hidden).transpose(1, 2)  # (b, 2d, l)
        x, z = xz.chunk(2, dim=1)  # (b, d, l) each
        x = causal_conv1d(
            x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu", backend=self.backend
        )

        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, l, r + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (b, d, l), bias added in the scan

        A = -torch.exp(self.A_log.float())  # (d, n)
        y = selective_scan(
            x,
            delta,
            A,
            B.transpose(1, 2),  # (b, n, l)
            C.transpose(1, 2),  # (b, n, l)
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.backend,
        )  # (b, d, l)

        return self.out_proj(y.transpose(1, 2))  # (b, l, d_model)
