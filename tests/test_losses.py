"""Tests for the training losses: known values, the Ising normalisation, multi-scale backprop."""

import math

import pytest
import torch

from mbmamba_cli.training.losses import (
    MultiScaleLoss,
    charbonnier_loss,
    edge_loss,
    fft_loss,
    ising_loss,
    laplacian,
)


def _ising_by_loops(x: torch.Tensor, neighbours: int) -> float:
    """Reference Ising loss: visit every pixel and every neighbour inside the image."""
    offsets = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if neighbours == 8:
        offsets += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    height, width = x.shape[-2:]

    total = 0.0
    for y in range(height):
        for x_pos in range(width):
            for dy, dx in offsets:
                ny, nx = y + dy, x_pos + dx
                if 0 <= ny < height and 0 <= nx < width:
                    total += (x[..., y, x_pos] - x[..., ny, nx]).abs().sum().item()
    return total / x.numel()


def test_ising_constant_image_is_zero():
    constant = torch.full((2, 3, 8, 5), 0.37)

    assert ising_loss(constant, neighbours=4).item() == 0.0
    assert ising_loss(constant, neighbours=8).item() == 0.0


def test_ising_hand_computed_impulse():
    # 3x3 single-channel image with 1 in the centre. With 4 neighbours the centre has 4
    # differences of 1 and each edge-centre pixel has 1: 8 in total over 9 values. With 8
    # neighbours the centre has 8 and each of the other 8 pixels has 1: 16 over 9.
    impulse = torch.zeros(1, 1, 3, 3)
    impulse[0, 0, 1, 1] = 1.0

    assert ising_loss(impulse, neighbours=4).item() == pytest.approx(8 / 9)
    assert ising_loss(impulse, neighbours=8).item() == pytest.approx(16 / 9)


def test_ising_hand_computed_ramp():
    # Rows [0 1 2], [3 4 5], [6 7 8]. 4 neighbours: 6 horizontal pairs differ by 1 and 6
    # vertical pairs by 3, each counted from both ends: 2 * (6 + 18) / 9. 8 neighbours add
    # 4 pairs on each diagonal, differing by 4 and 2: 2 * (6 + 18 + 16 + 8) / 9.
    ramp = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3)

    assert ising_loss(ramp, neighbours=4).item() == pytest.approx(48 / 9)
    assert ising_loss(ramp, neighbours=8).item() == pytest.approx(96 / 9)


@pytest.mark.parametrize("neighbours", [4, 8])
def test_ising_matches_loop_reference(neighbours):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 4, generator=generator)

    expected = _ising_by_loops(x, neighbours)

    assert ising_loss(x, neighbours).item() == pytest.approx(expected, rel=1e-5)


def test_ising_single_pixel_is_zero():
    assert ising_loss(torch.rand(1, 3, 1, 1), neighbours=8).item() == 0.0


def test_ising_rejects_other_neighbourhood():
    with pytest.raises(ValueError, match="4 or 8"):
        ising_loss(torch.rand(1, 1, 3, 3), neighbours=6)


def test_charbonnier_equal_inputs_is_eps():
    x = torch.rand(1, 3, 4, 4)

    assert charbonnier_loss(x, x, eps=1e-3).item() == pytest.approx(1e-3)


def test_charbonnier_known_difference():
    # sqrt(0.3^2 + 0.4^2) = 0.5 at every element.
    pred = torch.full((1, 1, 2, 2), 0.3)
    target = torch.zeros(1, 1, 2, 2)

    assert charbonnier_loss(pred, target, eps=0.4).item() == pytest.approx(0.5)


def test_charbonnier_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differs from target shape"):
        charbonnier_loss(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 5))


def test_laplacian_of_impulse():
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 1.0

    result = laplacian(impulse)[0, 0]

    assert result[2, 2].item() == -4.0
    assert result[1, 2].item() == 1.0
    assert result[2, 3].item() == 1.0
    assert result.abs().sum().item() == 8.0


def test_laplacian_constant_is_zero_at_border():
    # Replicate padding keeps border pixels of a constant image at a Laplacian of 0.
    constant = torch.full((1, 3, 4, 6), 0.8)

    assert laplacian(constant).abs().max().item() == pytest.approx(0.0, abs=1e-6)


def test_edge_loss_impulse_known_value():
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 1.0
    eps = 1e-3
    expected = (math.sqrt(16 + eps**2) + 4 * math.sqrt(1 + eps**2) + 20 * eps) / 25

    assert edge_loss(impulse, torch.zeros_like(impulse), eps).item() == pytest.approx(expected)


def test_edge_loss_ignores_constant_offset():
    x = torch.rand(1, 3, 6, 6)

    assert edge_loss(x + 0.2, x, eps=1e-3).item() == pytest.approx(1e-3, rel=1e-3)


def test_fft_loss_constant_offset():
    # An offset of 0.5 on a 4x4 image puts 0.5 * 16 = 8 in the zero-frequency coefficient of
    # the 4x3 half spectrum and nothing elsewhere: mean of |8| over 24 real and imaginary parts.
    pred = torch.full((1, 1, 4, 4), 0.5)
    target = torch.zeros(1, 1, 4, 4)

    assert fft_loss(pred, target).item() == pytest.approx(8 / 24)


def test_fft_loss_ortho_is_size_independent():
    small = fft_loss(torch.full((1, 1, 4, 4), 0.5), torch.zeros(1, 1, 4, 4), norm="ortho")
    large = fft_loss(torch.full((1, 1, 16, 16), 0.5), torch.zeros(1, 1, 16, 16), norm="ortho")

    assert small.item() == pytest.approx(0.5 * 4 / 24)
    assert large.item() == pytest.approx(0.5 * 16 / (16 * 9 * 2))


def test_fft_loss_equal_inputs_is_zero():
    x = torch.rand(2, 3, 5, 7)

    assert fft_loss(x, x).item() == 0.0


def _three_scale_outputs(generator: torch.Generator) -> list[torch.Tensor]:
    return [
        torch.rand(2, 3, 4, 5, generator=generator, requires_grad=True),
        torch.rand(2, 3, 7, 9, generator=generator, requires_grad=True),
        torch.rand(2, 3, 13, 17, generator=generator, requires_grad=True),
    ]


def test_multiscale_backprops_to_every_output():
    generator = torch.Generator().manual_seed(1)
    outputs = _three_scale_outputs(generator)
    target = torch.rand(2, 3, 13, 17, generator=generator)

    total, parts = MultiScaleLoss()(outputs, target)
    total.backward()

    assert total.dim() == 0
    for output in outputs:
        assert output.grad is not None
        assert output.grad.abs().sum().item() > 0
    assert set(parts) == {"charbonnier", "edge", "fft", "ising", "total"}
    assert parts["total"] == pytest.approx(total.item())


def test_multiscale_total_is_weighted_sum():
    generator = torch.Generator().manual_seed(2)
    outputs = _three_scale_outputs(generator)
    target = torch.rand(2, 3, 13, 17, generator=generator)
    loss_fn = MultiScaleLoss(edge_weight=0.5, fft_weight=0.25, lambda_ising=0.1)

    _, parts = loss_fn(outputs, target)

    expected = parts["charbonnier"] + 0.5 * parts["edge"] + 0.25 * parts["fft"]
    expected += 0.1 * parts["ising"]
    assert parts["total"] == pytest.approx(expected, rel=1e-5)


def test_multiscale_uses_area_resized_target():
    target = torch.rand(1, 3, 8, 8)
    half = torch.nn.functional.avg_pool2d(target, 2)
    loss_fn = MultiScaleLoss(edge_weight=0.0, fft_weight=0.0, lambda_ising=0.0)

    _, parts = loss_fn([half], target)

    assert parts["charbonnier"] == pytest.approx(1e-3, rel=1e-3)


def test_multiscale_float32_under_autocast():
    outputs = [torch.rand(1, 3, 8, 8).bfloat16().requires_grad_()]
    target = torch.rand(1, 3, 8, 8)

    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        total, _ = MultiScaleLoss()(outputs, target)

    assert total.dtype == torch.float32


def test_multiscale_rejects_larger_output():
    with pytest.raises(ValueError, match="larger than the target"):
        MultiScaleLoss()([torch.rand(1, 3, 9, 8)], torch.rand(1, 3, 8, 8))


def test_multiscale_rejects_empty_outputs():
    with pytest.raises(ValueError, match="outputs is empty"):
        MultiScaleLoss()([], torch.rand(1, 3, 8, 8))


def test_multiscale_accepts_single_tensor():
    target = torch.rand(1, 3, 8, 8)

    total, _ = MultiScaleLoss()(target.clone(), target)

    assert math.isfinite(total.item())
