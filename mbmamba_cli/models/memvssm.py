"""MemVSSM: the decoder block of MBMamba, a Mamba over channel chunks with a FIFO memory of earlier chunks.

For an input X (b, c, h, w) the block normalises X, splits it into N chunks of c/N channels, runs one shared
Mamba over each chunk's pixels in raster order, and fuses each chunk's output with a memory bank that holds
the last K fused chunks of this block (FCAM, a channel cross-attention). The fused chunks are concatenated,
projected by a 1x1 conv and added back; a gated FFN follows. The memory lives for one forward pass of one
block and stores detached tensors, so no gradient flows from a chunk into earlier chunks through it.

Glossary of shape symbols: b batch, c block channels, c_k = c / N chunk channels, h height, w width,
m entries in the memory bank (m <= K), g attention heads.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mbmamba_cli.models.mamba import Mamba
from mbmamba_cli.models.nafnet import GatedFFN, LayerNorm2d


class FCAM(nn.Module):
    """Feature cross-attention with the memory, linear in the number of pixels (transposed attention).

    Queries come from the current chunk, keys and values from every memory entry with projections shared by
    all entries; the entries' keys and values are concatenated along channels so each head attends over all
    stored channels. alpha and beta start at zero, so a fresh module returns its input unchanged.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.heads = max(1, channels // 16)
        self.query = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
        )
        self.key_value = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 1, bias=False),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels, bias=False),
        )
        self.temperature = nn.Parameter(torch.ones(self.heads, 1, 1))
        self.project = nn.Conv2d(channels, channels, 1, bias=False)
        self.alpha = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def encode_memory(self, entry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project one memory entry (b, c_k, h, w) to its key and value, each (b, g, c_k / g, h w).

        Called once when the entry is pushed, so each entry is projected once per forward pass.
        """
        key, value = self.key_value(entry).chunk(2, dim=1)
        return self._split_heads(key), self._split_heads(value)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        return x.reshape(batch, self.heads, channels // self.heads, height * width)

    def forward(
        self,
        current: torch.Tensor,
        memory: list[torch.Tensor],
        memory_keys: list[torch.Tensor],
        memory_values: list[torch.Tensor],
    ) -> torch.Tensor:
        """Fuse the current chunk (b, c_k, h, w) with m memory entries (each (b, c_k, h, w)).

        `memory_keys` and `memory_values` are the `encode_memory` results of the entries. Returns
        (b, c_k, h, w).
        """
        batch, channels, height, width = current.shape

        query = F.normalize(self._split_heads(self.query(current)), dim=-1)  # (b, g, c_k/g, hw)
        keys = F.normalize(torch.cat(memory_keys, dim=2), dim=-1)  # (b, g, m c_k/g, hw)
        values = torch.cat(memory_values, dim=2)  # (b, g, m c_k/g, hw)

        attention = (query @ keys.transpose(-2, -1)) * self.temperature  # (b, g, c_k/g, m c_k/g)
        attended = attention.softmax(dim=-1) @ values  # (b, g, c_k/g, hw)
        attended = attended.reshape(batch, channels, height, width)

        memory_mean = torch.stack(memory, dim=0).mean(dim=0)
        return current + self.alpha * self.project(attended) + self.beta * memory_mean


class MemVSSMBlock(nn.Module):
    """Chunked Mamba with a memory bank and FCAM fusion, then a gated FFN: (b, c, h, w) -> (b, c, h, w)."""

    def __init__(self, channels: int, chunks: int = 4, memory_depth: int = 4) -> None:
        super().__init__()
        if channels % chunks != 0:
            raise ValueError(f"MemVSSM chunks={chunks} must divide the block's {channels} channels")

        self.chunks = chunks
        self.memory_depth = memory_depth
        self.use_memory = True
        # Running the chunks as one batched Mamba call gives identical output; it is faster on GPUs, while
        # one call per chunk was faster on 2 CPU cores. `set_chunk_batching` switches it per device.
        self.batch_chunks = False

        self.norm = LayerNorm2d(channels)
        self.mamba = Mamba(channels // chunks)
        self.fcam = FCAM(channels // chunks)
        self.project = nn.Conv2d(channels, channels, 1)
        self.scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.ffn = GatedFFN(channels)

    def _scan_chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the shared Mamba over each chunk of (b, c, h, w); returns N tensors (b, c_k, h, w)."""
        batch, channels, height, width = x.shape
        chunk_channels = channels // self.chunks

        if self.batch_chunks:
            stacked = x.reshape(batch * self.chunks, chunk_channels, height * width).transpose(1, 2)
            scanned = self.mamba(stacked).transpose(1, 2)  # (b N, c_k, hw)
            scanned = scanned.reshape(batch, self.chunks, chunk_channels, height, width)
            return list(scanned.unbind(dim=1))

        outputs = []
        for chunk in x.chunk(self.chunks, dim=1):
            tokens = chunk.reshape(batch, chunk_channels, height * width).transpose(1, 2)
            scanned = self.mamba(tokens).transpose(1, 2)  # (b, c_k, hw)
            outputs.append(scanned.reshape(batch, chunk_channels, height, width))
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, c, h, w)."""
        scanned = self._scan_chunks(self.norm(x))

        fused: list[torch.Tensor] = []
        memory: list[torch.Tensor] = []
        memory_keys: list[torch.Tensor] = []
        memory_values: list[torch.Tensor] = []
        for index, chunk in enumerate(scanned):
            if memory:
                chunk = self.fcam(chunk, memory, memory_keys, memory_values)
            fused.append(chunk)

            # FIFO bank of the last K fused chunks, detached so earlier chunks get no gradient through
            # it. The last chunk is never read back, so it is not pushed.
            if not self.use_memory or index == len(scanned) - 1:
                continue
            entry = chunk.detach()
            key, value = self.fcam.encode_memory(entry)
            memory.append(entry)
            memory_keys.append(key)
            memory_values.append(value)
            if len(memory) > self.memory_depth:
                del memory[0], memory_keys[0], memory_values[0]

        out = self.project(torch.cat(fused, dim=1))
        x = x + out * self.scale

        return self.ffn(x)
