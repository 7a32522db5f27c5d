"""Precision policy for inference: which dtype a forward pass runs in on which device.

- CPU: float32. bfloat16 autocast when asked for. float16 is never used on CPU (many CPU kernels
  lack it); a float16 request falls back to float32 with a warning, whatever the variant allows.
- CUDA: bfloat16 autocast by default; float16 autocast or float32 on request. The default falls
  back to float16 (where the variant allows it) or float32 on GPUs without bfloat16 support.
- A request outside the variant's `dtypes` raises `PrecisionError`.

Weights stay float32 in every case; autocast runs convolutions and matrix products in the reduced
dtype. The engine checks every output tile and recomputes non-finite ones in float32.
"""

import contextlib
from dataclasses import dataclass

import torch

from mbmamba_cli.log import get_logger

logger = get_logger(__name__)

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class PrecisionError(ValueError):
    """A precision that the variant or the device does not support was requested."""


@dataclass(frozen=True)
class Precision:
    """The dtype a forward pass runs in and why it was chosen."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        """The dtype's name as in a variant's `dtypes`: "float32", "bfloat16" or "float16"."""
        return _DTYPE_NAMES[self.dtype]

    @property
    def uses_autocast(self) -> bool:
        """True when the forward runs under autocast (any dtype but float32)."""
        return self.dtype != torch.float32

    def describe(self) -> str:
        """Describe the dtype for the start-up log line ("bfloat16 autocast", "float32")."""
        return f"{self.name} autocast" if self.uses_autocast else self.name


def resolve_precision(
    requested: str, device: torch.device, allowed: tuple[str, ...] = tuple(_DTYPE_NAMES.values())
) -> Precision:
    """Choose the forward dtype for `requested` ("auto", "fp32", "bf16", "fp16") on `device`.

    `allowed` is the variant's `dtypes`. Raises PrecisionError for an unknown name, a dtype the
    variant does not allow, or bfloat16 on a GPU without bfloat16 support.
    """
    key = requested.strip().lower()
    if key not in PRECISION_CHOICES:
        raise PrecisionError(f"unknown precision {requested!r}; use one of {', '.join(PRECISION_CHOICES)}")

    if key == "auto":
        return _default_precision(device, allowed)

    dtype = _DTYPES[key]
    if dtype == torch.float16 and device.type != "cuda":
        # Checked before the variant's dtypes: float16 is never used here, so it cannot be unsupported.
        logger.warning(
            "float16 is not used on %s; running in float32 (--precision bf16 is the reduced dtype on CPU)",
            device,
        )
        return Precision(torch.float32, "float16 requested, float32 used on CPU")

    if _DTYPE_NAMES[dtype] not in allowed:
        raise PrecisionError(
            f"precision {key} ({_DTYPE_NAMES[dtype]}) is not supported by this variant, which allows "
            f"{', '.join(allowed)}; use --precision {' or '.join(_short(name) for name in allowed)}"
        )

    if device.type != "cuda":
        return Precision(dtype, f"{key} requested")

    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise PrecisionError(
            f"{torch.cuda.get_device_name(device)} does not support bfloat16; "
            "use --precision fp32 (or fp16 where the variant allows it)"
        )
    return Precision(dtype, f"{key} requested")


def autocast_context(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """Return the context a forward pass runs in: autocast to the reduced dtype, or nothing."""
    if not precision.uses_autocast:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.dtype)


def _default_precision(device: torch.device, allowed: tuple[str, ...]) -> Precision:
    if device.type != "cuda":
        return Precision(torch.float32, f"default on {device.type}")

    if "bfloat16" in allowed and torch.cuda.is_bf16_supported():
        return Precision(torch.bfloat16, "default on CUDA")
    if "float16" in allowed:
        return Precision(torch.float16, "default on CUDA without bfloat16 support")
    return Precision(torch.float32, "default on CUDA: the GPU lacks bfloat16 and the variant float16")


def _short(dtype_name: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype_name]
