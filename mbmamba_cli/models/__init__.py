"""The MBMamba network, its variants, MAC counting and weight loading."""

from torch import nn

from mbmamba_cli.models.variants import VARIANTS, VariantSpec, build_model, get_variant

__all__ = ["VARIANTS", "VariantSpec", "build_model", "get_variant", "set_scan_backend", "set_chunk_batching"]


def set_scan_backend(model: nn.Module, backend: str) -> None:
    """Make every Mamba block of `model` use the "torch" or "cuda" scan and conv kernels."""
    from mbmamba_cli.models.mamba import Mamba

    for module in model.modules():
        if isinstance(module, Mamba):
            module.backend = backend


def set_chunk_batching(model: nn.Module, enabled: bool) -> None:
    """Run the N chunks of every MemVSSM block as one batched Mamba call (True) or one call each."""
    from mbmamba_cli.models.memvssm import MemVSSMBlock

    for module in model.modules():
        if isinstance(module, MemVSSMBlock):
            module.batch_chunks = enabled
