"""Checkpoint loading, canonicalisation and the shipped weights.

Shipped weights live in `weights/` as safetensors: the encoder, shared by every variant, is stored once
(`encoder.safetensors`) and each variant's decoders separately (`mbmamba-s.decoders.safetensors`, ...), and
`weights/manifest.json` records their lineage and measured PSNR/SSIM. The loader assembles the pieces; it
also accepts single-file checkpoints written by `mbmamba train` and other tools' layouts (`params_ema`,
`params`, `state_dict`, `model` wrappers and `module.` prefixes). Loading is always strict: a checkpoint that
does not fit the requested variant fails with the detected variant and the differing keys named.
"""

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mbmamba_cli.log import get_logger
from mbmamba_cli.models.variants import VARIANTS, build_model, get_variant

log = get_logger(__name__)

# NOTE: the shipped weights are looked up next to the source tree, which works for clones and editable
# installs. A wheel install must point MBMAMBA_WEIGHTS_DIR at a copy of the repository's `weights/`.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
ENCODER_FILE = "encoder.safetensors"
MANIFEST_FILE = "manifest.json"
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "ema")
PREFIXES = ("module.", "_orig_mod.", "model.")


class WeightsError(RuntimeError):
    """A checkpoint could not be read or does not fit the requested model."""


class WeightsNotFoundError(WeightsError):
    """No weights exist for the requested variant."""


@dataclass
class WeightsInfo:
    """Origin of a model's weights and the manifest entry recorded for them."""

    variant: str
    source: str
    manifest: dict[str, Any] | None = None
    beats_input: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """One line for logs: variant, source and training steps."""
        steps = (self.manifest or {}).get("steps")
        trained = f", {steps} training steps" if steps is not None else ""
        return f"{get_variant(self.variant).display_name} from {self.source}{trained}"

    def quality_warning(self) -> str | None:
        """Return a one-line warning when the manifest records that the weights do not beat the input."""
        if self.beats_input is not False or not self.manifest:
            return None
        parts = []
        for name, scores in self.manifest.get("metrics", {}).items():
            if "psnr" in scores and "input_psnr" in scores:
                ssim, input_ssim = scores.get("ssim", float("nan")), scores.get("input_ssim", float("nan"))
                parts.append(
                    f"{name} PSNR {scores['psnr']:.2f} dB vs input {scores['input_psnr']:.2f} dB, "
                    f"SSIM {ssim:.4f} vs {input_ssim:.4f}"
                )
        measured = "; ".join(parts) if parts else "no measurements recorded"
        return (
            f"the shipped {get_variant(self.variant).display_name} weights do not yet beat the blurred "
            f"input on mean PSNR and SSIM ({measured}); train better ones with `mbmamba train` (see README)"
        )


def weights_dir() -> Path:
    """Return the shipped weights folder: MBMAMBA_WEIGHTS_DIR if set, else `weights/` in the source tree."""
    return Path(os.environ.get("MBMAMBA_WEIGHTS_DIR", DEFAULT_WEIGHTS_DIR))


def decoders_file(variant: str) -> str:
    """File name of a variant's decoders inside the weights folder."""
    return f"{get_variant(variant).display_name}.decoders.safetensors"


def read_manifest(folder: Path | None = None) -> dict[str, Any]:
    """Read the shipped manifest, or return an empty one when the folder has none."""
    path = (folder or weights_dir()) / MANIFEST_FILE
    if not path.is_file():
        return {"variants": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise WeightsError(f"{path} is not valid JSON ({error}); restore it with git checkout") from error


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file: safetensors, or a .pth/.pt/.ckpt through `torch.load(weights_only=True)`."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(
            f"{path} is a folder; pass a weights file such as {path / 'final.safetensors'}"
        )
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} not found; check the path given to --weights")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty; pass a .safetensors or .pth weights file")

    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise WeightsError(f"{path} is not a readable safetensors file: {error}") from error

    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch.save files are zip archives ("PK"); older ones are raw pickles (protocol 2+: 0x80).
        with path.open("rb") as handle:
            head = handle.read(2)
        if head != b"PK" and head[:1] != b"\x80":
            raise WeightsError(
                f"{path} is not a PyTorch checkpoint (unpickling failed); pass a .safetensors or .pth file"
            ) from error
        raise WeightsError(
            f"{path} is a pickled checkpoint that contains objects other than tensors, so it cannot be "
            "loaded safely (torch.load with weights_only=True). Re-save its state dict from the program "
            "that wrote it (torch.save(model.state_dict(), ...)), or convert it to safetensors."
        ) from error
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError) as error:
        # torch.load raises many exception types on files that are not checkpoints at all.
        raise WeightsError(
            f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {error}); "
            "pass a .safetensors or .pth weights file"
        ) from error
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path} contains a {type(loaded).__name__}, not a state dict")
    return loaded


def canonicalize_state_dict(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap `params_ema`/`params`/`state_dict`/`model` and strip `module.`-style prefixes."""
    for key in WRAPPER_KEYS:
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break

    # A training checkpoint stores model.*, ema.*, optim.* and rng.* tensors: use the EMA weights.
    if any(key.startswith("ema.") for key in state) and any(key.startswith("optim.") for key in state):
        state = {key[len("ema.") :]: value for key, value in state.items() if key.startswith("ema.")}

    canonical = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        canonical[key] = value
    return canonical


def detect_variant(state: dict[str, torch.Tensor]) -> str:
    """Tell the variant from the keys of a canonical state dict ("s", "b", "l" or "unet")."""
    decoder_ids = {key.split(".")[1] for key in state if key.startswith("decoders.")}
    has_mamba = any(".mamba." in key for key in state)

    if not decoder_ids:
        raise WeightsError("the checkpoint has no decoder tensors (keys 'decoders.*'); is it an MBMamba one?")
    if not has_mamba:
        return "unet"
    by_count = {spec.sub_decoders: spec.name for spec in VARIANTS.values() if spec.block == "memvssm"}
    if len(decoder_ids) not in by_count:
        raise WeightsError(f"the checkpoint has {len(decoder_ids)} sub-decoders; no variant has that many")
    return by_count[len(decoder_ids)]


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model` strictly, naming the detected variant and the differing keys on failure."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
        for key in set(expected) & set(state)
        if state[key].shape != expected[key].shape
    )
    if missing or unexpected or mismatched:
        name = model.spec.display_name if hasattr(model, "spec") else type(model).__name__
        try:
            detected = get_variant(detect_variant(state)).display_name
        except WeightsError as error:
            detected = f"unknown ({error})"
        raise WeightsError(
            f"{source} does not fit {name}: detected variant {detected}; "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}, {len(mismatched)} shape mismatches {mismatched[:5]}. "
            "Pass the matching --variant, or the right --weights file."
        )
    model.load_state_dict(state, strict=True)


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write tensors (made contiguous, on CPU) and string metadata to a safetensors file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)


# An encoder NAFNet block: "encoder.levels.<level>.<index>." or "encoder.middle.<index>.".
_ENCODER_BLOCK = re.compile(r"^(encoder\.(?:levels\.\d+\.\d+|middle\.\d+)\.)")


def _encoder_block(key: str) -> str | None:
    match = _ENCODER_BLOCK.match(key)
    return match.group(1) if match else None


def _is_identity(state: dict[str, torch.Tensor], block: str) -> bool:
    scale, ffn_scale = state.get(block + "scale"), state.get(block + "ffn.scale")
    return scale is not None and ffn_scale is not None and not scale.any() and not ffn_scale.any()


def identity_blocks(state: dict[str, torch.Tensor]) -> list[str]:
    """Prefixes of encoder NAFNet blocks whose two residual scales are all zero.

    Such a block returns its input exactly whatever its other weights are (x + 0 * y), so the shipped
    files leave those weights out and the loader fills them from a freshly built model.
    """
    blocks = sorted({block for key in state if (block := _encoder_block(key))})
    return [block for block in blocks if _is_identity(state, block)]


def split_for_shipping(state: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """Split a full state dict into (encoder tensors, decoder tensors, omitted identity blocks).

    The encoder part leaves out the blocks listed by `identity_blocks` except their zero scales, which
    stay so that the loader can check that each omitted block really is an identity.
    """
    omitted = set(identity_blocks(state))
    encoder, decoders = {}, {}
    for key, value in state.items():
        if not key.startswith("encoder."):
            decoders[key] = value
            continue
        block = _encoder_block(key)
        if block not in omitted or key in (f"{block}scale", f"{block}ffn.scale"):
            encoder[key] = value
    return encoder, decoders, sorted(omitted)


def fill_identity_blocks(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Complete a shipped encoder whose identity blocks were left out, from `model`'s own weights.

    Only keys of blocks whose stored residual scales are zero are filled, so the filled values cannot
    change the output; any other missing key stays missing and strict loading reports it.
    """
    filled = dict(state)
    for key, value in model.state_dict().items():
        block = _encoder_block(key)
        if key not in state and block is not None and _is_identity(state, block):
            filled[key] = value
    return filled


def shipped_state_dict(variant: str, folder: Path | None = None) -> dict[str, torch.Tensor]:
    """Assemble a variant's state dict from the shared encoder and its decoders file.

    Encoder blocks left out as identities are not filled here; `load_model` fills them.
    """
    folder = folder or weights_dir()
    spec = get_variant(variant)
    encoder_path, decoder_path = folder / ENCODER_FILE, folder / decoders_file(spec.name)
    if not encoder_path.is_file() or not decoder_path.is_file():
        available = shipped_variants(folder)
        alternative = f", or use --variant {available[0]}" if available else ""
        raise WeightsNotFoundError(
            f"no shipped weights for {spec.display_name} (looked for {decoder_path}; shipped: "
            f"{', '.join(available) or 'none'}). Train them with `mbmamba train --config "
            f"configs/{_training_config(spec.name)}`, then pass --weights runs/<run>/final.safetensors"
            f"{alternative}."
        )

    state = load_state_dict_file(encoder_path)
    state.update(load_state_dict_file(decoder_path))
    return state


def _training_config(variant: str) -> str:
    return "stage1-unet.json" if variant == "unet" else f"stage2-{variant}.json"


def shipped_variants(folder: Path | None = None) -> list[str]:
    """Short names of the variants whose weight files are present."""
    folder = folder or weights_dir()
    if not (folder / ENCODER_FILE).is_file():
        return []
    return [name for name in VARIANTS if (folder / decoders_file(name)).is_file()]


def _reject_custom_architecture(path: Path) -> None:
    """Raise when a safetensors file from `mbmamba train` records a custom (non-variant) architecture."""
    if path.suffix != ".safetensors" or not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError):
        return  # load_state_dict_file reports unreadable files
    if metadata.get("variant") == "custom":
        raise WeightsError(
            f"{path} contains a custom architecture ({metadata.get('display_name', 'model.architecture')}) "
            "trained from a config with model.architecture; deblur and eval run only the variants "
            "s, b, l and unet. Train with --variant and no architecture override to use it here."
        )


def load_model(
    variant: str, weights: Path | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, WeightsInfo]:
    """Build a variant and load its weights (the shipped ones when `weights` is None), in eval mode."""
    spec = get_variant(variant)

    if weights is None:
        state = shipped_state_dict(spec.name)
        manifest = read_manifest().get("variants", {}).get(spec.name)
        info = WeightsInfo(spec.name, f"shipped weights in {weights_dir()}", manifest)
        if manifest is not None:
            info.beats_input = manifest.get("beats_input")
    else:
        _reject_custom_architecture(Path(weights))
        state = canonicalize_state_dict(load_state_dict_file(Path(weights)))
        info = WeightsInfo(spec.name, str(weights))

    model = build_model(spec.name)
    state = fill_identity_blocks(state, model)
    load_into(model, {k: v.float() for k, v in state.items()}, info.source)
    model.to(device).eval()
    return model, info
