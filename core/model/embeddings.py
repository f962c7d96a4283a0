"""Small embedding modules shared by the understanding and generation paths (MODEL.md 2.1, 5.1).

- ``sincos_2d_table``: the frozen DiT-style 2D table behind ``vit_pos_embed`` and ``latent_pos_embed``; the
  first half of each row encodes the column (DiT's ``meshgrid(w, h)``), the second half the row.
- ``TimestepEmbedder``: raw flow time in [0, 1] (not x1000), cos features before sin.
- ``MLPconnector``: ViT width to LLM width, GELU-tanh in between.
Parameter names match the official checkpoint (``pos_embed``, ``mlp.0``/``mlp.2``, ``fc1``/``fc2``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["sincos_2d_table", "PositionEmbedding", "TimestepEmbedder", "MLPconnector"]


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """``[sin(pos*w), cos(pos*w)]`` with ``w_k = 10000^(-k/(dim/2))``, computed in float64 like the reference."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None, :]  # [M, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_table(grid_size: int, dim: int) -> Tensor:
    """The ``[grid*grid, dim]`` float32 table; row ``r*grid + c`` is ``[sin/cos of c | sin/cos of r]``."""
    if dim % 4:
        raise ValueError(f"sin-cos table width must be a multiple of 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows = coords.repeat_interleave(grid_size)  # r of entry r*G + c
    cols = coords.repeat(grid_size)  # c of entry r*G + c
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()


class PositionEmbedding(nn.Module):
    """A frozen 2D sin-cos table indexed by flattened position ids ``row*side + col``."""

    def __init__(self, max_num_patch_per_side: int, hidden_size: int) -> None:
        super().__init__()
        self.max_num_patch_per_side = max_num_patch_per_side
        self.hidden_size = hidden_size
        # A parameter, not a buffer: the official checkpoint stores it and strict loading expects it.
        self.pos_embed = nn.Parameter(torch.empty(max_num_patch_per_side**2, hidden_size), requires_grad=False)
        if not self.pos_embed.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fill the table (also after building on the meta device and materialising)."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_table(self.max_num_patch_per_side, self.hidden_size))

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """DiT timestep embedding: 256 sinusoidal features of raw t, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def frequency_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """``[cos(t*f), sin(t*f)]`` with ``f_k = max_period^(-k/half)``; float32 whatever the weights' dtype."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t.float()[:, None] * freqs[None]  # [N, half]
        features = torch.cat([args.cos(), args.sin()], dim=-1)
        if dim % 2:
            features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
        return features

    def forward(self, t: Tensor) -> Tensor:
        features = self.frequency_features(t.reshape(-1), self.frequency_embedding_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class MLPconnector(nn.Module):
    """Maps ViT features to the LLM width: fc1, GELU(tanh), fc2."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))
