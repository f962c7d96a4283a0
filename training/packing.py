"""The training forward of BAGEL on packed sequences (MODEL.md 2.3, 5.2, 6): what inference never needs.

A step packs several samples into one sequence of text segments, ViT image blocks, clean VAE blocks and noised
VAE targets. Attention follows the official training rules: text is causal, image blocks are bidirectional inside,
every block sees everything before it in its own sample, and noised targets are invisible to every later token.

Notable:
- Attention does not care about token order, only about the mask and the RoPE ids, so the packed sequence is
  *permuted*: understanding-expert tokens (text, markers, ViT) first, generation-expert tokens (latents) after.
  Each expert's weights then apply to one contiguous slice: no scatter, no per-token routing.
- The layers' weights are MODEL-A's modules (``MoTDecoderLayer`` and its projections, norms and MLPs), called
  per slice here; the inference forward (``Qwen2MoTModel.forward``) only knows one generation block per call.
  :class:`PackedLayer` makes each decoder layer a module of its own so FSDP and activation checkpointing wrap it.
- Losses: cross-entropy on the tokens of loss segments (their ``<|im_end|>`` included, ``lm_head`` only on those
  rows) and flow-matching MSE of the velocity ``eps - x0`` on noised latents at ``t = shift(sigmoid(N(0,1)))``.
  Every row selection is an index tensor made while packing: the step has no host sync until its loss is read.
- Speed (bench/RESULTS.md): attention through training.attention (flex_attention on CUDA), LoRA products in the
  base's dtype, only the first ``recompute`` layers checkpointed, and optionally the model's fused element-wise
  kernels (``compile_kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from core.model.bagel import Bagel
from core.model.flow import noise_latents, sample_training_timesteps, velocity_target
from core.model.llm import GEN, MoTDecoderLayer, Rope
from core.model.tokenizer import BagelTokenizer
from core.model.transforms import VIT_TRANSFORM, flattened_position_ids, patchify
from training.attention import CAUSAL, FULL, NOISE, PackedAttention

__all__ = ["ImagePart", "Losses", "PackedBatch", "PackedLayer", "Packer", "Sample", "TextPart", "TrainingForward"]


@dataclass(frozen=True, slots=True)
class TextPart:
    """One ``<|im_start|> text <|im_end|>`` segment; ``loss`` trains its tokens."""

    text: str
    loss: bool = False


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image: through the ViT (``vit``), as clean VAE latents (``vae``), or as the noised generation target."""

    key: str
    vit: bool = False
    vae: bool = False
    target: bool = False


@dataclass(frozen=True, slots=True)
class Sample:
    """One training example in the model's segment format."""

    parts: tuple[TextPart | ImagePart, ...]
    group: str = "vlm"  # t2i | vlm: the mixture groups of MODEL.md 8.2


@dataclass
class PackedBatch:
    """Tensors of one step, in the permuted order (understanding tokens, then generation tokens)."""

    # T = text tokens, V = ViT patches, G = latent tokens, U = T + V understanding tokens, L = U + G
    text_ids: Tensor  # [T]
    text_slots: Tensor  # [T] rows of the understanding slice
    vit_patches: Tensor  # [V, 14*14*3]
    vit_cu_seqlens: Tensor  # [images + 1]
    vit_max_seqlen: int
    vit_positions: Tensor  # [V] 2D table ids
    vit_slots: Tensor  # [V]
    latents: Tensor  # [G, p*p*z] clean latents x0
    latent_t: Tensor  # [G] flow time of each latent token (0 for clean conditioning images)
    latent_noise: Tensor  # [G] noise eps (zeros for clean ones)
    latent_positions: Tensor  # [G]
    target_rows: Tensor  # [Gt] rows of the generation slice (noised tokens) that carry the MSE loss
    rope: Tensor  # [L]
    mask_tokens: Tensor  # [4, L] sample, block, kind, sequence index: the attention rules' inputs (training.attention)
    label_rows: Tensor  # [N] understanding rows whose next token is trained
    labels: Tensor  # [N]
    num_und: int
    tokens: int = field(default=0)

    def to(self, device: torch.device) -> PackedBatch:
        """The same batch on ``device``."""
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device, non_blocking=True))
        return self


class _Builder:
    """Accumulates per-token attributes in sequence order while samples are appended."""

    def __init__(self) -> None:
        self.expert: list[int] = []  # 0 und, 1 gen
        self.sample: list[int] = []
        self.block: list[int] = []
        self.kind: list[int] = []
        self.rope: list[int] = []
        self.text: list[tuple[int, int]] = []  # (sequence index, id)
        self.labels: list[tuple[int, int]] = []  # (sequence index of the predicting token, label)
        self.vit: list[tuple[int, Tensor, Tensor]] = []  # (first sequence index, patches, positions)
        self.lat: list[tuple[int, Tensor, Tensor, bool]] = []  # (first index, x0 tokens, positions, target)
        self.blocks = 0

    def add(self, expert: int, sample: int, kind: int, rope: int, count: int, *, new_block: bool = True) -> int:
        """Append ``count`` tokens; ``new_block=False`` continues the previous block."""
        start = len(self.expert)
        self.blocks += new_block
        self.expert += [expert] * count
        self.sample += [sample] * count
        self.block += [self.blocks] * count
        self.kind += [kind] * count
        self.rope += [rope] * count
        return start


class Packer:
    """Turns samples into a :class:`PackedBatch`; images come from ``images`` and latents from ``encode``."""

    def __init__(
        self,
        tokenizer: BagelTokenizer,
        images: dict[str, Image.Image],
        encode: callable,  # type: ignore[valid-type]  # key -> (latent tokens [G, p*p*z], grid_h, grid_w)
        *,
        vit_side: int,
        latent_side: int,
        patch_size: int = 14,
    ) -> None:
        self.tokenizer, self.images, self.encode = tokenizer, images, encode
        self.vit_side, self.latent_side, self.patch_size = vit_side, latent_side, patch_size
        self._vit_cache: dict[str, tuple[Tensor, Tensor]] = {}

    def vit_tokens(self, key: str) -> tuple[Tensor, Tensor]:
        """ViT patches and position ids of one image (cached: the transform is deterministic)."""
        if key not in self._vit_cache:
            pixels = VIT_TRANSFORM(self.images[key].convert("RGB"))
            grid_h, grid_w = pixels.shape[1] // self.patch_size, pixels.shape[2] // self.patch_size
            positions = flattened_position_ids(grid_h, grid_w, self.vit_side)
            self._vit_cache[key] = (patchify(pixels, self.patch_size), positions)
        return self._vit_cache[key]

    def count(self, sample: Sample) -> int:
        """Tokens ``sample`` takes in a packed sequence."""
        total = 0
        for part in sample.parts:
            if isinstance(part, TextPart):
                total += len(self.tokenizer.encode(part.text)) + 2
            else:
                if part.vit:
                    total += self.vit_tokens(part.key)[0].shape[0] + 2
                if part.vae or part.target:
                    total += self.encode(part.key)[0].shape[0] + 2
        return total

    def pack(self, samples: list[Sample], generator: torch.Generator, timestep_shift: float = 1.0) -> PackedBatch:
        """One packed sequence of ``samples``; noise and timesteps drawn from ``generator``."""
        b = _Builder()
        sp = self.tokenizer.special
        for s, sample in enumerate(samples):
            rope = 0
            for part in sample.parts:
                if isinstance(part, TextPart):
                    ids = self.tokenizer.segment(part.text)
                    start = b.add(0, s, CAUSAL, 0, len(ids))
                    for i, tok in enumerate(ids):
                        b.rope[start + i] = rope + i
                        b.text.append((start + i, tok))
                        if part.loss and i > 0:
                            b.labels.append((start + i - 1, tok))
                    rope += len(ids)
                    continue
                if part.vae or part.target:  # VAE block first, then the ViT block (MODEL.md 6)
                    tokens, grid_h, grid_w = self.encode(part.key)
                    positions = flattened_position_ids(grid_h, grid_w, self.latent_side)
                    kind = NOISE if part.target else FULL
                    b.text.append((b.add(0, s, kind, rope, 1), sp.vision_start))
                    start = b.add(1, s, kind, rope, tokens.shape[0], new_block=False)
                    b.lat.append((start, tokens, positions, part.target))
                    b.text.append((b.add(0, s, kind, rope, 1, new_block=False), sp.vision_end))
                    if not part.target:
                        rope += 1  # a generated image does not advance the rope id (MODEL.md 10.1)
                if part.vit:
                    patches, positions = self.vit_tokens(part.key)
                    start = b.add(0, s, FULL, rope, patches.shape[0] + 2)
                    b.text.append((start, sp.vision_start))
                    b.vit.append((start + 1, patches, positions))
                    b.text.append((start + patches.shape[0] + 1, sp.vision_end))
                    rope += 1
        return self._tensors(b, generator, timestep_shift)

    def _tensors(self, b: _Builder, generator: torch.Generator, timestep_shift: float) -> PackedBatch:
        expert = torch.tensor(b.expert)
        order = torch.cat([torch.nonzero(expert == 0).flatten(), torch.nonzero(expert == 1).flatten()])
        slot = torch.empty_like(order)
        slot[order] = torch.arange(order.numel())  # sequence index -> permuted row
        mask_tokens = torch.stack([torch.tensor(v)[order] for v in (b.sample, b.block, b.kind)] + [order])

        text_idx = torch.tensor([i for i, _ in b.text], dtype=torch.long)
        lat_x0 = [t for _, t, _, _ in b.lat]
        latents = torch.cat(lat_x0) if lat_x0 else torch.zeros(0, 1)
        t_rows, noise_rows, target_rows = [], [], []
        for _, x0, _, target in b.lat:
            n = x0.shape[0]
            t = sample_training_timesteps(1, timestep_shift, generator=generator)[0] if target else torch.tensor(0.0)
            t_rows.append(t.expand(n))
            noise_rows.append(torch.randn(x0.shape, generator=generator) if target else torch.zeros_like(x0))
            target_rows.append(torch.full((n,), target))
        vit_counts = [p.shape[0] for _, p, _ in b.vit]
        labels = sorted(b.labels)
        return PackedBatch(
            text_ids=torch.tensor([tok for _, tok in b.text], dtype=torch.long),
            text_slots=slot[text_idx] if b.text else torch.zeros(0, dtype=torch.long),
            vit_patches=torch.cat([p for _, p, _ in b.vit]) if b.vit else torch.zeros(0, 3 * self.patch_size**2),
            vit_cu_seqlens=torch.tensor([0, *torch.tensor(vit_counts).cumsum(0).tolist()], dtype=torch.int32),
            vit_max_seqlen=max(vit_counts, default=0),
            vit_positions=torch.cat([q for _, _, q in b.vit]) if b.vit else torch.zeros(0, dtype=torch.long),
            vit_slots=torch.cat([slot[s : s + p.shape[0]] for s, p, _ in b.vit]) if b.vit else torch.zeros(0, dtype=torch.long),
            latents=latents,
            latent_t=torch.cat(t_rows) if t_rows else torch.zeros(0),
            latent_noise=torch.cat(noise_rows) if noise_rows else torch.zeros_like(latents),
            latent_positions=torch.cat([q for _, _, q, _ in b.lat]) if b.lat else torch.zeros(0, dtype=torch.long),
            target_rows=torch.cat(target_rows).nonzero().flatten() if target_rows else torch.zeros(0, dtype=torch.long),
            rope=torch.tensor(b.rope)[order],
            mask_tokens=mask_tokens,
            label_rows=slot[torch.tensor([i for i, _ in labels], dtype=torch.long)] if labels else torch.zeros(0, dtype=torch.long),
            labels=torch.tensor([tok for _, tok in labels], dtype=torch.long),
            num_und=int((expert == 0).sum()),
            tokens=len(b.expert),
        )


def _attention(layer: MoTDecoderLayer, h_und: Tensor, h_gen: Tensor, rope: Rope, attend: PackedAttention) -> Tensor:
    """Shared attention over the permuted sequence with per-expert projections; returns ``[L, H*D]``."""
    attn = layer.self_attn
    H, Hk, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    n = h_und.shape[0]
    spans = {"": (h_und, rope.cos[:, :n], rope.sin[:, :n]), GEN: (h_gen, rope.cos[:, n:], rope.sin[:, n:])}

    def project(sfx: str) -> tuple[Tensor, Tensor]:
        h, cos, sin = spans[sfx]
        q_norm, k_norm = getattr(attn, f"q_norm{sfx}"), getattr(attn, f"k_norm{sfx}")
        qk = torch.cat([getattr(attn, f"q_proj{sfx}")(h).view(1, -1, H, D),
                        getattr(attn, f"k_proj{sfx}")(h).view(1, -1, Hk, D)], dim=2)
        # Q/K norm and RoPE in float32, as inference (fused when the model's kernels are compiled)
        qk = attn.norm_rope(qk, q_norm.weight, k_norm.weight, H, q_norm.eps, cos, sin)
        return qk, getattr(attn, f"v_proj{sfx}")(h).view(1, -1, Hk, D)

    (qku, vu), (qkg, vg) = project(""), project(GEN)
    q, k = torch.cat([qku, qkg], dim=1).transpose(1, 2).split([H, Hk], dim=1)  # [1, H, L, D], [1, Hk, L, D]
    v = torch.cat([vu, vg], dim=1).transpose(1, 2)
    return attend(q, k, v).transpose(1, 2).reshape(q.shape[2], H * D)


class PackedLayer(nn.Module):
    """One decoder layer run on a permuted packed sequence (a module, so FSDP and checkpointing can wrap it)."""

    def __init__(self, layer: MoTDecoderLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, num_und: int, rope: Rope, attend: PackedAttention) -> Tensor:
        # x: [L, C]; rows [:num_und] use the understanding expert, the rest the generation expert
        ly = self.layer
        xu, xg = x[:num_und], x[num_und:]
        a = _attention(ly, ly.input_layernorm(xu), ly.input_layernorm_moe_gen(xg), rope, attend)
        und_norm, gen_norm = ly.post_attention_layernorm, ly.post_attention_layernorm_moe_gen
        hu, nu = ly.add_norm(xu, ly.self_attn.o_proj(a[:num_und]), und_norm.weight, und_norm.eps)
        hg, ng = ly.add_norm(xg, ly.self_attn.o_proj_moe_gen(a[num_und:]), gen_norm.weight, gen_norm.eps)
        return torch.cat([hu + ly.mlp(nu), hg + ly.mlp_moe_gen(ng)])


@dataclass(frozen=True, slots=True)
class Losses:
    """One step's losses; ``total`` carries the gradient."""

    total: Tensor
    ce: Tensor
    mse: Tensor
    ce_tokens: int
    mse_tokens: int


class TrainingForward(nn.Module):
    """BAGEL's training forward: embeddings, packed decoder layers, CE and flow-matching losses.

    ``recompute``: how many decoder layers (the first ones) drop their activations and recompute them in the
    backward pass (None: all; 0: none); ``attention``: the backend of training.attention (``auto``: flex on CUDA);
    ``compile_kernels``: fuse the element-wise work with ``torch.compile`` (GPU).
    """

    def __init__(
        self, model: Bagel, *, recompute: int | None = None, attention: str = "auto", compile_kernels: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.layers = nn.ModuleList(PackedLayer(layer) for layer in model.language_model.model.layers)
        self.recompute = len(self.layers) if recompute is None else recompute
        self.attention = attention
        if compile_kernels:
            model.language_model.model.compile_kernels()

    def embed(self, batch: PackedBatch) -> Tensor:
        """Input embeddings ``[L, C]`` in the permuted order."""
        m = self.model
        hidden = m.cfg.llm.hidden_size
        und = torch.zeros(batch.num_und, hidden, device=batch.text_ids.device, dtype=m.dtype)
        und = und.index_copy(0, batch.text_slots, m.embed_text(batch.text_ids).to(m.dtype))
        if batch.vit_patches.shape[0]:
            vit = m.embed_vit(batch.vit_patches, batch.vit_cu_seqlens, batch.vit_positions, batch.vit_max_seqlen)
            und = und.index_copy(0, batch.vit_slots, vit.to(m.dtype))
        if not batch.latents.shape[0]:
            return und
        x_t = noise_latents(batch.latents, batch.latent_noise, batch.latent_t)
        gen = m.vae2llm(x_t.to(m.dtype)) + m.time_embedder(batch.latent_t) + m.latent_pos_embed(
            batch.latent_positions
        )
        return torch.cat([und, gen.to(m.dtype)])

    def forward(self, batch: PackedBatch, ce_weight: float = 0.25, mse_weight: float = 1.0) -> Losses:
        x = self.embed(batch)
        rope = Rope(batch.rope[None], self.model.cfg.llm.head_dim, self.model.cfg.llm.rope_theta)
        attend = PackedAttention(batch.mask_tokens, self.attention)  # one mask for every layer
        for i, layer in enumerate(self.layers):
            if self.training and i < self.recompute:
                x = checkpoint(layer, x, batch.num_und, rope, attend, use_reentrant=False)
            else:
                x = layer(x, batch.num_und, rope, attend)
        zero = x.sum() * 0.0  # keeps the graph (and FSDP's hooks) whole when a loss has no tokens
        ce = zero
        if batch.labels.numel():
            logits = self.model.language_model.logits(x[batch.label_rows])
            ce = F.cross_entropy(logits, batch.labels)
        mse = zero
        rows = batch.target_rows
        if rows.numel():
            v = self.model.velocity(x[batch.num_und :][rows])
            mse = F.mse_loss(v, velocity_target(batch.latents[rows], batch.latent_noise[rows]).float())
        return Losses(
            total=ce_weight * ce + mse_weight * mse,
            ce=ce.detach(),
            mse=mse.detach(),
            ce_tokens=int(batch.labels.numel()),
            mse_tokens=int(rows.numel()),
        )
