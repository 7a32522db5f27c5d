"""Build the network to train from its config and load its starting weights.

Starting weights come in three layers, applied in this order so later ones win:
1. `model.init`: a whole model ("shipped" weights, a weights file, or a training checkpoint's EMA);
2. `model.encoder_init`: only the `encoder.*` tensors (stage 2 after a stage-1 U-Net run);
3. `model.decoder_init`: sub-decoder k from another checkpoint for every k both models have
   (for example B's first sub-decoder from a trained S).
"""

from pathlib import Path

import torch
from torch import nn

from mbmamba_cli.log import get_logger
from mbmamba_cli.models.variants import VariantSpec, build_model, get_variant
from mbmamba_cli.models.weights import (
    ENCODER_FILE,
    WeightsError,
    canonicalize_state_dict,
    load_into,
    load_state_dict_file,
    shipped_state_dict,
    weights_dir,
)
from mbmamba_cli.training.config import ArchitectureConfig, ConfigError, ModelConfig

logger = get_logger(__name__)


def build_from_config(config: ModelConfig) -> nn.Module:
    """Build an untrained network: the named variant, or `config.architecture` when it is set."""
    try:
        spec = get_variant(config.variant)
    except ValueError as error:
        raise ConfigError(f"model.variant: {error}") from None

    if config.architecture is None:
        return build_model(spec.name)
    return build_custom(config.architecture)


def build_custom(arch: ArchitectureConfig) -> nn.Module:
    """Build a RestorationNet of a custom size; its `spec` is named "custom"."""
    from mbmamba_cli.models.mbmamba import RestorationNet, memvssm_block, naf_block

    block = (
        memvssm_block(arch.chunks, arch.memory_depth) if arch.block == "memvssm" else naf_block()
    )
    model = RestorationNet(
        arch.width,
        tuple(arch.encoder_blocks),
        arch.middle_blocks,
        tuple(arch.decoder_blocks),
        arch.sub_decoders,
        block,
    )
    params = sum(p.numel() for p in model.parameters())
    model.spec = VariantSpec(
        name="custom",
        display_name=f"custom width {arch.width} {arch.block} x{arch.sub_decoders}",
        sub_decoders=arch.sub_decoders,
        block=arch.block,
        params=params,
        macs=0,
        paper_macs=None,
    )
    return model


def _read_weights(reference: str, option: str) -> tuple[dict[str, torch.Tensor], str]:
    """Read a weights file or a training checkpoint (its EMA tensors); return (state, source)."""
    from mbmamba_cli.training.checkpoint import META_FILE, TENSORS_FILE, load_checkpoint

    path = Path(reference)
    if path.is_dir() or path.name in (META_FILE, TENSORS_FILE):
        checkpoint = load_checkpoint(path)
        return checkpoint.ema, f"EMA weights of checkpoint {checkpoint.path}"
    if not path.is_file():
        raise ConfigError(
            f"{option} file {path} not found; train it first, point {option} at an existing "
            f"weights file or run folder, or set {option}=null"
        )
    return canonicalize_state_dict(load_state_dict_file(path)), str(path)


def _load_encoder(model: nn.Module, reference: str) -> str:
    """Load `encoder.*` tensors into the model's encoder; return where they came from."""
    if reference == "shipped":
        path = weights_dir() / ENCODER_FILE
        if not path.is_file():
            raise ConfigError(
                f"model.encoder_init=shipped but {path} does not exist; train stage 1 "
                "(configs/stage1-unet.json) and point model.encoder_init at its final.safetensors"
            )
        state, source = load_state_dict_file(path), f"shipped encoder {path}"
    else:
        state, source = _read_weights(reference, "model.encoder_init")

    encoder_state = {
        k.removeprefix("encoder."): v.float() for k, v in state.items() if k.startswith("encoder.")
    }
    expected = model.encoder.state_dict()
    missing = sorted(set(expected) - set(encoder_state))
    mismatched = [
        k for k in expected if k in encoder_state and encoder_state[k].shape != expected[k].shape
    ]
    if missing or mismatched:
        raise WeightsError(
            f"{source} contains no encoder that fits this model: {len(missing)} encoder tensors "
            f"missing {missing[:5]}, {len(mismatched)} shape mismatches {mismatched[:5]}"
        )
    model.encoder.load_state_dict({k: encoder_state[k] for k in expected}, strict=True)
    return source


def _load_decoders(model: nn.Module, reference: str) -> tuple[str, int]:
    """Copy sub-decoder k from a checkpoint for every k both have; return (source, count)."""
    state, source = _read_weights(reference, "model.decoder_init")
    target = model.state_dict()
    copied = 0
    for index in range(len(model.decoders)):
        prefix = f"decoders.{index}."
        source_keys = {k for k in state if k.startswith(prefix)}
        if not source_keys:
            break
        target_keys = {k for k in target if k.startswith(prefix)}
        if source_keys != target_keys or any(
            state[k].shape != target[k].shape for k in target_keys
        ):
            raise WeightsError(
                f"sub-decoder {index} of {source} does not fit this model's sub-decoder {index} "
                "(different block type or width); model.decoder_init needs a checkpoint of the "
                "same family"
            )
        for key in target_keys:
            target[key] = state[key].float()
        copied += 1

    if copied == 0:
        raise WeightsError(
            f"{source} has no sub-decoder tensors (keys 'decoders.0.*'); check model.decoder_init"
        )
    model.load_state_dict(target, strict=True)
    return source, copied


def load_initial_weights(model: nn.Module, config: ModelConfig) -> None:
    """Apply `model.init`, `model.encoder_init` and `model.decoder_init` (see module docstring)."""
    if config.init is not None:
        if config.init == "shipped":
            if model.spec.name == "custom":
                raise ConfigError(
                    "model.init=shipped needs a named variant, not model.architecture"
                )
            state, source = (
                shipped_state_dict(model.spec.name),
                f"shipped {model.spec.display_name} weights",
            )
        else:
            state, source = _read_weights(config.init, "model.init")
        load_into(model, {k: v.float() for k, v in state.items()}, source)
        logger.info("starting weights: all %d tensors from %s", len(state), source)

    if config.encoder_init is not None:
        source = _load_encoder(model, config.encoder_init)
        logger.info("encoder weights from %s", source)

    if config.decoder_init is not None:
        source, copied = _load_decoders(model, config.decoder_init)
        logger.info(
            "sub-decoders 0..%d of %d from %s; the rest start from random weights",
            copied - 1,
            len(model.decoders),
            source,
        )

    if config.init is None and config.encoder_init is None and config.decoder_init is None:
        logger.info(
            "starting weights: random initialisation (no model.init, encoder_init or decoder_init)"
        )


def freeze_encoder(model: nn.Module) -> None:
    """Stop gradients to the encoder; its weights stay as loaded."""
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
