"""Shared fixtures: deterministic seeds, the shared data folder and tiny models."""

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder; tests that need it skip where it is absent (e.g. a clean CI clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA.resolve()} is absent; these tests need the real images")
    return SHARED_DATA.resolve()


def tiny_mbmamba(sub_decoders: int = 1) -> torch.nn.Module:
    """An MBMamba with width 16 and one block per level: same code paths, a fraction of the cost."""
    from mbmamba_cli.models.mbmamba import RestorationNet, memvssm_block

    return RestorationNet(16, (1, 1, 1, 1), 1, (1, 1, 1, 1), sub_decoders, memvssm_block(4, 4))


def perturb(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised scales and heads do not hide code paths."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return model
