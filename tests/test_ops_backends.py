"""Tests of the causal convolution and of the backend choice, on CPU."""

import logging
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mbmamba_cli.ops import backends
from mbmamba_cli.ops.backends import available_backends, resolve_backend
from mbmamba_cli.ops.causal_conv import causal_conv1d

CUDA_MODULES = ("mamba_ssm.ops.selective_scan_interface", "causal_conv1d")


@pytest.fixture
def fresh_import_cache():
    """Clear the cached import results before and after a test that fakes modules."""
    backends._import_problem.cache_clear()
    yield
    backends._import_problem.cache_clear()


def install_fake_cuda_packages(monkeypatch):
    """Make both CUDA packages importable as empty modules."""
    for name in (
        "mamba_ssm",
        "mamba_ssm.ops",
        "mamba_ssm.ops.selective_scan_interface",
        "causal_conv1d",
    ):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))


def test_causal_conv_hand_computed():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    weight = torch.tensor([[1.0, 10.0, 100.0]])  # the last tap multiplies the current input
    bias = torch.tensor([0.5])

    out = causal_conv1d(x, weight, bias, activation=None)

    # out_t = 1 * x_{t-2} + 10 * x_{t-1} + 100 * x_t + 0.5, with zeros before the start.
    assert out.tolist() == [[[100.5, 210.5, 321.5, 432.5]]]


def test_causal_conv_hand_computed_silu():
    x = torch.tensor([[[1.0, -2.0]]])
    weight = torch.tensor([[2.0, 1.0]])

    out = causal_conv1d(x, weight, activation="silu")

    assert torch.allclose(out, F.silu(torch.tensor([[[1.0, 0.0]]])))


@pytest.mark.parametrize("width", [1, 2, 4, 7])
def test_causal_conv_matches_padded_conv1d(width):
    generator = torch.Generator().manual_seed(width)
    x = torch.randn(2, 5, 33, generator=generator)
    weight = torch.randn(5, width, generator=generator)
    bias = torch.randn(5, generator=generator)

    expected = F.silu(F.conv1d(F.pad(x, (width - 1, 0)), weight[:, None, :], bias, groups=5))
    out = causal_conv1d(x, weight, bias)

    assert out.shape == x.shape
    assert torch.allclose(out, expected, atol=1e-6)


def test_causal_conv_is_causal():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 20, generator=generator)
    weight = torch.randn(3, 4, generator=generator)
    changed = x.clone()
    changed[..., 10] += 5.0

    before = causal_conv1d(x, weight)
    after = causal_conv1d(changed, weight)

    assert torch.equal(before[..., :10], after[..., :10])
    assert not torch.equal(before[..., 10:14], after[..., 10:14])


def test_causal_conv_output_dtype_follows_x():
    x = torch.randn(1, 4, 9).to(torch.bfloat16)
    weight = torch.randn(4, 4)

    out = causal_conv1d(x, weight, torch.zeros(4))

    assert out.dtype == torch.bfloat16


def test_causal_conv_conv1d_weight_raises():
    with pytest.raises(ValueError, match=r"weight\.squeeze\(1\)"):
        causal_conv1d(torch.zeros(1, 4, 8), torch.zeros(4, 1, 3))


def test_causal_conv_bias_shape_raises():
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        causal_conv1d(torch.zeros(1, 4, 8), torch.zeros(4, 3), torch.zeros(3))


def test_causal_conv_unknown_activation_raises():
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        causal_conv1d(torch.zeros(1, 4, 8), torch.zeros(4, 3), activation="relu")


def test_causal_conv_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown conv backend 'triton'.*torch, cuda"):
        causal_conv1d(torch.zeros(1, 4, 8), torch.zeros(4, 3), backend="triton")


def test_causal_conv_cuda_width_raises():
    with pytest.raises(ValueError, match="widths 2 to 4, got 5"):
        causal_conv1d(torch.zeros(1, 4, 8), torch.zeros(4, 5), backend="cuda")


def test_causal_conv_cuda_calls_package(monkeypatch):
    calls = []

    def fake_causal_conv1d_fn(x, weight, bias=None, activation=None):
        calls.append((x, weight, bias, activation))
        return x

    fake = types.ModuleType("causal_conv1d")
    fake.causal_conv1d_fn = fake_causal_conv1d_fn
    monkeypatch.setitem(sys.modules, "causal_conv1d", fake)
    x, weight, bias = torch.zeros(1, 4, 8), torch.zeros(4, 4), torch.zeros(4)

    out = causal_conv1d(x, weight, bias, activation="silu", backend="cuda")

    assert out is x
    assert calls == [(x, weight, bias, "silu")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_available_backends_cpu():
    status = available_backends()

    assert status["torch"] == "available"
    assert "no CUDA device" in status["cuda"]


def test_resolve_auto_on_cpu_picks_torch(caplog):
    with caplog.at_level(logging.DEBUG, logger="mbmamba"):
        name, reason = resolve_backend("auto", "cpu")

    assert name == "torch"
    assert "device is cpu" in reason
    assert "kernel backend: torch (auto: device is cpu)" in caplog.text


def test_resolve_torch_explicit():
    assert resolve_backend("torch", torch.device("cpu")) == ("torch", "requested")


def test_resolve_cuda_on_cpu_raises():
    with pytest.raises(ValueError, match="needs a CUDA device.*use backend 'torch' or 'auto'"):
        resolve_backend("cuda", "cpu")


def test_resolve_unknown_raises():
    with pytest.raises(ValueError, match="unknown backend 'fast': expected one of auto, torch, cuda"):
        resolve_backend("fast", "cpu")


def test_resolve_auto_cuda_with_packages(monkeypatch, fresh_import_cache):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    install_fake_cuda_packages(monkeypatch)

    name, reason = resolve_backend("auto", "cuda")

    assert name == "cuda"
    assert "mamba_ssm and causal_conv1d import" in reason
    assert available_backends()["cuda"] == "available"


def test_resolve_auto_cuda_without_mamba_ssm(monkeypatch, fresh_import_cache):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    install_fake_cuda_packages(monkeypatch)
    # None in sys.modules makes the import raise ModuleNotFoundError, as when not installed.
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    monkeypatch.delitem(sys.modules, "mamba_ssm.ops")
    monkeypatch.delitem(sys.modules, "mamba_ssm.ops.selective_scan_interface")

    name, reason = resolve_backend("auto", "cuda:0")

    assert name == "torch"
    assert reason == "auto: mamba_ssm not installed: pip install -e '.[cuda]'"


def test_resolve_explicit_cuda_without_causal_conv1d(monkeypatch, fresh_import_cache):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    install_fake_cuda_packages(monkeypatch)
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)

    with pytest.raises(ValueError, match=r"causal_conv1d not installed: pip install -e '\.\[cuda\]'"):
        resolve_backend("cuda", "cuda")


def test_resolve_cuda_broken_extension(monkeypatch, fresh_import_cache):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    install_fake_cuda_packages(monkeypatch)

    def broken_import(name):
        raise OSError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setattr(backends.importlib, "import_module", broken_import)

    name, reason = resolve_backend("auto", "cuda")

    assert name == "torch"
    assert "OSError: libcudart.so.12" in reason
    assert "reinstall mamba-ssm" in reason


def test_import_does_not_load_cuda_packages():
    code = (
        "import sys\n"
        "import mbmamba_cli.ops as ops\n"
        "ops.resolve_backend('auto', 'cpu')\n"
        "ops.available_backends()\n"
        f"print([name for name in {CUDA_MODULES + ('mamba_ssm',)!r} if name in sys.modules])\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )

    assert result.stdout.strip() == "[]"
