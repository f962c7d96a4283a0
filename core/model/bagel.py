"""The BAGEL network: the MoT decoder, the SigLIP tower and the small heads that join them (MODEL.md 2.1).

Attribute names are the checkpoint's (``language_model``, ``vit_model``, ``connector``, ``vit_pos_embed``,
``time_embedder``, ``vae2llm``, ``llm2vae``, ``latent_pos_embed``), so ``state_dict()`` equals the official
tensor list exactly. The module holds weights only; requests, caches and sampling live in the runtime.
The VAE is not a submodule, as in the official code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.model.config import BagelConfig
from core.model.embeddings import MLPconnector, PositionEmbedding, TimestepEmbedder
from core.model.llm import Qwen2MoTForCausalLM, RMSNorm
from core.model.vit import SiglipVisionModel

__all__ = ["Bagel", "init_random_"]


class Bagel(nn.Module):
    """Weights of BAGEL-7B-MoT and the embedding/head functions around the decoder."""

    def __init__(self, cfg: BagelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = cfg.llm.hidden_size
        self.language_model = Qwen2MoTForCausalLM(cfg.llm)
        self.vit_model = SiglipVisionModel(cfg.vit)
        self.connector = MLPconnector(cfg.vit.hidden_size, hidden)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, hidden)
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, hidden)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    def embed_text(self, ids: Tensor) -> Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_vit(self, patches: Tensor, cu_seqlens: Tensor, position_ids: Tensor, max_seqlen: int) -> Tensor:
        """Packed ViT patches ``[N, p*p*3]`` to LLM inputs ``[N, C]``: SigLIP, connector, 2D sin-cos positions."""
        features = self.vit_model(patches, cu_seqlens, position_ids, max_seqlen)
        return self.connector(features.to(self.dtype)) + self.vit_pos_embed(position_ids.to(patches.device))

    def embed_latents(self, tokens: Tensor, t: Tensor, position_ids: Tensor) -> Tensor:
        """Latent patches ``[B, N, p*p*z]`` at flow times ``t`` ``[B]`` to LLM inputs ``[B, N, C]``."""
        time = self.time_embedder(t)[:, None, :]  # [B, 1, C]
        return self.vae2llm(tokens.to(self.dtype)) + time + self.latent_pos_embed(position_ids)[None]

    def velocity(self, hidden: Tensor) -> Tensor:
        """Latent hidden states (before the final norm) to the predicted velocity, float32."""
        return self.llm2vae(self.language_model.model.norm_moe_gen(hidden)).float()


@torch.no_grad()
def init_random_(model: Bagel, seed: int = 0, std: float = 0.02) -> Bagel:
    """Fill every weight in place with a seeded random init (tiny model files, benchmarks); tables get sin-cos."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std, generator=gen)
            if getattr(module, "bias", None) is not None:
                module.bias.normal_(0.0, std, generator=gen)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, PositionEmbedding):
            module.reset_parameters()
    return model
