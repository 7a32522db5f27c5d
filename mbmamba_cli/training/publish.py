"""Measure a trained checkpoint on the real pairs and publish it into `weights/` with its manifest entry.

The shipped layout stores the encoder once (`encoder.safetensors`) and each variant's decoders in their
own file, in float16 when that costs under 0.05 dB. The manifest entry records the lineage (steps,
samples, patch size, data, hardware, wall time) and the PSNR/SSIM on every evaluation set next to the
blurred input's, plus one fixed crop whose PSNR a test re-measures to catch broken weights or loading.
"""

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mbmamba_cli.log import get_logger
from mbmamba_cli.models.weights import (
    ENCODER_FILE,
    MANIFEST_FILE,
    decoders_file,
    save_safetensors,
    sha256_of,
    split_for_shipping,
)

log = get_logger(__name__)

# Evaluation sets under the shared data folder: name -> (blurred folder, sharp folder).
EVALUATION_SETS = {
    "levin09": ("real/levin09/blur", "real/levin09/sharp"),
    "gopro_deepdeblur": ("real/gopro_deepdeblur/blur", "real/gopro_deepdeblur/sharp"),
    "lai2016_uniform": (
        "synthetic_benchmark/lai2016_uniform/blur",
        "synthetic_benchmark/lai2016_uniform/sharp",
    ),
}
# Real blur sets on which the weights must beat the blurred input for `beats_input` to be true.
REAL_SETS = ("levin09", "gopro_deepdeblur")
HALF_PRECISION_BUDGET_DB = 0.05

# The regression crop: a 64x64 window of one real Levin pair, scored in float32 without tiling.
CROP_PAIR = ("real/levin09/blur/im1_kernel1_img.png", "real/levin09/sharp/im1_kernel1_img.png")
CROP_BOX = (96, 96, 64, 64)  # top, left, height, width


@dataclass
class SetScores:
    """Mean scores of one evaluation set, for the model and for the blurred input."""

    count: int
    psnr: float
    ssim: float
    input_psnr: float
    input_ssim: float


def beats_blurred_input(scores: dict) -> bool:
    """Tell whether mean PSNR is higher and mean SSIM no lower than the blurred input's on one set.

    A PSNR gain bought with a lower SSIM is not counted as beating the input, so `deblur` warns.
    """
    return scores["psnr"] > scores["input_psnr"] and scores["ssim"] >= scores["input_ssim"]


class _Identity:
    """A deblurrer that returns its input: scores the blurred images themselves."""

    def deblur(self, pixels: np.ndarray) -> np.ndarray:
        return pixels


def measure_sets(deblurrer: Any, data_root: Path, sets: tuple[str, ...] = tuple(EVALUATION_SETS)) -> dict:
    """Score `deblurrer` and the blurred input on each evaluation set (gopro protocol: RGB, no crop).

    Returns per set the mean scores and, under "pairs", every pair's scores.
    """
    from mbmamba_cli.metrics.evaluate import evaluate_pairs
    from mbmamba_cli.metrics.pairing import pair_folders

    results = {}
    for name in sets:
        blur_dir, sharp_dir = (data_root / part for part in EVALUATION_SETS[name])
        pairs = pair_folders(blur_dir, sharp_dir, dataset=name)

        started = time.perf_counter()
        model_report = evaluate_pairs(pairs, "gopro", deblurrer)
        input_report = evaluate_pairs(pairs, "gopro", _Identity())
        scores = SetScores(
            count=model_report.overall.count,
            psnr=round(model_report.overall.psnr, 4),
            ssim=round(model_report.overall.ssim, 5),
            input_psnr=round(input_report.overall.psnr, 4),
            input_ssim=round(input_report.overall.ssim, 5),
        )
        log.info(
            "%s: %d pairs, PSNR %.3f dB (input %.3f), SSIM %.4f (input %.4f), %.0f s",
            name,
            scores.count,
            scores.psnr,
            scores.input_psnr,
            scores.ssim,
            scores.input_ssim,
            time.perf_counter() - started,
        )
        per_pair = {}
        inputs = {result.name: result for result in input_report.results}
        for result in model_report.results:
            blurred = inputs[result.name]
            per_pair[result.name] = {
                "psnr": round(result.psnr, 4),
                "ssim": round(result.ssim, 5),
                "input_psnr": round(blurred.psnr, 4),
                "input_ssim": round(blurred.ssim, 5),
            }
        results[name] = {**asdict(scores), "pairs": per_pair}
    return results


def measure_crop(model: nn.Module, data_root: Path) -> dict:
    """PSNR of the model and of the input on the regression crop, whole-crop float32 inference."""
    from mbmamba_cli.io.images import read_image
    from mbmamba_cli.metrics.psnr_ssim import psnr

    top, left, height, width = CROP_BOX
    blurred, sharp = (read_image(data_root / part).pixels for part in CROP_PAIR)
    blurred = blurred[top : top + height, left : left + width]
    sharp = sharp[top : top + height, left : left + width].astype(np.float64)

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(blurred)).permute(2, 0, 1)[None].float()
        restored = model.eval()(x)[0].permute(1, 2, 0).clamp(0, 1).numpy().astype(np.float64)

    return {
        "pair": CROP_PAIR[0],
        "box": list(CROP_BOX),
        "psnr": round(float(psnr(restored, sharp)), 4),
        "input_psnr": round(float(psnr(blurred.astype(np.float64), sharp)), 4),
    }


def half_precision_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the model's state dict in float16, except A_log and D, which the scan needs in float32."""
    state = {}
    for key, value in model.state_dict().items():
        keep_float32 = key.endswith(".A_log") or key.endswith(".D")
        state[key] = value.float() if keep_float32 else value.half()
    return state


def hardware_description() -> str:
    """CPU model and core count, or the CUDA device name."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads"


def write_shipped(
    model: nn.Module, variant: str, folder: Path, entry: dict[str, Any], half: bool
) -> dict[str, Any]:
    """Write the encoder and the variant's decoders into `folder` and update the manifest entry."""
    state = half_precision_state(model) if half else {k: v.float() for k, v in model.state_dict().items()}
    encoder, decoders, omitted = split_for_shipping(state)
    _check_shared_encoder(encoder, variant, folder)
    metadata = {"variant": variant, "steps": str(entry.get("steps", ""))}
    save_safetensors(encoder, folder / ENCODER_FILE, metadata)
    save_safetensors(decoders, folder / decoders_file(variant), metadata)

    entry = dict(entry)
    entry["dtype"] = "float16" if half else "float32"
    entry["identity_encoder_blocks"] = omitted
    entry["files"] = {
        name: sha256_of(folder / name) for name in (ENCODER_FILE, decoders_file(variant))
    }

    manifest_path = folder / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.setdefault("format", 1)
    manifest.setdefault("variants", {})[variant] = entry
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("Published %s into %s (%s)", variant, folder, entry["dtype"])
    return entry


def _check_shared_encoder(encoder: dict[str, torch.Tensor], variant: str, folder: Path) -> None:
    """Refuse to replace the shared encoder while other shipped variants were trained on the old one."""
    from mbmamba_cli.models.weights import load_state_dict_file, shipped_variants

    others = [name for name in shipped_variants(folder) if name != variant]
    if not others or not (folder / ENCODER_FILE).is_file():
        return
    shipped = load_state_dict_file(folder / ENCODER_FILE)
    same = shipped.keys() == encoder.keys() and all(
        torch.equal(shipped[key].to(encoder[key].dtype), encoder[key]) for key in encoder
    )
    if not same:
        raise ValueError(
            f"{variant} was trained with a different encoder than the one shipped for {', '.join(others)}; "
            "publishing it would break them. Retrain with the shipped encoder frozen "
            "(train.freeze_encoder=true, model.init=shipped), or republish every variant."
        )
