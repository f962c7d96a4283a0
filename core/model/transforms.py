"""Image preprocessing and token layouts shared by the ViT and VAE paths (MODEL.md 3, 5.1, 11.5).

- Resizing follows the official ``MaxLongEdgeMinShortEdgeResize``: long side <= max, short side >= min, both sides
  multiples of the stride (Python's ``round``, i.e. half to even, as there), a pixel budget, PIL bicubic.
- ``VIT_TRANSFORM`` (980/224/14) feeds SigLIP; ``VAE_TRANSFORM`` (1024/512/16) feeds the autoencoder and, in the
  official inferencer, is applied to every input image first, understanding included.
- Tokens: ``patchify`` turns ``[C, H, W]`` into row-major tokens of ``(p q c)`` values; the same layout serves
  ViT patches (p = 14) and latent patches (p = 2). Positions are ``row * max_per_side + col`` (70 for the ViT,
  64 for latents), counted from the top-left whatever the image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "ImageTransform",
    "VIT_TRANSFORM",
    "VAE_TRANSFORM",
    "VIT_MAX_PATCHES_PER_SIDE",
    "LATENT_MAX_PATCHES_PER_SIDE",
    "to_rgb",
    "to_normalised_tensor",
    "patchify",
    "unpatchify",
    "flattened_position_ids",
]

VIT_MAX_PATCHES_PER_SIDE = 70  # 980 / 14
LATENT_MAX_PATCHES_PER_SIDE = 64  # max_latent_size: 1024 / 16
DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024


@dataclass(frozen=True)
class ImageTransform:
    """Resize into the model's size bounds and normalise to [-1, 1]."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def target_size(self, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
        """The ``(width, height)`` an image of this size is resized to."""
        if width < 1 or height < 1:
            raise ValueError(f"image must have a positive size, got {width}x{height}")
        scale = max(min(self.max_size / max(width, height), 1.0), self.min_size / min(width, height))
        new_w, new_h = self._scaled(width, height, scale)
        budget = self.max_pixels / img_num
        if new_w * new_h > budget:
            new_w, new_h = self._scaled(new_w, new_h, budget / (new_w * new_h))
        if max(new_w, new_h) > self.max_size:
            new_w, new_h = self._scaled(new_w, new_h, self.max_size / max(new_w, new_h))
        return new_w, new_h

    def _scaled(self, width: int, height: int, scale: float) -> tuple[int, int]:
        return self._multiple(round(width * scale)), self._multiple(round(height * scale))

    def _multiple(self, value: float) -> int:
        return max(self.stride, int(round(value / self.stride) * self.stride))

    def resize(self, image: Image.Image, img_num: int = 1) -> Image.Image:
        """Bicubic resize (PIL's, which antialiases) to :meth:`target_size`."""
        size = self.target_size(*image.size, img_num=img_num)
        return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)

    def __call__(self, image: Image.Image, img_num: int = 1) -> Tensor:
        """An RGB PIL image to a float32 ``[3, H, W]`` tensor in [-1, 1] at the model's size."""
        return to_normalised_tensor(self.resize(image, img_num=img_num))


VIT_TRANSFORM = ImageTransform(max_size=980, min_size=224, stride=14)
VAE_TRANSFORM = ImageTransform(max_size=1024, min_size=512, stride=16)


def to_rgb(image: Image.Image) -> Image.Image:
    """Drop alpha by compositing onto white (as the official ``pil_img2rgb``), else convert to RGB."""
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")


def to_normalised_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image to ``[3, H, W]`` float32 with ``(x/255 - 0.5) / 0.5``."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def patchify(image: Tensor, patch_size: int) -> Tensor:
    """``[C, H, W]`` to ``[(H/p)(W/p), p*p*C]``: tokens row-major, values ``(p q c)`` inside a token."""
    c, h, w = image.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {p}")
    return torch.einsum("chpwq->hwpqc", image.reshape(c, h // p, p, w // p, p)).reshape(-1, p * p * c)


def unpatchify(tokens: Tensor, grid_h: int, grid_w: int, patch_size: int) -> Tensor:
    """Inverse of :func:`patchify`: ``[grid_h*grid_w, p*p*C]`` to ``[C, grid_h*p, grid_w*p]``."""
    p = patch_size
    c = tokens.shape[-1] // (p * p)
    if tokens.shape != (grid_h * grid_w, p * p * c):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not form a {grid_h}x{grid_w} grid of {p}x{p} patches")
    return torch.einsum("hwpqc->chpwq", tokens.reshape(grid_h, grid_w, p, p, c)).reshape(c, grid_h * p, grid_w * p)


def flattened_position_ids(grid_h: int, grid_w: int, max_per_side: int) -> Tensor:
    """Position of each token of a ``grid_h x grid_w`` grid in a ``max_per_side`` square table."""
    if not (0 < grid_h <= max_per_side and 0 < grid_w <= max_per_side):
        raise ValueError(f"a {grid_h}x{grid_w} grid does not fit the {max_per_side}x{max_per_side} position table")
    return (torch.arange(grid_h)[:, None] * max_per_side + torch.arange(grid_w)).flatten()
