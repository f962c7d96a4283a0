"""The FLUX.1 autoencoder that BAGEL generates through (MODEL.md 4), with Black Forest Labs' original key names.

Notable:
- ``ae.safetensors`` comes with no config: ``AutoEncoderParams.from_state_dict`` reads the sizes off the tensors,
  so the published FLUX VAE and the tiny test VAE load through the same path.
- ``encode`` *samples* the posterior (BAGEL does), then maps to model space with ``(z - shift) * scale``.
- ``decoder.up`` is indexed by resolution level (0 = full size) but run from the deepest level up, as in BFL.
- Images are decoded to uint8 by truncation, as the official ``decode_image`` does (MODEL.md 11.7).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["AutoEncoderParams", "AutoEncoder", "to_uint8_image", "to_pil_image"]


@dataclass(frozen=True)
class AutoEncoderParams:
    """Sizes of the autoencoder; the defaults are FLUX.1's (``load_ae`` in the official code)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        for mult in self.ch_mult:
            if (self.ch * mult) % 32:
                raise ValueError(f"GroupNorm(32) needs channels divisible by 32, got ch={self.ch} x {mult}")

    @property
    def downsample(self) -> int:
        """Pixels per latent position along a side (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def tiny(cls) -> AutoEncoderParams:
        """The smallest shape GroupNorm(32) allows, with FLUX's downsampling and latent channels."""
        return cls(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor]) -> AutoEncoderParams:
        """Infer the sizes from tensor shapes (the file carries no config); scale and shift stay FLUX's."""
        try:
            conv_in = state_dict["encoder.conv_in.weight"]  # [ch, in_channels, 3, 3]
            conv_out = state_dict["decoder.conv_out.weight"]  # [out_ch, ch*ch_mult[0], 3, 3]
            z_conv = state_dict["encoder.conv_out.weight"]  # [2*z, ch*ch_mult[-1], 3, 3]
        except KeyError as missing:
            raise ValueError(f"not a FLUX autoencoder state dict: missing {missing.args[0]}") from None
        ch = conv_in.shape[0]
        levels = _count_indexes(state_dict, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
        ch_mult = tuple(state_dict[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
        num_res_blocks = _count_indexes(state_dict, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight")
        return cls(
            in_channels=conv_in.shape[1], out_ch=conv_out.shape[0], ch=ch, ch_mult=ch_mult,
            num_res_blocks=num_res_blocks, z_channels=z_conv.shape[0] // 2,
        )


def _count_indexes(state_dict: Mapping[str, Tensor], pattern: str) -> int:
    """How many consecutive indexes ``0..n-1`` the keys matching ``pattern`` (one group) cover."""
    found = {int(m.group(1)) for key in state_dict if (m := re.fullmatch(pattern, key))}
    if not found or found != set(range(len(found))):
        raise ValueError(f"not a FLUX autoencoder state dict: no consecutive keys match {pattern!r}")
    return len(found)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        h_ = self.norm(x)
        q, k, v = (conv(h_).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [b, 1, h*w, c]
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class ResnetBlock(nn.Module):
    """Two norm-swish-conv stages with a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    """Stride-2 conv after padding right and bottom only (odd sizes floor)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block.{j}`` and an optional ``downsample``/``upsample`` (names as in BFL)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name if resample is not None else None
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)


class _Mid(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image ``[B, 3, H, W]`` to posterior parameters ``[B, 2*z, H/8, W/8]`` (mean then log-variance)."""

    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for i, width in enumerate(widths):
            blocks = [ResnetBlock(block_in if j == 0 else width, width) for j in range(p.num_res_blocks)]
            block_in = width
            last = i == len(widths) - 1
            self.down.append(_Level(blocks, None if last else Downsample(width), "downsample"))
        self.mid = _Mid(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent ``[B, z, h, w]`` to image ``[B, 3, 8h, 8w]``; ``up.{i}`` is level i, run from the deepest up."""

    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _Mid(block_in)
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):
            blocks = [ResnetBlock(block_in if j == 0 else widths[i], widths[i]) for j in range(p.num_res_blocks + 1)]
            block_in = widths[i]
            levels.insert(0, _Level(blocks, Upsample(block_in) if i else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """FLUX VAE: ``encode`` to BAGEL's latent space and ``decode`` back to pixels in [-1, 1]."""

    def __init__(self, params: AutoEncoderParams | None = None) -> None:
        super().__init__()
        self.params = params or AutoEncoderParams()
        self.encoder = Encoder(self.params)
        self.decoder = Decoder(self.params)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], device: torch.device | str | None = None) -> AutoEncoder:
        """Build with sizes inferred from ``state_dict`` and load it strictly (names in errors)."""
        with torch.device("meta"):
            model = cls(AutoEncoderParams.from_state_dict(state_dict))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(f"autoencoder tensors: missing {missing[:8]}, unexpected {unexpected[:8]}")
        for name, tensor in expected.items():
            if tuple(state_dict[name].shape) != tuple(tensor.shape):
                raise ValueError(f"autoencoder tensor {name}: shape {tuple(state_dict[name].shape)}, "
                                 f"expected {tuple(tensor.shape)}")
        model.load_state_dict({k: v.to(device) if device is not None else v for k, v in state_dict.items()},
                              assign=True)
        return model

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels in [-1, 1] ``[B, 3, H, W]`` to a *sampled* latent ``[B, z, H//8, W//8]`` in model space."""
        mean, logvar = self.encoder(x.to(self._dtype)).chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise
        return self.params.scale_factor * (z - self.params.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Model-space latent ``[B, z, h, w]`` to pixels in about [-1, 1] ``[B, 3, 8h, 8w]``."""
        return self.decoder(z.to(self._dtype) / self.params.scale_factor + self.params.shift_factor)

    @property
    def _dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype


def to_uint8_image(decoded: Tensor) -> Tensor:
    """One decoded image ``[3, H, W]`` in [-1, 1] to ``[H, W, 3]`` uint8, truncating like the official code."""
    return ((decoded.float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255).to(torch.uint8)


def to_pil_image(decoded: Tensor) -> Image.Image:
    """One decoded image ``[3, H, W]`` in [-1, 1] to an RGB PIL image."""
    return Image.fromarray(to_uint8_image(decoded).cpu().numpy())
