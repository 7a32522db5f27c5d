"""MBMamba: a frozen NAFNet encoder and a chain of MemVSSM sub-decoders.

Gao et al., "MBMamba: When Memory Buffer Meets Mamba for Structure-Aware Image Deblurring" (2025). The
encoder is shared by every variant; variants S, B and L differ only in the number of sub-decoders (1, 2, 4).
Sub-decoder k+1 starts from the bottleneck and, at every scale, adds the features sub-decoder k produced
there to the encoder skip. Every sub-decoder predicts a residual that is added to the blurred input; the last
one is the model output. In training mode each sub-decoder also predicts images at 1/2 and 1/4 scale for the
multi-scale loss.

The same `Decoder` class with NAFNet blocks instead of MemVSSM blocks gives the U-Net baseline.

Glossary of shape symbols: b batch, h, w image height and width, H, W padded to multiples of 16.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mbmamba_cli.models.memvssm import MemVSSMBlock
from mbmamba_cli.models.nafnet import Encoder, NAFBlock, Upsample, pad_to_multiple

BlockFactory = Callable[[int], nn.Module]

# Scales of the training outputs relative to the input, finest last.
TRAINING_SCALES = (4, 2, 1)


class Decoder(nn.Module):
    """Four decoding stages from 1/8 to full scale: upsample, add the skips, then blocks."""

    def __init__(self, bottleneck_channels: int, stage_blocks: tuple[int, ...], block: BlockFactory):
        super().__init__()
        self.ups = nn.ModuleList()
        self.stages = nn.ModuleList()
        channels = bottleneck_channels
        stage_channels = []
        for count in stage_blocks:
            self.ups.append(Upsample(channels))
            channels //= 2
            self.stages.append(nn.Sequential(*[block(channels) for _ in range(count)]))
            stage_channels.append(channels)

        # Heads that turn the last three stages' features into 3-channel residuals (1/4, 1/2, full).
        self.heads = nn.ModuleList(nn.Conv2d(c, 3, 3, padding=1) for c in stage_channels[-3:])

        # Zero heads make an untrained decoder return its input unchanged, so training starts from the
        # blurred image's PSNR instead of noise (the blocks' residual scales start at zero too).
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.out_channels = channels

    def forward(
        self,
        bottleneck: torch.Tensor,
        skips: list[torch.Tensor],
        previous: list[torch.Tensor] | None,
        with_side_outputs: bool,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Decode one pass.

        Args:
            bottleneck: (b, 16 c0, H/16, W/16).
            skips: encoder features from full to 1/8 scale, (b, c0, H, W) ... (b, 8 c0, H/8, W/8).
            previous: the previous sub-decoder's stage features (1/8 first), or None for the first one.
            with_side_outputs: also return the 1/4 and 1/2 scale residuals.

        Returns:
            (stage features from 1/8 to full scale, residuals from coarse to full scale; only the full-scale
            residual (b, 3, H, W) unless `with_side_outputs`).
        """
        x = bottleneck
        features = []
        for index, (up, stage) in enumerate(zip(self.ups, self.stages, strict=True)):
            x = up(x) + skips[-1 - index]
            if previous is not None:
                x = x + previous[index]
            x = stage(x)
            features.append(x)

        if not with_side_outputs:
            return features, [self.heads[-1](features[-1])]
        residuals = [head(f) for head, f in zip(self.heads, features[-3:], strict=True)]
        return features, residuals


class RestorationNet(nn.Module):
    """The shared encoder followed by one or more chained decoders; base of MBMamba and the U-Net baseline."""

    multiple_of = 16

    def __init__(
        self,
        width: int,
        encoder_blocks: tuple[int, ...],
        middle_blocks: int,
        decoder_blocks: tuple[int, ...],
        sub_decoders: int,
        block: BlockFactory,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(width, encoder_blocks, middle_blocks)
        self.decoders = nn.ModuleList(
            Decoder(self.encoder.out_channels, decoder_blocks, block) for _ in range(sub_decoders)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Deblur (b, 3, h, w) images in [0, 1]; any h, w >= 1.

        Returns (b, 3, h, w) in eval mode. In training mode returns every sub-decoder's outputs at 1/4, 1/2
        and full scale, (b, 3, ceil(h/4), ceil(w/4)) ... (b, 3, h, w), the final image last.
        """
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, self.multiple_of)
        side_outputs = self.training

        skips, bottleneck = self.encoder(padded)
        scales = TRAINING_SCALES if side_outputs else (1,)
        inputs = [F.avg_pool2d(padded, s) if s > 1 else padded for s in scales]

        outputs = []
        previous = None
        for decoder in self.decoders:
            previous, residuals = decoder(bottleneck, skips, previous, side_outputs)
            for residual, image, scale in zip(residuals, inputs, scales, strict=True):
                crop_h, crop_w = -(-height // scale), -(-width // scale)
                outputs.append((residual + image)[..., :crop_h, :crop_w])

        if not side_outputs:
            return outputs[-1]
        return outputs


def memvssm_block(chunks: int, memory_depth: int) -> BlockFactory:
    """Return a factory of MemVSSM blocks with N chunks and memory depth K."""
    return lambda channels: MemVSSMBlock(channels, chunks=chunks, memory_depth=memory_depth)


def naf_block() -> BlockFactory:
    """Return a factory of NAFNet blocks (the U-Net baseline decoder)."""
    return NAFBlock
