"""Tests of the selective scan: the chunked "torch" backend against the sequential reference."""

import importlib
import sys
import types

import pytest
import torch

from mbmamba_cli.ops.selective_scan import (
    chunked_selective_scan,
    selective_scan,
    selective_scan_reference,
)

# The package exports the function `selective_scan` under the module's name, so attribute
# access on `mbmamba_cli.ops` returns the function. Look the module up by its import name.
scan_module = importlib.import_module("mbmamba_cli.ops.selective_scan")

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# Optional inputs per case: which of D, z, delta_bias are given, and whether softplus is applied.
OPTION_CASES = {
    "plain": dict(D=False, z=False, delta_bias=False, delta_softplus=False),
    "skip_D": dict(D=True, z=False, delta_bias=False, delta_softplus=False),
    "gate_z": dict(D=False, z=True, delta_bias=False, delta_softplus=False),
    "bias_softplus": dict(D=False, z=False, delta_bias=True, delta_softplus=True),
    "softplus_only": dict(D=False, z=False, delta_bias=False, delta_softplus=True),
    "bias_only": dict(D=False, z=False, delta_bias=True, delta_softplus=False),
    "all": dict(D=True, z=True, delta_bias=True, delta_softplus=True),
}


def make_inputs(
    batch=2,
    channels=5,
    state_size=4,
    length=130,
    dtype=torch.float32,
    seed=0,
    D=True,
    z=True,
    delta_bias=True,
    delta_softplus=True,
):
    """Return keyword arguments for the scan, with values in the ranges of a Mamba block.

    A = -exp(randn), as computed from A_log. With softplus, delta and delta_bias are raw values
    that softplus maps to steps of about 0.1 to 0.7. Without it, both are small and positive.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    if delta_softplus:
        delta = randn(batch, channels, length) * 0.5 - 1.0
        bias = randn(channels) * 0.3
    else:
        delta = torch.rand(batch, channels, length, generator=generator, dtype=dtype) * 0.5 + 0.01
        bias = torch.rand(channels, generator=generator, dtype=dtype) * 0.1

    return {
        "u": randn(batch, channels, length),
        "delta": delta,
        "A": -torch.exp(randn(channels, state_size)),
        "B": randn(batch, state_size, length),
        "C": randn(batch, state_size, length),
        "D": randn(channels) if D else None,
        "z": randn(batch, channels, length) if z else None,
        "delta_bias": bias if delta_bias else None,
        "delta_softplus": delta_softplus,
    }


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def with_grad(inputs):
    """Return a copy of `inputs` whose tensors are fresh leaves that require grad."""
    copied = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().clone().requires_grad_(True)
        copied[name] = value
    return copied


@pytest.mark.parametrize("length", [1, 7, 63, 130, 1000])
@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_chunked_matches_reference(length, case):
    inputs = make_inputs(length=length, **OPTION_CASES[case])

    expected = selective_scan_reference(**inputs)
    actual = chunked_selective_scan(**inputs)

    assert actual.shape == (2, 5, length)
    assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("chunk_length", [1, 3, 16, 130, 500])
def test_chunked_any_chunk_length(chunk_length):
    inputs = make_inputs(length=130)

    expected = selective_scan_reference(**inputs)
    actual = chunked_selective_scan(**inputs, chunk_length=chunk_length)

    assert relative_error(actual, expected) < 1e-5


def test_chunked_many_groups(monkeypatch):
    # Groups of a single chunk of 4 steps, so the state crosses many group boundaries.
    monkeypatch.setattr(scan_module, "_GROUP_ELEMENTS", 1)
    inputs = make_inputs(length=130)

    expected = selective_scan_reference(**inputs)
    actual = chunked_selective_scan(**inputs, chunk_length=4)

    assert relative_error(actual, expected) < 1e-5


def test_chunked_long_sequence_slow_decay():
    # Tiny steps make the state decay slowly, so it carries across many chunks.
    inputs = make_inputs(
        batch=1, channels=3, length=3000, delta_bias=False, delta_softplus=False
    )
    inputs["delta"] = inputs["delta"] * 0.01

    expected = selective_scan_reference(**inputs)
    actual = chunked_selective_scan(**inputs)

    assert relative_error(actual, expected) < 1e-5


def test_chunked_token_major_inputs():
    # Views of (b, l, c) tensors, as the projections of a Mamba block produce them.
    inputs = make_inputs(length=130)
    token_major = {
        name: value.transpose(1, 2).contiguous().transpose(1, 2)
        if name in ("u", "delta", "B", "C", "z")
        else value
        for name, value in inputs.items()
    }

    expected = selective_scan_reference(**inputs)
    actual = chunked_selective_scan(**token_major)

    assert not token_major["B"].is_contiguous()
    assert relative_error(actual, expected) < 1e-5


def test_selective_scan_torch_backend_is_chunked():
    inputs = make_inputs(length=40)

    assert torch.equal(
        selective_scan(**inputs, backend="torch"), chunked_selective_scan(**inputs)
    )


def test_no_grad_matches_grad_path():
    inputs = make_inputs(length=70)

    with torch.no_grad():
        without_grad = chunked_selective_scan(**inputs)
    tracked = chunked_selective_scan(**with_grad(inputs))

    assert tracked.requires_grad
    assert torch.equal(without_grad, tracked.detach())


@pytest.mark.parametrize("case", ["all", "plain"])
def test_gradcheck_float64(case):
    inputs = make_inputs(batch=2, channels=3, state_size=2, length=10, dtype=torch.float64,
                         **OPTION_CASES[case])
    names = [name for name in INPUT_NAMES if inputs[name] is not None]
    tensors = tuple(inputs[name].requires_grad_(True) for name in names)

    def scan(*args):
        kwargs = dict(zip(names, args, strict=True))
        return chunked_selective_scan(
            **kwargs, delta_softplus=inputs["delta_softplus"], chunk_length=3
        )

    assert torch.autograd.gradcheck(scan, tensors)


def test_gradcheck_float64_many_groups(monkeypatch):
    monkeypatch.setattr(scan_module, "_GROUP_ELEMENTS", 1)
    inputs = make_inputs(batch=1, channels=2, state_size=3, length=11, dtype=torch.float64)
    tensors = tuple(inputs[name].requires_grad_(True) for name in INPUT_NAMES)

    def scan(*args):
        kwargs = dict(zip(INPUT_NAMES, args, strict=True))
        return chunked_selective_scan(**kwargs, delta_softplus=True, chunk_length=2)

    assert torch.autograd.gradcheck(scan, tensors)


@pytest.mark.parametrize("case", ["all", "plain"])
def test_gradients_match_reference_float32(case, monkeypatch):
    monkeypatch.setattr(scan_module, "_GROUP_ELEMENTS", 2000)
    inputs = make_inputs(batch=2, channels=6, state_size=4, length=257, **OPTION_CASES[case])
    grad_out = torch.randn(2, 6, 257, generator=torch.Generator().manual_seed(1))

    chunked_inputs = with_grad(inputs)
    (chunked_selective_scan(**chunked_inputs, chunk_length=16) * grad_out).sum().backward()
    reference_inputs = with_grad(inputs)
    (selective_scan_reference(**reference_inputs) * grad_out).sum().backward()

    for name in INPUT_NAMES:
        if inputs[name] is None:
            continue
        error = relative_error(chunked_inputs[name].grad, reference_inputs[name].grad)
        assert error < 1e-5, f"gradient of {name}: relative error {error:.2e}"


def test_backward_saves_only_chunk_states():
    batch, channels, state_size, length, chunk_length = 1, 4, 8, 512, 32
    inputs = with_grad(make_inputs(batch, channels, state_size, length))

    out = chunked_selective_scan(**inputs, chunk_length=chunk_length)
    # The autograd node nearest the scan is the cast back to u's dtype, or the scan itself.
    node = out.grad_fn
    while not hasattr(node, "saved_tensors"):
        node = node.next_functions[0][0]
    saved = [tensor for tensor in node.saved_tensors if tensor is not None]
    chunk_states = (length // chunk_length, batch, channels, state_size)

    assert any(tuple(tensor.shape) == chunk_states for tensor in saved)
    assert all(tensor.numel() < length * channels * state_size for tensor in saved)


def test_output_dtype_bfloat16_under_autocast():
    inputs = make_inputs(length=50)
    low = {
        name: value.to(torch.bfloat16) if name in ("u", "delta", "B", "C", "z") else value
        for name, value in inputs.items()
    }
    full = {
        name: value.float() if isinstance(value, torch.Tensor) else value
        for name, value in low.items()
    }

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_selective_scan(**low)
    expected = selective_scan_reference(**full).to(torch.bfloat16)

    assert out.dtype == torch.bfloat16
    # Computing in float32 and rounding once gives at most one bfloat16 step of difference.
    assert torch.allclose(out.float(), expected.float(), rtol=2**-7, atol=1e-6)


def test_gradient_dtype_follows_inputs():
    inputs = with_grad(make_inputs(length=20))
    inputs["u"] = inputs["u"].detach().to(torch.bfloat16).requires_grad_(True)

    out = chunked_selective_scan(**inputs)
    out.float().sum().backward()

    assert out.dtype == torch.bfloat16
    assert inputs["u"].grad.dtype == torch.bfloat16
    assert inputs["A"].grad.dtype == torch.float32


def test_float64_computes_in_float64():
    inputs = make_inputs(length=30, dtype=torch.float64)

    out = chunked_selective_scan(**inputs)
    expected = selective_scan_reference(**inputs)

    assert out.dtype == torch.float64
    assert relative_error(out, expected) < 1e-12


def test_unknown_backend_raises():
    inputs = make_inputs(length=5)

    with pytest.raises(ValueError, match="unknown scan backend 'triton'.*torch, cuda"):
        selective_scan(**inputs, backend="triton")


def test_cuda_backend_calls_mamba_ssm(monkeypatch):
    calls = []

    def fake_selective_scan_fn(*args):
        calls.append(args)
        return args[0]

    fake = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    fake.selective_scan_fn = fake_selective_scan_fn
    monkeypatch.setitem(sys.modules, "mamba_ssm", types.ModuleType("mamba_ssm"))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops", types.ModuleType("mamba_ssm.ops"))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", fake)
    inputs = make_inputs(length=5)

    out = selective_scan(**inputs, backend="cuda")

    assert out is inputs["u"]
    assert len(calls) == 1
    expected_args = [inputs[name] for name in INPUT_NAMES] + [True]
    assert all(a is b for a, b in zip(calls[0], expected_args, strict=True))


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("B", (2, 1, 4, 30), "B must have shape"),
        ("C", (2, 3, 30), "C must have shape"),
        ("A", (4, 4), "A must have shape"),
        ("D", (4,), "D must have shape"),
        ("z", (2, 5, 29), "z must have shape"),
        ("delta", (2, 5, 31), "delta must have shape"),
        ("delta_bias", (5, 1), "delta_bias must have shape"),
    ],
)
def test_invalid_shape_raises(name, shape, message):
    inputs = make_inputs(length=30)
    inputs[name] = torch.zeros(shape)

    with pytest.raises(ValueError, match=message):
        chunked_selective_scan(**inputs)


def test_empty_sequence_raises():
    inputs = make_inputs(length=0)

    with pytest.raises(ValueError, match="l = 0"):
        chunked_selective_scan(**inputs)


def test_invalid_chunk_length_raises():
    inputs = make_inputs(length=10)

    with pytest.raises(ValueError, match="chunk_length must be >= 1"):
        chunked_selective_scan(**inputs, chunk_length=0)


@pytest.mark.parametrize(
    ("length", "state_elements", "expected"),
    [(1, 512, 1), (7, 512, 2), (1000, 512, 16), (65536, 512, 32), (65536, 1 << 16, 4)],
)
def test_choose_chunk_length(length, state_elements, expected, monkeypatch):
    monkeypatch.setattr(scan_module, "_GROUP_ELEMENTS", 1 << 20)

    assert scan_module.choose_chunk_length(length, state_elements) == expected
