"""Depthwise causal 1-D convolution of the Mamba block, for the "torch" and "cuda" backends.

Each channel is convolved with its own kernel of width w over the sequence, padded with w - 1
zeros on the left so that output t depends on inputs t - w + 1 .. t only, then optionally
passed through SiLU.

Backends:
- "torch": `F.conv1d` with groups = d, on any device.
- "cuda": `causal_conv1d.causal_conv1d_fn` (causal-conv1d 1.x), imported when first called
  because the package loads a CUDA extension at import. It supports widths 2 to 4 only.

Dtype contract: the output has the dtype of `x`. The "torch" backend casts `x` to the weight's
dtype before the convolution, so float32 weights with bfloat16 input compute in float32 outside
autocast. Under autocast, `F.conv1d` computes in the autocast dtype.

How it was checked: tests/test_ops_backends.py compares the "torch" backend with a
hand-computed case and with an explicit left-padded `F.conv1d`.
"""

import torch.nn.functional as F
from torch import Tensor

CONV_BACKENDS = ("torch", "cuda")
ACTIVATIONS = (None, "silu", "swish")

# Kernel widths that causal-conv1d 1.x implements.
CUDA_KERNEL_WIDTHS = range(2, 5)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    backend: str = "torch",
) -> Tensor:
    """Apply a depthwise causal convolution, then the activation.

    Args:
        x: (b, d, l) input.
        weight: (d, w) one kernel per channel; a Conv1d weight (d, 1, w) must be squeezed first.
        bias: (d,) or None.
        activation: "silu" (or its alias "swish") or None.
        backend: "torch" (any device) or "cuda" (causal-conv1d kernel, CUDA tensors only).

    Returns:
        (b, d, l) in the dtype of `x`.
    """
    _validate_conv_inputs(x, weight, bias, activation)

    if backend == "torch":
        channels, width = weight.shape
        # Left padding only: exactly l outputs are computed, none thrown away.
        padded = F.pad(x.to(weight.dtype), (width - 1, 0))
        out = F.conv1d(padded, weight.unsqueeze(1), bias, groups=channels)
        if activation is not None:
            out = F.silu(out)
        return out.to(x.dtype)

    if backend == "cuda":
        width = weight.shape[1]
        if width not in CUDA_KERNEL_WIDTHS:
            raise ValueError(
                f"the cuda causal_conv1d kernel supports widths 2 to 4, got {width}: "
                "use backend 'torch' for this width"
            )
        # Imported here: the package loads its CUDA extension at import.
        # NOTE: the tests check this call with a stand-in module only; no CUDA run checked it.
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn(x, weight, bias, activation=activation)

    raise ValueError(
        f"unknown conv backend {backend!r}: expected one of {', '.join(CONV_BACKENDS)}"
    )


def _validate_conv_inputs(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None
) -> None:
    """Raise ValueError naming the argument whose shape or value does not fit."""
    if x.dim() != 3:
        raise ValueError(f"x must have shape (b, d, l), got {tuple(x.shape)}")
    channels = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(
            f"weight must have shape (d, w) = ({channels}, w), got {tuple(weight.shape)}; "
            "squeeze a Conv1d weight (d, 1, w) with weight.squeeze(1)"
        )
    if weight.shape[1] < 1:
        raise ValueError("weight has kernel width 0: expected w >= 1")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"bias must have shape ({channels},), got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}: expected 'silu', 'swish' or None"
        )
