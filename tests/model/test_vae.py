"""FLUX autoencoder: BFL key names, size inference, encode/decode shapes and scaling (MODEL.md 4, 11.3, 11.7)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from core.model.vae import AutoEncoder, AutoEncoderParams, to_pil_image, to_uint8_image


@pytest.fixture(scope="module")
def tiny() -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder(AutoEncoderParams.tiny()).eval()


def test_full_size_names_and_parameter_count_on_meta() -> None:
    with torch.device("meta"):
        sd = AutoEncoder().state_dict()
    assert sum(v.numel() for v in sd.values()) == 83_819_683  # about 83.8 M, as ae.safetensors holds
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.down.2.downsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert shapes["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert shapes["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)  # level 0 is full resolution
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in shapes and "decoder.up.0.upsample.conv.weight" not in shapes
    assert not any("quant_conv" in k or "resample" in k for k in shapes)
    for prefix in ("encoder.mid", "decoder.mid"):
        for name in ("block_1.conv1", "block_2.conv2", "attn_1.norm", "attn_1.k", "attn_1.v", "attn_1.proj_out"):
            assert f"{prefix}.{name}.weight" in shapes
    assert "encoder.norm_out.weight" in shapes and "decoder.norm_out.bias" in shapes


def test_params_inferred_from_shapes() -> None:
    with torch.device("meta"):
        full = AutoEncoder().state_dict()
    assert AutoEncoderParams.from_state_dict(full) == AutoEncoderParams()
    tiny_sd = AutoEncoder(AutoEncoderParams.tiny()).state_dict()
    assert AutoEncoderParams.from_state_dict(tiny_sd) == AutoEncoderParams.tiny()
    assert AutoEncoderParams().downsample == 8


def test_from_state_dict_round_trip_and_clear_errors(tiny: AutoEncoder) -> None:
    sd = tiny.state_dict()
    loaded = AutoEncoder.from_state_dict(sd)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="decoder.conv_in.bias"):
        AutoEncoder.from_state_dict({k: v for k, v in sd.items() if k != "decoder.conv_in.bias"})
    with pytest.raises(ValueError, match="extra.weight"):
        AutoEncoder.from_state_dict(sd | {"extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="decoder.conv_in.weight"):
        AutoEncoder.from_state_dict(sd | {"decoder.conv_in.weight": torch.zeros(32, 16, 1, 1)})
    with pytest.raises(ValueError, match="not a FLUX autoencoder"):
        AutoEncoder.from_state_dict({"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="GroupNorm"):
        AutoEncoderParams(ch=16)


@pytest.mark.parametrize(("size", "latent", "decoded"), [((64, 96), (8, 12), (64, 96)), ((84, 84), (10, 10), (80, 80))])
def test_encode_decode_shapes_odd_sizes_floor(tiny: AutoEncoder, size, latent, decoded) -> None:
    x = torch.rand(1, 3, *size) * 2 - 1
    with torch.no_grad():
        z = tiny.encode(x, generator=torch.Generator().manual_seed(0))
        assert z.shape == (1, 16, *latent)
        assert tiny.decode(z).shape == (1, 3, *decoded)


def test_encode_samples_the_posterior_then_scales(tiny: AutoEncoder) -> None:
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z1 = tiny.encode(x, generator=torch.Generator().manual_seed(1))
        z2 = tiny.encode(x, generator=torch.Generator().manual_seed(1))
        z3 = tiny.encode(x, generator=torch.Generator().manual_seed(2))
        mean, logvar = tiny.encoder(x).chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    torch.testing.assert_close(z1, 0.3611 * (mean + torch.exp(0.5 * logvar) * noise - 0.1159))


def test_decode_undoes_the_scaling(tiny: AutoEncoder) -> None:
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(tiny.decode(z), tiny.decoder(z / 0.3611 + 0.1159))


def test_uint8_conversion_truncates() -> None:
    decoded = torch.tensor([-1.0, 0.0, 0.999, 2.0]).view(1, 2, 2).expand(3, 2, 2)
    pixels = to_uint8_image(decoded)
    # (x*0.5+0.5)*255: 0, 127.5 -> 127 (truncated, not rounded), 254.87 -> 254, clamped 255
    assert pixels.shape == (2, 2, 3) and pixels.dtype == torch.uint8
    assert pixels[..., 0].flatten().tolist() == [0, 127, 254, 255]
    image = to_pil_image(decoded)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (2, 2)
