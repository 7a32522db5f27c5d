"""Kernels of the Mamba block (selective scan, causal convolution) and the choice of backend.

Importing this package never imports `mamba_ssm` or `causal_conv1d`: the "cuda" backend
imports them when it is first used.
"""

from mbmamba_cli.ops.backends import BACKEND_CHOICES, available_backends, resolve_backend
from mbmamba_cli.ops.causal_conv import causal_conv1d
from mbmamba_cli.ops.selective_scan import (
    chunked_selective_scan,
    selective_scan,
    selective_scan_reference,
)

__all__ = [
    "BACKEND_CHOICES",
    "available_backends",
    "causal_conv1d",
    "chunked_selective_scan",
    "resolve_backend",
    "selective_scan",
    "selective_scan_reference",
]
