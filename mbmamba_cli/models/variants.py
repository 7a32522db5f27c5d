"""The variant table: one row of data per model, enforced at run time.

Params and MACs were measured with `count_macs` at 1x3x256x256 (multiply-accumulates of convolutions and
matrix products from `torch.utils.flop_counter`, plus 4.5 b l d n per selective scan; element-wise ops
excluded). Gao et al. (MBMamba, 2025, Table VI) print these MACs under the name "FLOPs": 54 G (S),
74 G (B) and 105 G (L).
"""

from dataclasses import dataclass

from torch import nn

from mbmamba_cli.models.mbmamba import RestorationNet, memvssm_block, naf_block

# Calibrated so S, B and L land within 5% of those MACs: +0.8%, -4.2% and -1.1%.
WIDTH = 64
ENCODER_BLOCKS = (1, 1, 1, 18)  # full, 1/2, 1/4, 1/8 scale
MIDDLE_BLOCKS = 1  # 1/16 scale
DECODER_BLOCKS = (1, 1, 2, 2)  # 1/8, 1/4, 1/2, full scale, per sub-decoder
CHUNKS = 4  # N channel chunks per MemVSSM block
MEMORY_DEPTH = 4  # K fused chunks kept in the memory bank


@dataclass(frozen=True)
class VariantSpec:
    """A model's structure and limits, checked by the loader, the engine and the trainer."""

    name: str
    display_name: str
    sub_decoders: int
    block: str  # "memvssm" or "naf"
    params: int  # measured, see module docstring
    macs: int  # measured at 1x3x256x256
    paper_macs: int | None  # Gao et al.'s "FLOPs(G)" column, for comparison
    multiple_of: int = 16  # inputs are padded to this inside forward; any size is accepted
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    train_patch: int = 256


VARIANTS: dict[str, VariantSpec] = {
    spec.name: spec
    for spec in (
        VariantSpec("s", "mbmamba-s", 1, "memvssm", 48_673_659, 54_458_273_792, 54_000_000_000),
        VariantSpec("b", "mbmamba-b", 2, "memvssm", 53_233_334, 70_909_775_872, 74_000_000_000),
        VariantSpec("l", "mbmamba-l", 4, "memvssm", 62_352_684, 103_812_780_032, 105_000_000_000),
        VariantSpec(
            "unet",
            "unet-baseline",
            1,
            "naf",
            49_529_865,
            50_186_350_592,
            None,
            dtypes=("float32", "bfloat16", "float16"),
        ),
    )
}


def get_variant(name: str) -> VariantSpec:
    """Look a variant up by short or display name, case-insensitive ("s", "S", "mbmamba-s")."""
    key = name.strip().lower()
    for spec in VARIANTS.values():
        if key in (spec.name, spec.display_name):
            return spec
    valid = ", ".join(f"{s.name} ({s.display_name})" for s in VARIANTS.values())
    raise ValueError(f"unknown variant {name!r}; valid variants: {valid}")


def build_model(variant: str) -> nn.Module:
    """Build an untrained model of a variant; `model.spec` is its VariantSpec."""
    spec = get_variant(variant)
    block = memvssm_block(CHUNKS, MEMORY_DEPTH) if spec.block == "memvssm" else naf_block()

    model = RestorationNet(WIDTH, ENCODER_BLOCKS, MIDDLE_BLOCKS, DECODER_BLOCKS, spec.sub_decoders, block)
    model.spec = spec
    return model
