"""Resizing rules, normalisation, patchify layouts and position ids (MODEL.md 3, 5.1, 10.4, 11.5)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from core.model.transforms import (
    LATENT_MAX_PATCHES_PER_SIDE,
    VAE_TRANSFORM,
    VIT_MAX_PATCHES_PER_SIDE,
    VIT_TRANSFORM,
    ImageTransform,
    flattened_position_ids,
    patchify,
    to_normalised_tensor,
    to_rgb,
    unpatchify,
)


@pytest.mark.parametrize(
    ("size", "vit", "vae"),
    [
        ((980, 980), (980, 980), (976, 976)),  # 980/16 = 61.25 -> 61*16
        ((2000, 1000), (980, 490), (1024, 512)),  # long side capped
        ((100, 50), (448, 224), (1024, 512)),  # short side raised to the minimum
        ((4000, 300), (980, 70), (1024, 80)),  # the long-side cap wins over the short-side minimum
        ((1024, 1024), (980, 980), (1024, 1024)),
        ((511, 300), (504, 294), (864, 512)),  # 36.5 and 54.5 strides round half to even
    ],
)
def test_target_sizes(size, vit, vae) -> None:
    assert VIT_TRANSFORM.target_size(*size) == vit
    assert VAE_TRANSFORM.target_size(*size) == vae


def test_sides_are_multiples_and_bounded() -> None:
    for w in range(20, 3000, 97):
        for h in (15, 224, 777, 2999):
            vw, vh = VIT_TRANSFORM.target_size(w, h)
            assert vw % 14 == 0 and vh % 14 == 0 and max(vw, vh) <= 980
            aw, ah = VAE_TRANSFORM.target_size(w, h)
            assert aw % 16 == 0 and ah % 16 == 0 and max(aw, ah) <= 1024


def test_pixel_budget() -> None:
    small_budget = ImageTransform(980, 224, 14, max_pixels=300 * 300)
    w, h = small_budget.target_size(980, 980)
    assert w == h and w % 14 == 0 and w < 980
    assert VIT_TRANSFORM.target_size(980, 980, img_num=4)[0] < 980


def test_rejects_empty_sizes() -> None:
    with pytest.raises(ValueError):
        VIT_TRANSFORM.target_size(0, 10)


def test_call_resizes_and_normalises() -> None:
    image = Image.new("RGB", (300, 200), (255, 0, 128))
    x = VIT_TRANSFORM(image)
    assert x.shape == (3, 224, 336) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 100, 100], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))


def test_normalised_tensor_values() -> None:
    image = Image.new("RGB", (2, 1))
    image.putpixel((1, 0), (0, 51, 255))
    x = to_normalised_tensor(image)
    assert x.shape == (3, 1, 2)
    torch.testing.assert_close(x[:, 0, 1], torch.tensor([-1.0, 51 / 255 * 2 - 1, 1.0]))


def test_to_rgb_composites_alpha_on_white() -> None:
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (10, 20, 30) and rgb.getpixel((1, 1)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_vit_patchify_order_is_ph_pw_c() -> None:
    image = torch.arange(3 * 28 * 42, dtype=torch.float32).reshape(3, 28, 42)
    tokens = patchify(image, 14)
    assert tokens.shape == (2 * 3, 588)
    # token 4 is row 1, column 1; value index (ph*14 + pw)*3 + c
    ph, pw, c = 5, 9, 2
    assert tokens[4, (ph * 14 + pw) * 3 + c] == image[c, 14 + ph, 14 + pw]


def test_latent_patchify_round_trip_and_layout() -> None:
    latent = torch.randn(16, 6, 10)
    tokens = patchify(latent, 2)
    assert tokens.shape == (15, 64)
    assert tokens[1 * 5 + 3, (1 * 2 + 0) * 16 + 7] == latent[7, 1 * 2 + 1, 3 * 2 + 0]  # c(h p)(w q) -> (h w)(p q c)
    assert torch.equal(unpatchify(tokens, 3, 5, 2), latent)
    with pytest.raises(ValueError):
        unpatchify(tokens, 4, 5, 2)
    with pytest.raises(ValueError):
        patchify(torch.randn(16, 5, 10), 2)


def test_position_ids() -> None:
    assert flattened_position_ids(2, 3, VIT_MAX_PATCHES_PER_SIDE).tolist() == [0, 1, 2, 70, 71, 72]
    ids = flattened_position_ids(64, 64, LATENT_MAX_PATCHES_PER_SIDE)
    assert ids.shape == (4096,) and ids[-1] == 4095 and ids[65] == 65
    assert flattened_position_ids(3, 2, 64).tolist() == [0, 1, 64, 65, 128, 129]
    with pytest.raises(ValueError):
        flattened_position_ids(71, 1, VIT_MAX_PATCHES_PER_SIDE)
