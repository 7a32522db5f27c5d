"""Tests of the precision policy and of the engine's float32 recompute of non-finite tiles."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

from mbmamba_cli.inference.engine import DeblurError, Deblurrer
from mbmamba_cli.inference.precision import PrecisionError, autocast_context, resolve_precision
from mbmamba_cli.inference.tiling import MemoryEstimate

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
ESTIMATE = MemoryEstimate(fixed_bytes=0, bytes_per_pixel=1000.0, source="test")


@pytest.fixture(autouse=True)
def _propagate_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let caplog see the package's records even after a command set up its own handler."""
    monkeypatch.setattr(logging.getLogger("mbmamba"), "propagate", True)


class HalfBreaksNet(nn.Module):
    """A 1x1 conv that returns NaN wherever it runs under autocast, as overflowing models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.dtypes.append(y.dtype)
        if torch.is_autocast_enabled(x.device.type):
            return y * float("nan")
        return y


class AlwaysNaNNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


def image(height: int = 40, width: int = 56) -> np.ndarray:
    return np.random.default_rng(0).random((height, width, 3), dtype=np.float32)


def test_cpu_default_float32() -> None:
    precision = resolve_precision("auto", CPU, ("float32", "bfloat16"))

    assert precision.dtype == torch.float32
    assert not precision.uses_autocast


def test_cpu_bf16_on_request() -> None:
    precision = resolve_precision("bf16", CPU, ("float32", "bfloat16"))

    assert precision.dtype == torch.bfloat16
    assert precision.describe() == "bfloat16 autocast"


def test_cpu_fp16_falls_back_float32(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        precision = resolve_precision("fp16", CPU, ("float32", "bfloat16"))

    assert precision.dtype == torch.float32
    assert "float16 is not used" in caplog.text


def test_variant_without_bf16_rejected() -> None:
    with pytest.raises(PrecisionError, match="allows float32"):
        resolve_precision("bf16", CPU, ("float32",))


def test_cuda_fp16_not_in_variant_rejected() -> None:
    with pytest.raises(PrecisionError, match="fp16"):
        resolve_precision("fp16", CUDA, ("float32", "bfloat16"))


def test_unknown_precision_rejected() -> None:
    with pytest.raises(PrecisionError, match="unknown precision"):
        resolve_precision("int8", CPU)


def test_autocast_context_float32_plain() -> None:
    precision = resolve_precision("fp32", CPU)

    with autocast_context(precision, CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_nan_tile_recomputed_float32(caplog: pytest.LogCaptureFixture) -> None:
    model = HalfBreaksNet()
    reference = Deblurrer(model, CPU, "fp32", tile=0, memory_estimate=ESTIMATE).deblur(image())
    engine = Deblurrer(model, CPU, "bf16", tile=32, tile_overlap=8, memory_estimate=ESTIMATE)

    with caplog.at_level(logging.WARNING):
        output = engine.deblur(image())

    assert np.isfinite(output).all()
    assert np.abs(output - reference).max() < 1e-5
    assert "recomputed in float32" in caplog.text
    assert torch.bfloat16 in model.dtypes


def test_nan_in_float32_fails_image() -> None:
    engine = Deblurrer(AlwaysNaNNet(), CPU, "bf16", tile=0, memory_estimate=ESTIMATE)

    with pytest.raises(DeblurError, match="NaN or infinite"):
        engine.deblur(image())


def test_fp16_on_cpu_runs() -> None:
    model = HalfBreaksNet()
    engine = Deblurrer(model, CPU, "fp16", tile=0, memory_estimate=ESTIMATE)

    output = engine.deblur(image())

    assert engine.precision.dtype == torch.float32
    assert np.isfinite(output).all()
    assert model.dtypes == [torch.float32]


def test_cuda_default_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)

    assert resolve_precision("auto", CUDA, ("float32", "bfloat16")).dtype == torch.bfloat16


def test_cuda_without_bf16_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")

    assert resolve_precision("auto", CUDA, ("float32", "bfloat16")).dtype == torch.float32
    assert resolve_precision("auto", CUDA, ("float32", "bfloat16", "float16")).dtype == torch.float16
    with pytest.raises(PrecisionError, match="Tesla V100 does not support bfloat16"):
        resolve_precision("bf16", CUDA, ("float32", "bfloat16"))
