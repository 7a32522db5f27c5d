"""Validation during training: PSNR/SSIM of a model on a held-out paired folder.

Pairs are found like training pairs (`find_pairs`: `ROOT/blur` + `ROOT/sharp`, or one such pair of
folders per scene). Each rank scores every world_size-th pair and the sums are combined, so every
rank gets the mean over all pairs, overall and per scene folder. The model's output is clipped to
[0, 1] and rounded to 8 bits before scoring, as a saved PNG would be. The blurred input is scored
the same way on the first call, so that every validation shows how far the model is above or below
its input.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mbmamba_cli.log import get_logger
from mbmamba_cli.metrics.psnr_ssim import psnr, ssim
from mbmamba_cli.training.data import PairedFolderDataset
from mbmamba_cli.training.distributed import TrainingPlacement, all_reduce_sum

logger = get_logger(__name__)

# Order of the four sums kept per group: model PSNR, model SSIM, input PSNR, input SSIM.
_SCORES = ("psnr", "ssim", "input_psnr", "input_ssim")


@dataclass
class ValidationScores:
    """Mean PSNR (dB) and SSIM of the model and of the blurred input over the validation pairs."""

    psnr: float
    ssim: float
    input_psnr: float
    input_ssim: float
    pairs: int
    # Scene folder name -> the same four means and "pairs", for folders with several scenes.
    groups: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_row(self) -> dict[str, float]:
        """Return the CSV columns of these scores."""
        return {
            "val_psnr": self.psnr,
            "val_ssim": self.ssim,
            "val_input_psnr": self.input_psnr,
            "val_input_ssim": self.input_ssim,
        }


def _centre_crop(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """Crop (3, h, w) to at most (3, size, size) around the centre."""
    if size is None:
        return image
    height, width = image.shape[-2:]
    crop_h, crop_w = min(size, height), min(size, width)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[:, top : top + crop_h, left : left + crop_w]


def _to_8bit_hwc(image: torch.Tensor) -> np.ndarray:
    """Convert (3, h, w) float to an (h, w, 3) float64 array rounded to 8-bit levels in [0, 1]."""
    array = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float64)
    return np.round(array * 255.0) / 255.0


def _scene_of(blur_path: Path, root: Path) -> str:
    """Return the name of the folder that contains a pair's `blur/` folder."""
    parts = blur_path.relative_to(root).parts
    position = parts.index("blur")
    return parts[position - 1] if position > 0 else root.name


class Validator:
    """Scores a model on a paired folder; input scores are computed on the first call."""

    def __init__(
        self,
        root: Path | str,
        placement: TrainingPlacement,
        crop: int | None,
        max_images: int | None,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        root = Path(root)
        self.dataset = PairedFolderDataset(root, patch_size=None, augment=False)
        count = len(self.dataset) if max_images is None else min(max_images, len(self.dataset))
        self.count = count
        self.indices = list(range(count))[placement.rank :: placement.world_size]
        self.scenes = [_scene_of(blur, self.dataset.root) for blur, _ in self.dataset.pairs[:count]]
        self.groups = sorted(set(self.scenes))
        self.placement = placement
        self.crop = crop
        self.autocast_dtype = autocast_dtype
        self._input_sums: np.ndarray | None = None
        logger.info(
            "validation: %d pairs in %d scene folders under %s%s",
            count,
            len(self.groups),
            root,
            f", centre crops of at most {crop}x{crop}" if crop else ", whole images",
        )

    @torch.no_grad()
    def run(self, model: nn.Module) -> ValidationScores:
        """Score `model` in eval mode on this rank's pairs and combine the sums of all ranks."""
        device = self.placement.device
        was_training = model.training
        model.eval()

        # Per group: model PSNR and SSIM sums, input PSNR and SSIM sums, pair count.
        sums = np.zeros((len(self.groups), 5), dtype=np.float64)
        for index in self.indices:
            blurred, sharp = self.dataset[index]
            blurred, sharp = _centre_crop(blurred, self.crop), _centre_crop(sharp, self.crop)

            with torch.autocast(
                device.type,
                dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None,
            ):
                restored = model(blurred.unsqueeze(0).to(device))[0]

            row = sums[self.groups.index(self.scenes[index])]
            reference = _to_8bit_hwc(sharp)
            output = _to_8bit_hwc(restored)
            row[0] += psnr(output, reference)
            row[1] += ssim(output, reference)
            if self._input_sums is None:
                blurred_8bit = _to_8bit_hwc(blurred)
                row[2] += psnr(blurred_8bit, reference)
                row[3] += ssim(blurred_8bit, reference)
            row[4] += 1

        model.train(was_training)

        totals = np.array(all_reduce_sum(self.placement, sums.ravel().tolist())).reshape(sums.shape)
        if self._input_sums is None:
            self._input_sums = totals[:, 2:4].copy()
        totals[:, 2:4] = self._input_sums
        return self._means(totals)

    def _means(self, totals: np.ndarray) -> ValidationScores:
        """Turn per-group sums (groups, 5) into overall and per-group means."""
        overall = totals[:, :4].sum(axis=0) / self.count
        groups = {}
        if len(self.groups) > 1:
            for name, row in zip(self.groups, totals, strict=True):
                groups[name] = {
                    **dict(zip(_SCORES, row[:4] / row[4], strict=True)),
                    "pairs": row[4],
                }
        return ValidationScores(*overall.tolist(), pairs=self.count, groups=groups)
