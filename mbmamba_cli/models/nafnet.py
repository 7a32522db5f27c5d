"""NAFNet-style building blocks, the shared encoder and the plain U-Net baseline.

The encoder follows NAFNet (Chen et al., "Simple Baselines for Image Restoration", ECCV 2022): blocks of
LayerNorm2d, 1x1 conv, 3x3 depthwise conv, SimpleGate, simplified channel attention and a gated FFN, each
branch added back with a learnable per-channel scale that starts at zero. Every MBMamba variant shares this
encoder; the U-Net baseline pairs it with a NAFNet-block decoder and is used for stage-1 pre-training and as
the speed baseline.

Glossary of shape symbols: b batch, c channels, h height, w width.
"""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a (b, c, h, w) tensor, computed in float32."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, c, h, w)."""
        dtype = x.dtype
        x = x.float()
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        x = x * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]
        return x.to(dtype)


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them: (b, 2c, h, w) -> (b, c, h, w)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=1)
        return first * second


class GatedFFN(nn.Module):
    """LayerNorm, 1x1 conv to 2c, SimpleGate, 1x1 conv; added back with a zero-initialised scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(channels)
        self.expand = nn.Conv2d(channels, 2 * channels, 1)
        self.gate = SimpleGate()
        self.project = nn.Conv2d(channels, channels, 1)
        self.scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, c, h, w)."""
        y = self.project(self.gate(self.expand(self.norm(x))))
        return x + y * self.scale


class NAFBlock(nn.Module):
    """NAFNet block: a spatial mixing branch and a gated FFN, both residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(channels)
        self.expand = nn.Conv2d(channels, 2 * channels, 1)
        self.depthwise = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels)
        self.gate = SimpleGate()
        self.channel_attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1)
        )
        self.project = nn.Conv2d(channels, channels, 1)
        self.scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.ffn = GatedFFN(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, c, h, w)."""
        y = self.gate(self.depthwise(self.expand(self.norm(x))))
        y = y * self.channel_attention(y)
        y = self.project(y)
        x = x + y * self.scale

        return self.ffn(x)


class Downsample(nn.Sequential):
    """2x2 stride-2 conv that halves h and w and doubles c."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, 2 * channels, 2, stride=2))


class Upsample(nn.Sequential):
    """1x1 conv (c -> 2c, no bias) then PixelShuffle(2): doubles h and w and halves c."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, 2 * channels, 1, bias=False), nn.PixelShuffle(2))


class Encoder(nn.Module):
    """Shallow 3x3 conv, four NAFNet levels with downsampling between them, and a middle stage.

    Channels per level are width, 2 width, 4 width, 8 width and 16 width in the middle stage at 1/16 scale.
    """

    def __init__(self, width: int, level_blocks: tuple[int, ...], middle_blocks: int) -> None:
        super().__init__()
        self.intro = nn.Conv2d(3, width, 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        channels = width
        for count in level_blocks:
            self.levels.append(nn.Sequential(*[NAFBlock(channels) for _ in range(count)]))
            self.downs.append(Downsample(channels))
            channels *= 2
        self.middle = nn.Sequential(*[NAFBlock(channels) for _ in range(middle_blocks)])
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(b, 3, h, w) with h, w multiples of 16 -> (skips from full to 1/8 scale, bottleneck at 1/16)."""
        x = self.intro(x)
        skips = []
        for level, down in zip(self.levels, self.downs, strict=True):
            x = level(x)
            skips.append(x)
            x = down(x)

        return skips, self.middle(x)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom and right of (b, c, h, w) up to multiples of `multiple`.

    Reflect padding where the image is large enough, replicate padding where it is not (1x1, 2x2 or thin
    images), so no image size raises and no zero border darkens the right and bottom edges.
    """
    height, width = x.shape[-2:]
    pad_h = (multiple - height % multiple) % multiple
    pad_w = (multiple - width % multiple) % multiple
    if pad_h == 0 and pad_w == 0:
        return x

    # Reflect padding must be smaller than the dimension it mirrors; pad in one or two passes.
    reflect_h = min(pad_h, height - 1)
    reflect_w = min(pad_w, width - 1)
    if reflect_h > 0 or reflect_w > 0:
        x = F.pad(x, (0, reflect_w, 0, reflect_h), mode="reflect")
    rest_h, rest_w = pad_h - reflect_h, pad_w - reflect_w
    if rest_h > 0 or rest_w > 0:
        x = F.pad(x, (0, rest_w, 0, rest_h), mode="replicate")
    return x
