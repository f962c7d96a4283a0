"""The Qwen2 Mixture-of-Transformers decoder of BAGEL (MODEL.md 2.3, 10.2).

Notable:
- Every token-wise weight exists twice: the understanding expert (``q_proj``, ``mlp``, ``norm``, ...) and the
  generation expert (``*_moe_gen``). Attention itself is shared: one softmax over the whole sequence.
- A forward is either *und-only* (text, ViT blocks, decoding) or *mixed*: a generation block whose two markers
  (``<|vision_start|>``, ``<|vision_end|>``) take the understanding weights and whose latents take the generation
  weights. The experts' tokens travel as separate contiguous streams and meet only inside attention, so there
  is no scatter and no per-layer split or merge.
- RMSNorm and RoPE run in float32 and cast back afterwards, the official order (MODEL.md 2.3, 11.4); on a bf16
  GPU model this matches the official code within bf16 tolerance, on an fp32 CPU model it is exact.
- Position ids are given per token: text tokens count up, every token of an image block shares one id.
- :meth:`Qwen2MoTModel.fuse_projections` (the runtime's default) runs each expert's Q/K/V, and each MLP's gate/up,
  as one matrix product over one storage whose slices ARE the checkpoint's Parameters (core.model.projection);
  Q and K come out already packed for the fused norm + RoPE. Active LoRA updates are added on top.
- Element-wise traffic is kept to one pass where it can be (a 1024x1024 image is ~90 passes of 4,096 tokens): the
  experts' Q/K norm + RoPE kernels write straight into the joined sequence, attention reads the queries and writes
  its output in the projections' token-major layout (core.model.attention), and each layer adds the previous
  layer's MLP output inside its input norm.
- :meth:`Qwen2MoTModel.generation_expert_to_fp8` runs the generation expert's products in FP8 (image denoising).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.model.attention import attend, compiled_attend
from core.model.config import LLMConfig
from core.model.kv_cache import CacheSpan, KVCache
from core.model.projection import (
    Projection,
    fast_fp8_kernels,
    run_projection,
    silu_mul_rows,
)

__all__ = [
    "MoTAttention",
    "MoTDecoderLayer",
    "Qwen2MLP",
    "Qwen2MoTForCausalLM",
    "Qwen2MoTModel",
    "RMSNorm",
    "Rope",
    "norm_rope",
]

GEN = "_moe_gen"  # name suffix of the generation expert's weights
EXPERTS = ("", GEN)  # weight-name suffix of each expert, in the order of a forward's token parts


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale (the HF order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: Tensor, a: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual sum and its RMSNorm, one kernel when compiled (the attention residual + the MLP's pre-norm)."""
    h = x + a
    return h, rms_norm(h, weight, eps)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


class Qwen2MLP(nn.Module):
    """SiLU-gated MLP without biases."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = silu_mul  # Qwen2MoTModel.compile_kernels() swaps in fused versions of both
        self.act_fp8 = silu_mul_rows
        self.projections: dict[str, Projection] = {}  # "gate_up" and "down", set by fuse_projections()

    def forward(self, x: Tensor) -> Tensor:
        pair = [self.gate_proj, self.up_proj]
        gate_up, down = self.projections.get("gate_up"), self.projections.get("down")
        if gate_up is not None and gate_up.usable(pair):
            gate, up = gate_up(x, pair).chunk(2, dim=-1)
        else:  # training: the plain modules (no concatenation of their outputs)
            gate, up = self.gate_proj(x), self.up_proj(x)
        if down is not None and down.takes_fp8([self.down_proj]):
            return down.fp8_product(*self.act_fp8(gate, up), gate.shape[:-1], gate.dtype)
        return run_projection(down, [self.down_proj], self.act(gate, up))


class Rope:
    """Rotary cos/sin for given position ids, computed on the fly in float32 (no buffers to load)."""

    def __init__(self, positions: Tensor, head_dim: int, theta: float) -> None:
        # positions: [B, L] (L may be 1 when a whole block shares one id)
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
        freqs = positions.float()[..., None] * inv_freq  # [B, L, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [B, L, 1, D]
        self.cos, self.sin = emb.cos(), emb.sin()


def norm_rope(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor) -> Tensor:
    """Q/K RMSNorm over the head dim, then rotate-half RoPE, in float32 (MODEL.md 2.3); cast back to ``x``'s dtype.

    The rotated half ``[-h2, h1]`` of the normed ``h`` is taken from ``x`` with its halves swapped (the sign goes into
    ``sin``): the same products, but compiled it is one kernel that reads ``x`` twice instead of two that store the
    normed ``h`` in float32 and read it back (on an H100, 2.7x less time for an image's 2 x 4,096 latent tokens).
    """
    h = x.float()
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float()
    s1, s2 = sin.chunk(2, dim=-1)
    rotated = (_swap_halves(x).float() * r) * _swap_halves(w)
    return ((h * r) * w * cos + rotated * torch.cat([-s1, s2], dim=-1)).to(x.dtype)


def _swap_halves(x: Tensor) -> Tensor:
    """``[x1, x2]`` -> ``[x2, x1]`` over the last dim (an index map: compiled, it is a shifted load)."""
    return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


def qk_norm_rope(
    qk: Tensor, q_weight: Tensor, k_weight: Tensor, q_heads: int, eps: float, cos: Tensor, sin: Tensor
) -> Tensor:
    """:func:`norm_rope` of Q and K packed as ``[B, L, H + Hk, D]``, each head row with its own norm's weight."""
    weight = torch.cat([q_weight.expand(q_heads, -1), k_weight.expand(qk.shape[2] - q_heads, -1)])
    return norm_rope(qk, weight, eps, cos, sin)


def joint_qkv_norm_rope(
    qkv: list[Tensor], weights: list[tuple[Tensor, Tensor]], q_heads: int, eps: float, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """Each expert's part of packed Q/K/V ``[B, Li, H + 2Hk, D]`` joined along the tokens: Q and K after
    :func:`qk_norm_rope` with that expert's ``(q, k)`` norm weights ``[B, L, H + Hk, D]``, and V ``[B, L, Hk, D]``.
    Compiled, each part's kernels write their slices of the two outputs: no concatenation copies."""
    kv = (qkv[0].shape[2] - q_heads) // 2
    qk = [qk_norm_rope(x[:, :, : q_heads + kv], qw, kw, q_heads, eps, cos, sin) for x, (qw, kw) in zip(qkv, weights)]
    v = [x[:, :, q_heads + kv :] for x in qkv]
    if len(qkv) == 1:
        return qk[0], v[0]
    return torch.cat(qk, dim=1), torch.cat(v, dim=1)


def _split(x: Tensor) -> list[Tensor]:
    """Mixed layout ``[marker, latents, marker]`` -> [the two markers, the latents] (each contiguous)."""
    return [torch.cat([x[:, :1], x[:, -1:]], dim=1), x[:, 1:-1].contiguous()]


def _merge(und: Tensor, gen: Tensor) -> Tensor:
    return torch.cat([und[:, :1], gen, und[:, 1:]], dim=1)


class MoTAttention(nn.Module):
    """Shared attention with per-expert Q/K/V/O projections and Q/K norms."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for sfx in EXPERTS:
            setattr(self, f"q_proj{sfx}", nn.Linear(cfg.hidden_size, q_dim, bias=True))
            setattr(self, f"k_proj{sfx}", nn.Linear(cfg.hidden_size, kv_dim, bias=True))
            setattr(self, f"v_proj{sfx}", nn.Linear(cfg.hidden_size, kv_dim, bias=True))
            setattr(self, f"o_proj{sfx}", nn.Linear(q_dim, cfg.hidden_size, bias=False))
            setattr(self, f"q_norm{sfx}", RMSNorm(self.head_dim, cfg.rms_norm_eps))
            setattr(self, f"k_norm{sfx}", RMSNorm(self.head_dim, cfg.rms_norm_eps))
        # Qwen2MoTModel.compile_kernels() swaps in fused versions (norm_rope: training's packed forward)
        self.norm_rope, self.joint_norm_rope, self.attend = qk_norm_rope, joint_qkv_norm_rope, attend
        self.projections: dict[str, Projection] = {}  # "qkv"/"o" + expert suffix, set by fuse_projections()

    def forward(
        self, parts: list[Tensor], rope: Rope, cache: KVCache | None, layer: int, span: CacheSpan | None,
        causal: bool,
    ) -> list[Tensor]:
        """Each part's attention output after its own ``o_proj``; ``parts`` are normed hidden states per expert."""
        # parts: [und [B, Lu, C], gen [B, Lg, C]?]; one sequence [und tokens, gen tokens] for the shared softmax
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        experts = EXPERTS[: len(parts)]
        qkv = [
            run_projection(self.projections.get("qkv" + sfx), [getattr(self, f"{n}_proj{sfx}") for n in "qkv"], h)
            .view(*h.shape[:2], H + 2 * Hk, D)
            for h, sfx in zip(parts, experts)
        ]
        norms = [(getattr(self, f"q_norm{sfx}"), getattr(self, f"k_norm{sfx}")) for sfx in experts]
        # Q and K (already side by side) normed and rotated, [B, L, H + Hk, D]; V [B, L, Hk, D]; the parts joined
        qk, v = self.joint_norm_rope(qkv, [(qn.weight, kn.weight) for qn, kn in norms], H, norms[0][0].eps,
                                     rope.cos, rope.sin)
        q, k = qk.transpose(1, 2).split([H, Hk], dim=1)  # [B, heads, L, D] views
        v = v.transpose(1, 2)
        if cache is None:
            rows = [self.attend(q, k, v, causal=causal)]
        else:
            k, v = cache.update(layer, span, k, v)
            if span.row_starts is None:
                rows = [self.attend(q, k, v, causal=causal, key_mask=span.key_mask)]
            else:  # left-padded rows: each attends to its own slice (no mask, so the fused kernels apply)
                own = [slice(s - span.start, None) for s in span.row_starts]
                rows = [
                    self.attend(q[b : b + 1], k[b : b + 1, :, keys], v[b : b + 1, :, keys], causal=causal)
                    for b, keys in enumerate(own)
                ]
        return [
            run_projection(self.projections.get("o" + sfx), [getattr(self, f"o_proj{sfx}")], o)
            for o, sfx in zip(_part_inputs(rows, [h.shape[1] for h in parts]), experts)
        ]


def _part_inputs(rows: list[Tensor], lengths: list[int]) -> list[Tensor]:
    """Attention outputs (``[b, H, L, D]`` per group of rows) as each part's ``o_proj`` input ``[B, Li, H*D]``.

    The kernels write ``[b, L, H, D]`` memory, so one group of one row gives views; several groups are joined once,
    each part on its own, so that every part stays one contiguous matrix.
    """
    outs = [o.transpose(1, 2) for o in rows]  # [b, L, H, D]
    inputs, start = [], 0
    for n in lengths:
        pieces = [o[:, start : start + n] for o in outs]
        x = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        inputs.append(x.reshape(*x.shape[:2], -1))
        start += n
    return inputs


class MoTDecoderLayer(nn.Module):
    """Pre-norm block; norms, attention projections and MLP are per expert, the attention is shared."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.self_attn = MoTAttention(cfg)
        self.mlp, self.mlp_moe_gen = Qwen2MLP(cfg), Qwen2MLP(cfg)
        for sfx in EXPERTS:
            setattr(self, f"input_layernorm{sfx}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
            setattr(self, f"post_attention_layernorm{sfx}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.add_norm = add_rms_norm  # Qwen2MoTModel.compile_kernels() swaps in a fused version

    def forward(
        self, parts: list[Tensor], rope: Rope, cache: KVCache | None, layer: int, span: CacheSpan | None,
        causal: bool, pending: list[Tensor] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``parts``: the understanding tokens, then (mixed blocks) the generation tokens, as separate streams.

        Returns each stream after the attention residual and the MLP's output not yet added to it: the next layer adds
        it as ``pending``, in the same kernel as its input norm (one pass over the stream fewer per layer).
        """
        if pending is None:
            normed = [getattr(self, f"input_layernorm{sfx}")(x) for x, sfx in zip(parts, EXPERTS)]
        else:
            parts, normed = map(list, zip(*(
                self.add_norm(x, m, norm.weight, norm.eps)
                for x, m, norm in zip(parts, pending, (getattr(self, f"input_layernorm{sfx}") for sfx in EXPERTS))
            )))
        hs, mlps = [], []
        for x, a, sfx in zip(parts, self.self_attn(normed, rope, cache, layer, span, causal), EXPERTS):
            norm = getattr(self, f"post_attention_layernorm{sfx}")
            h, hn = self.add_norm(x, a, norm.weight, norm.eps)
            hs.append(h)
            mlps.append(getattr(self, f"mlp{sfx}")(hn))
        return hs, mlps


def _projection_groups(
    layer: MoTDecoderLayer, experts: tuple[str, ...]
) -> Iterator[tuple[dict[str, Projection], str, list[nn.Module]]]:
    """The linears that run as one product, per expert: (the table their Projection lives in, its key, the linears)."""
    attn = layer.self_attn
    for sfx in experts:
        yield attn.projections, "qkv" + sfx, [getattr(attn, f"{n}_proj{sfx}") for n in "qkv"]
        yield attn.projections, "o" + sfx, [getattr(attn, f"o_proj{sfx}")]
        mlp = getattr(layer, f"mlp{sfx}")
        yield mlp.projections, "gate_up", [mlp.gate_proj, mlp.up_proj]
        yield mlp.projections, "down", [mlp.down_proj]


class Qwen2MoTModel(nn.Module):
    """Embedding table, decoder layers and the two final norms."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def compile_kernels(self) -> None:
        """Fuse the element-wise work (norms, residual + norm, Q/K norm + RoPE, gated MLP, decoding attention, FP8
        input scaling) with ``torch.compile``; GPU use. Call after ``fuse_projections``."""
        if getattr(self, "kernels_compiled", False):
            return
        self.kernels_compiled = True
        # Shapes are dynamic only in the dims that vary (tokens, rows: marked on the second shape seen), feature dims
        # stay static: on an H100 the gated MLP's element-wise pass ran at 1.6 TB/s with every dim dynamic, 2.8 TB/s
        # (the copy rate) with static feature dims. A new shape of a varying dim still compiles once.
        # Rows (1-3 CFG branches), one token or many, 2-D or 3-D inputs each stay a version of their own: the tiny
        # model's text, VQA and images already made 6 of RMSNorm.forward, and past dynamo's default limit of 8 the
        # rest would run uncompiled without a word. The versions are few and fixed; the limit only guards loops.
        import torch._dynamo  # loaded by torch.compile anyway; imported here for its config

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fused_norm_rope, fused_joint_norm_rope, fused_silu_mul, fused_add_norm = (
            torch.compile(f) for f in (qk_norm_rope, joint_qkv_norm_rope, silu_mul, add_rms_norm)
        )
        fused_attend = compiled_attend()
        fused_quantize, fused_silu_mul_rows = fast_fp8_kernels()
        for module in self.modules():
            if isinstance(module, MoTDecoderLayer):
                module.add_norm = fused_add_norm
            elif isinstance(module, MoTAttention):
                module.norm_rope, module.joint_norm_rope = fused_norm_rope, fused_joint_norm_rope
                module.attend = fused_attend
            elif isinstance(module, Qwen2MLP):
                module.act, module.act_fp8 = fused_silu_mul, fused_silu_mul_rows
            elif isinstance(module, RMSNorm):
                module.compile()
        for projection, _ in self._projections(EXPERTS):
            projection.quantize = fused_quantize

    def fuse_projections(self) -> None:
        """Q/K/V and gate/up of each expert as one matrix product each, o and down through the same path; the
        Parameters become views (call after loading: a later ``load_state_dict(assign=True)`` simply turns the
        fused path off for that layer)."""
        for layer in self.layers:
            for table, key, linears in _projection_groups(layer, EXPERTS):
                if key not in table:
                    table[key] = Projection(linears)

    def generation_expert_to_fp8(self) -> None:
        """Run the generation expert's products (image latents) in FP8 from now on, its bf16 weights released
        (inference only); needs ``fuse_projections``. The understanding expert (text, ViT tokens, decoding) stays
        in the model's dtype."""
        projections = self._projections((GEN,))
        if not projections:
            raise RuntimeError("fuse_projections() first: FP8 runs through the fused projections")
        for projection, linears in projections:
            if projection.fp8 is None:
                projection.to_fp8(linears)

    def stack_lora(self) -> None:
        """Stack the active adapter's A factors per fused projection (``Projection.stack_lora``); call after each
        adapter activation, with no forward pass running."""
        for projection, linears in self._projections(EXPERTS):
            projection.stack_lora(linears)

    def _projections(self, experts: tuple[str, ...]) -> list[tuple[Projection, list[nn.Module]]]:
        """Each fused projection of ``experts`` with its member linears."""
        return [
            (table[key], linears)
            for layer in self.layers
            for table, key, linears in _projection_groups(layer, experts)
            if key in table
        ]

    def forward_parts(
        self, parts: list[Tensor], positions: Tensor, *, cache: KVCache | None = None,
        span: CacheSpan | None = None, causal: bool,
    ) -> list[Tensor]:
        """Hidden states before the final norms of ``[und tokens]`` or ``[und tokens, gen tokens]``.

        Keeping the experts' tokens in separate contiguous streams means no split or merge per layer; they meet
        only inside attention, as one sequence (und first). A two-part input is one image block, so ``positions``
        is ``[B, 1]``: both experts' tokens share the row's rope id.
        """
        if len(parts) > 1 and positions.shape[1] != 1:
            raise ValueError("a mixed (generation) block has one rope id per row")
        rope = Rope(positions, self.cfg.head_dim, self.cfg.rope_theta)
        pending = None
        for i, layer in enumerate(self.layers):
            parts, pending = layer(parts, rope, cache, i, span, causal, pending)
        return [x + m for x, m in zip(parts, pending)]

    def forward(
        self, x: Tensor, positions: Tensor, *, cache: KVCache | None = None, span: CacheSpan | None = None,
        causal: bool, mixed: bool = False,
    ) -> Tensor:
        """Hidden states ``[B, L, C]`` before the final norm; ``mixed`` inputs are ``[marker, latents, marker]``."""
        if not mixed:
            return self.forward_parts([x], positions, cache=cache, span=span, causal=causal)[0]
        return _merge(*self.forward_parts(_split(x), positions, cache=cache, span=span, causal=causal))


class Qwen2MoTForCausalLM(nn.Module):
    """The decoder plus ``lm_head`` (applied to understanding-normed states only)."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits of und-expert hidden states (float32 for sampling)."""
        return self.lm_head(self.model.norm(hidden)).float()
