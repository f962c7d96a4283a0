"""SigLIP NaViT: the understanding-path vision encoder (MODEL.md 3), with the official tensor names.

Notable:
- Images of different sizes are packed into one sequence of 14x14 patches; ``cu_seqlens`` marks where each image
  starts, and attention is bidirectional inside an image and never across images.
- The patch embedding is a Linear over ``(ph, pw, c)``-ordered patch values (the official checkpoint stores the
  converted conv weight, ``[1152, 588]``); positions come from the learned 4900-row table, indexed ``row*70 + col``.
- The released checkpoint keeps 26 of SigLIP's 27 layers (the penultimate-layer feature); ``post_layernorm`` is
  applied to the last kept layer. The config says how many layers exist; fix-ups live in the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from core.model.attention import attend

try:  # packed images in one kernel call on GPU; absent on CPU-only installs
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

__all__ = [
    "SiglipVisionConfig", "SiglipVisionModel", "ImageSegments", "per_image_attention", "conv_to_linear_patch_weight",
]


@dataclass(frozen=True)
class SiglipVisionConfig:
    """SigLIP so400m/14 at 980 px, cut to the 26 layers BAGEL uses."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 26
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 980
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"unsupported ViT activation {self.hidden_act!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SiglipVisionConfig:
        """Build from a ``vit_config.json``-style dict, ignoring keys this model has no use for (``rope``, ...)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2


def conv_to_linear_patch_weight(weight: Tensor) -> Tensor:
    """Turn a Conv2d patch weight ``[out, c, p, p]`` into the Linear layout ``[out, p*p*c]`` (columns ph, pw, c)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


@dataclass(frozen=True)
class ImageSegments:
    """Where each image lies in the packed sequence, in the forms the two attention paths need."""

    cu_seqlens: Tensor  # [images + 1] int32, on the patches' device
    max_seqlen: int
    bounds: list[int] | None  # host copy of cu_seqlens, for the SDPA path; None on the flash-attn path

    @classmethod
    def build(cls, cu_seqlens: Tensor, num_patches: int, device: torch.device, max_seqlen: int | None) -> ImageSegments:
        """Validate and prepare once per forward; reads ``cu_seqlens`` on the host unless flash-attn runs."""
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        if _use_flash(device) and max_seqlen is not None:
            return cls(cu, max_seqlen, None)
        bounds = cu_seqlens.tolist()  # one host read per forward
        if bounds[0] != 0 or bounds[-1] != num_patches or any(x >= y for x, y in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens {bounds} do not split {num_patches} patches into images")
        longest = max(y - x for x, y in zip(bounds, bounds[1:]))
        return cls(cu, longest, None if _use_flash(device) else bounds)


def _use_flash(device: torch.device) -> bool:
    return flash_attn_varlen_func is not None and device.type == "cuda"


def per_image_attention(q: Tensor, k: Tensor, v: Tensor, segments: ImageSegments) -> Tensor:
    """Non-causal attention within each image of packed ``[N, heads, head_dim]`` tensors."""
    if segments.bounds is None and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=segments.cu_seqlens, cu_seqlens_k=segments.cu_seqlens,
            max_seqlen_q=segments.max_seqlen, max_seqlen_k=segments.max_seqlen, causal=False,
        )
    bounds = segments.bounds if segments.bounds is not None else segments.cu_seqlens.tolist()
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        seg = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # [1, heads, L, head_dim]
        out[start:end] = attend(*seg, causal=False)[0].transpose(0, 1)
    return out


class SiglipVisionEmbeddings(nn.Module):
    """Patch values to vectors, plus the learned absolute position of each patch."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(config.patch_dim, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches_per_side**2, config.hidden_size)

    def forward(self, packed_patches: Tensor, position_ids: Tensor) -> Tensor:
        return self.patch_embedding(packed_patches) + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    """Multi-head self-attention over packed images."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor, segments: ImageSegments) -> Tensor:
        n = x.shape[0]  # x: [N, hidden]
        q, k, v = (proj(x).view(n, self.num_heads, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(per_image_attention(q, k, v, segments).reshape(n, -1))


class SiglipMLP(nn.Module):
    """fc1, GELU (tanh approximation unless the config says exact), fc2."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SiglipEncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: Tensor, segments: ImageSegments) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), segments)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    """The stack of encoder layers."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor, segments: ImageSegments) -> Tensor:
        for layer in self.layers:
            x = layer(x, segments)
        return x


class SiglipVisionTransformer(nn.Module):
    """Embeddings, encoder, final LayerNorm (no pooling head)."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, packed_patches: Tensor, segments: ImageSegments, position_ids: Tensor) -> Tensor:
        x = self.embeddings(packed_patches, position_ids)
        return self.post_layernorm(self.encoder(x, segments))


class SiglipVisionModel(nn.Module):
    """The vision tower as the checkpoint names it: everything under ``vision_model``."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionTransformer(config)

    def forward(
        self, packed_patches: Tensor, cu_seqlens: Tensor, position_ids: Tensor, max_seqlen: int | None = None
    ) -> Tensor:
        """Encode packed patches ``[N, patch_dim]`` of images split by ``cu_seqlens`` into ``[N, hidden]``.

        ``max_seqlen`` (the most patches in one image) lets the flash-attn path skip a host read.
        """
        if packed_patches.ndim != 2 or packed_patches.shape[-1] != self.config.patch_dim:
            raise ValueError(f"expected patches [N, {self.config.patch_dim}], got {tuple(packed_patches.shape)}")
        segments = ImageSegments.build(cu_seqlens, packed_patches.shape[0], packed_patches.device, max_seqlen)
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        return self.vision_model(packed_patches.to(dtype), segments, position_ids.to(packed_patches.device))
