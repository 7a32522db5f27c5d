"""The network: Mamba layout, MemVSSM memory, size handling, MACs and the variant table."""

import math

import pytest
import torch
from conftest import perturb, tiny_mbmamba

from mbmamba_cli.models import VARIANTS, build_model, get_variant
from mbmamba_cli.models.complexity import count_macs
from mbmamba_cli.models.mamba import Mamba
from mbmamba_cli.models.memvssm import MemVSSMBlock

PAPER_MACS = {"s": 54e9, "b": 74e9, "l": 105e9}


def mamba_ssm_v1_layout(d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> dict:
    """Parameter shapes of mamba_ssm.modules.mamba_simple.Mamba (v1) as documented by that package."""
    d_inner = expand * d_model
    dt_rank = math.ceil(d_model / 16)
    return {
        "A_log": (d_inner, d_state),
        "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }


@pytest.mark.parametrize("d_model", [16, 32, 128])
def test_mamba_state_dict_layout(d_model):
    state = Mamba(d_model).state_dict()

    shapes = {key: tuple(value.shape) for key, value in state.items()}

    assert shapes == mamba_ssm_v1_layout(d_model)


def test_mamba_round_trip_strict():
    source, target = Mamba(32), Mamba(32)

    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 50, 32)

    assert torch.equal(source(x), target(x))


def test_mamba_ssm_parameters_stay_float32():
    block = Mamba(16)

    assert block.A_log.dtype == torch.float32
    assert block.D.dtype == torch.float32


def test_fresh_memvssm_equals_fusion_off():
    block = MemVSSMBlock(32, chunks=4, memory_depth=4)
    with torch.no_grad():
        block.scale.fill_(0.5)
        block.ffn.scale.fill_(0.5)
    x = torch.randn(1, 32, 6, 5)

    with_memory = block(x)
    block.use_memory = False
    without_memory = block(x)

    assert torch.allclose(with_memory, without_memory, atol=0, rtol=0)


def test_memvssm_memory_changes_output_when_trained():
    block = MemVSSMBlock(32, chunks=4, memory_depth=4)
    with torch.no_grad():
        block.scale.fill_(0.5)
        block.fcam.alpha.fill_(0.3)
        block.fcam.beta.fill_(0.3)
    x = torch.randn(1, 32, 6, 5)

    with_memory = block(x)
    block.use_memory = False
    without_memory = block(x)

    assert not torch.allclose(with_memory, without_memory)


def test_memvssm_memory_is_detached(monkeypatch):
    block = MemVSSMBlock(16, chunks=4, memory_depth=4)
    with torch.no_grad():
        block.fcam.alpha.fill_(0.5)
        block.fcam.beta.fill_(0.5)
    scanned = [torch.randn(1, 4, 5, 5, requires_grad=True) for _ in range(4)]
    monkeypatch.setattr(block, "_scan_chunks", lambda x: scanned)
    block.project = torch.nn.Identity()
    block.ffn = torch.nn.Identity()
    with torch.no_grad():
        block.scale.fill_(1.0)

    output = block(torch.zeros(1, 16, 5, 5))
    output[:, 4:8].sum().backward()  # the second fused chunk only

    first_grad = scanned[0].grad
    assert first_grad is None or torch.count_nonzero(first_grad) == 0
    assert torch.count_nonzero(scanned[1].grad) > 0


def test_memvssm_rejects_indivisible_chunks():
    with pytest.raises(ValueError, match="must divide"):
        MemVSSMBlock(30, chunks=4)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (7, 13), (33, 65)])
def test_forward_keeps_odd_sizes(size):
    model = perturb(tiny_mbmamba()).eval()
    x = torch.rand(1, 3, *size)

    with torch.no_grad():
        y = model(x)

    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_training_outputs_cover_three_scales_per_decoder():
    model = tiny_mbmamba(sub_decoders=2).train()
    x = torch.rand(2, 3, 20, 36)

    outputs = model(x)

    assert [tuple(o.shape[-2:]) for o in outputs] == [(5, 9), (10, 18), (20, 36)] * 2
    assert outputs[-1].shape == x.shape


def test_eval_output_equals_last_training_output():
    model = perturb(tiny_mbmamba(sub_decoders=2))
    x = torch.rand(1, 3, 16, 16)

    with torch.no_grad():
        final = model.eval()(x)
        outputs = model.train()(x)

    assert torch.allclose(final, outputs[-1], atol=1e-6)


def test_full_s_forward_small_input():
    model = build_model("s").eval()
    x = torch.rand(1, 3, 17, 23)

    with torch.no_grad():
        y = model(x)

    assert y.shape == x.shape


def test_untrained_model_returns_input():
    model = build_model("s").eval()
    x = torch.rand(1, 3, 16, 16)

    with torch.no_grad():
        y = model(x)

    assert torch.equal(y, x)


@pytest.mark.parametrize("variant", ["s", "b", "l"])
def test_macs_within_ten_percent_of_paper(variant):
    with torch.device("meta"):
        model = build_model(variant)

    report = count_macs(model)

    assert abs(report.macs - PAPER_MACS[variant]) / PAPER_MACS[variant] < 0.10


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_table_matches_measurement(variant):
    with torch.device("meta"):
        model = build_model(variant)

    report = count_macs(model)

    assert report.macs == VARIANTS[variant].macs
    assert report.params == VARIANTS[variant].params


def test_mamba_macs_equal_hand_formula():
    d_model, length = 32, 64
    block = Mamba(d_model)
    d_inner, rank, states = block.d_inner, block.dt_rank, block.d_state

    report = count_macs(block, (1, length, d_model))

    linear = length * (d_model * 2 * d_inner + d_inner * (rank + 2 * states) + rank * d_inner)
    linear += length * d_inner * d_model
    conv = length * d_inner * 4
    scan = 4.5 * length * d_inner * states
    assert report.macs == linear + conv + scan
    assert report.scan_macs == scan


def test_get_variant_accepts_aliases():
    assert get_variant("S").name == "s"
    assert get_variant("mbmamba-l").name == "l"


def test_get_variant_rejects_unknown_name():
    with pytest.raises(ValueError, match="valid variants"):
        get_variant("xl")
