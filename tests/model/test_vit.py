"""SigLIP NaViT: official tensor names and shapes, packed per-image attention, patch layout (MODEL.md 2.2, 3)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from core.model.transforms import flattened_position_ids, patchify
from core.model.vit import SiglipVisionConfig, SiglipVisionModel, conv_to_linear_patch_weight

TINY = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2)


def _expected_full_size_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {
        "vision_model.embeddings.patch_embedding.weight": (1152, 588),
        "vision_model.embeddings.patch_embedding.bias": (1152,),
        "vision_model.embeddings.position_embedding.weight": (4900, 1152),
        "vision_model.post_layernorm.weight": (1152,),
        "vision_model.post_layernorm.bias": (1152,),
    }
    for j in range(26):
        pre = f"vision_model.encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{pre}self_attn.{proj}.weight"] = (1152, 1152)
            shapes[f"{pre}self_attn.{proj}.bias"] = (1152,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{pre}{norm}.weight"] = shapes[f"{pre}{norm}.bias"] = (1152,)
        shapes |= {f"{pre}mlp.fc1.weight": (4304, 1152), f"{pre}mlp.fc1.bias": (4304,),
                   f"{pre}mlp.fc2.weight": (1152, 4304), f"{pre}mlp.fc2.bias": (1152,)}
    return shapes


def test_full_size_names_and_shapes_on_meta() -> None:
    with torch.device("meta"):
        model = SiglipVisionModel(SiglipVisionConfig())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _expected_full_size_shapes()
    assert SiglipVisionConfig().head_dim == 72


def test_config_from_vit_config_json_ignores_unknown_keys() -> None:
    cfg = SiglipVisionConfig.from_dict({"hidden_size": 1152, "num_hidden_layers": 26, "rope": False,
                                        "model_type": "siglip_vision_model"})
    assert cfg == SiglipVisionConfig()
    with pytest.raises(ValueError):
        SiglipVisionConfig(hidden_size=100, num_attention_heads=16)


def _reference_forward(model: SiglipVisionModel, patches: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One image, written out with plain torch ops (multi-head attention over the whole image)."""
    vm = model.vision_model
    x = vm.embeddings.patch_embedding(patches) + vm.embeddings.position_embedding(pos)
    for layer in vm.encoder.layers:
        h = layer.layer_norm1(x)
        att = layer.self_attn
        q, k, v = (p(h).view(len(h), 4, 8).transpose(0, 1) for p in (att.q_proj, att.k_proj, att.v_proj))
        w = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
        x = x + att.out_proj((w @ v).transpose(0, 1).reshape(len(h), -1))
        x = x + layer.mlp.fc2(F.gelu(layer.mlp.fc1(layer.layer_norm2(x)), approximate="tanh"))
    return vm.post_layernorm(x)


def test_packed_images_attend_only_to_themselves() -> None:
    torch.manual_seed(0)
    model = SiglipVisionModel(TINY).eval()
    images = [torch.randn(3, 28, 42), torch.randn(3, 14, 14), torch.randn(3, 42, 28)]
    patches = [patchify(im, 14) for im in images]
    pos = [flattened_position_ids(im.shape[1] // 14, im.shape[2] // 14, 70) for im in images]
    lens = torch.tensor([len(p) for p in patches])
    cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(patches), cu, torch.cat(pos))
        assert packed.shape == (int(lens.sum()), 32)
        for i, (p, q) in enumerate(zip(patches, pos)):
            alone = model(p, torch.tensor([0, len(p)]), q)
            torch.testing.assert_close(packed[cu[i]:cu[i + 1]], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(alone, _reference_forward(model, p, q), atol=1e-5, rtol=1e-5)


def test_linear_patch_embedding_equals_the_conv_it_replaces() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=14, stride=14)
    image = torch.randn(3, 28, 42)
    expected = conv(image[None])[0].flatten(1).T  # [tokens row-major, 8]
    linear = patchify(image, 14) @ conv_to_linear_patch_weight(conv.weight).T + conv.bias
    torch.testing.assert_close(linear, expected, atol=1e-5, rtol=1e-5)


def test_rejects_bad_inputs() -> None:
    model = SiglipVisionModel(TINY)
    with pytest.raises(ValueError, match="patches"):
        model(torch.randn(4, 100), torch.tensor([0, 4]), torch.arange(4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.randn(4, 588), torch.tensor([0, 3]), torch.arange(4))
