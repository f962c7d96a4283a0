"""The MoT decoder: cached decoding equals a full forward, attention alignment, expert routing (MODEL.md 2.3, 6)."""

from __future__ import annotations

import pytest
import torch

from core.model.attention import attend
from core.model.kv_cache import CacheSpan, KVCache
from core.model.runtime import UniCharacterRuntime


def _reference_attention(q, k, v, causal: bool):
    """Plain softmax attention with K/V repeated per query head and a bottom-right causal mask."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        lq, lk = q.shape[2], k.shape[2]
        keep = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize(("lq", "lk", "causal"), [(5, 5, True), (3, 9, True), (1, 9, True), (4, 9, False), (1, 6, False)])
def test_attention_matches_reference_with_gqa_and_bottom_right_alignment(lq: int, lk: int, causal: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((4, lq), (2, lk), (2, lk)))
    torch.testing.assert_close(attend(q, k, v, causal=causal), _reference_attention(q, k, v, causal))


def test_key_mask_hides_left_padding() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    mask = torch.tensor([[False, False, True, True, True, True, True]])
    torch.testing.assert_close(attend(q, k, v, causal=False, key_mask=mask), attend(q, k[:, :, 2:], v[:, :, 2:], causal=False))


def test_cached_decoding_logits_equal_a_full_forward(runtime: UniCharacterRuntime) -> None:
    lm, cfg = runtime.model.language_model, runtime.cfg.llm
    ids = torch.tensor([[3, 17, 42, 99, 5, 7, 250, 11]])
    positions = torch.arange(ids.shape[1])[None]
    with torch.inference_mode():
        full = lm.logits(lm.model(lm.model.embed_tokens(ids), positions, causal=True))
        cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 16, cfg.head_dim, torch.float32, "cpu")
        prefix = 5
        span = CacheSpan(rows=slice(0, 1), start=0, write=0, end=prefix)
        h = lm.model(lm.model.embed_tokens(ids[:, :prefix]), positions[:, :prefix], cache=cache, span=span, causal=True)
        steps = [lm.logits(h)]
        mask = torch.zeros(1, 16, dtype=torch.bool)
        for t in range(prefix, ids.shape[1]):  # static-shape decode steps, as the runtime runs them
            mask[0, t] = True
            mask[0, :t] = True
            span = CacheSpan(rows=slice(0, 1), start=0, write=torch.tensor([t]), end=16, key_mask=mask)
            h = lm.model(lm.model.embed_tokens(ids[:, t : t + 1]), positions[:, t : t + 1], cache=cache, span=span, causal=True)
            steps.append(lm.logits(h))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_und_only_forward_never_touches_the_generation_expert(runtime: UniCharacterRuntime) -> None:
    model = runtime.model.language_model.model
    x = torch.randn(1, 6, runtime.cfg.llm.hidden_size, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(6)[None]
    with torch.inference_mode():
        before = model(x, pos, causal=True)
        mixed_before = model(x, torch.zeros(1, 1, dtype=torch.long), causal=False, mixed=True)
    gen_weight = model.layers[0].mlp_moe_gen.up_proj.weight
    saved = gen_weight.detach().clone()
    with torch.no_grad():
        gen_weight.mul_(3.0)
    try:
        with torch.inference_mode():
            assert torch.equal(model(x, pos, causal=True), before)
            after = model(x, torch.zeros(1, 1, dtype=torch.long), causal=False, mixed=True)
    finally:
        with torch.no_grad():
            gen_weight.copy_(saved)
    assert not torch.allclose(after[:, 1:-1], mixed_before[:, 1:-1])  # latents use the generation expert


def _reference_layer(layer, x: torch.Tensor, experts: list[str], cfg) -> torch.Tensor:
    """One decoder layer, token by token choosing each token's weights by name; one shared softmax, one rope id."""
    a = layer.self_attn
    qs, ks, vs = [], [], []
    for i, sfx in enumerate(experts):
        h = getattr(layer, f"input_layernorm{sfx}")(x[:, i : i + 1])
        qs.append(getattr(a, f"q_norm{sfx}")(getattr(a, f"q_proj{sfx}")(h).view(1, 1, -1, cfg.head_dim)))
        ks.append(getattr(a, f"k_norm{sfx}")(getattr(a, f"k_proj{sfx}")(h).view(1, 1, -1, cfg.head_dim)))
        vs.append(getattr(a, f"v_proj{sfx}")(h).view(1, 1, -1, cfg.head_dim))
    q, k, v = (torch.cat(t, dim=1).transpose(1, 2) for t in (qs, ks, vs))  # position 0: RoPE is the identity
    att = _reference_attention(q, k, v, causal=False).transpose(1, 2).reshape(1, len(experts), -1)
    out = []
    for i, sfx in enumerate(experts):
        r = x[:, i : i + 1] + getattr(a, f"o_proj{sfx}")(att[:, i : i + 1])
        mlp = getattr(layer, f"mlp{sfx}")
        out.append(r + mlp(getattr(layer, f"post_attention_layernorm{sfx}")(r)))
    return torch.cat(out, dim=1)


def test_mixed_layout_routes_markers_to_und_and_latents_to_gen(runtime: UniCharacterRuntime) -> None:
    from core.model.llm import Rope

    cfg = runtime.cfg.llm
    layer = runtime.model.language_model.model.layers[1]
    x = torch.randn(1, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    rope = Rope(torch.zeros(1, 1, dtype=torch.long), cfg.head_dim, cfg.rope_theta)
    with torch.inference_mode():
        hs, mlps = layer([x[:, :2], x[:, 2:]], rope, None, 0, None, causal=False)
        got = torch.cat([h + m for h, m in zip(hs, mlps)], dim=1)
        want = _reference_layer(layer, x, ["", "", "_moe_gen", "_moe_gen", "_moe_gen"], cfg)
        und = _reference_layer(layer, x, [""] * 5, cfg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, und)


def test_mixed_forward_keeps_the_marker_latents_marker_layout(runtime: UniCharacterRuntime) -> None:
    model = runtime.model.language_model.model
    x = torch.randn(2, 6, runtime.cfg.llm.hidden_size, generator=torch.Generator().manual_seed(4))
    pos = torch.zeros(2, 1, dtype=torch.long)
    with torch.inference_mode():
        merged = model(x, pos, causal=False, mixed=True)
        und, gen = model.forward_parts([x[:, [0, -1]], x[:, 1:-1]], pos, causal=False)
    torch.testing.assert_close(merged[:, 1:-1], gen)
    torch.testing.assert_close(merged[:, [0, -1]], und)


def _reference_norm_rope(x, weight, eps, cos, sin):
    """The official Q/K norm then rotate-half RoPE: ``h cos + [-h2, h1] sin`` on the normed ``h``, float32."""
    h = x.float()
    h = weight.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    h1, h2 = h.chunk(2, dim=-1)
    return (h * cos + torch.cat([-h2, h1], dim=-1) * sin).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_rope_is_the_official_rotate_half_bit_for_bit(dtype: torch.dtype) -> None:
    from core.model.llm import Rope, norm_rope

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 6, 16, generator=g).to(dtype)
    weight = (torch.rand(6, 16, generator=g) + 0.5).to(dtype)
    rope = Rope(torch.arange(14).view(2, 7) * 3, 16, 10000.0)
    got = norm_rope(x, weight, 1e-6, rope.cos, rope.sin)
    assert torch.equal(got, _reference_norm_rope(x, weight, 1e-6, rope.cos, rope.sin))


def test_joint_qkv_norm_rope_joins_the_parts_each_with_its_own_norms() -> None:
    from core.model.llm import Rope, joint_qkv_norm_rope

    g = torch.Generator().manual_seed(6)
    H, Hk, D = 4, 2, 16
    qkv = [torch.randn(2, n, H + 2 * Hk, D, generator=g) for n in (2, 5)]
    norms = [(torch.rand(D, generator=g) + 0.5, torch.rand(D, generator=g) + 0.5) for _ in qkv]
    rope = Rope(torch.tensor([[4], [9]]), D, 10000.0)
    qk, v = joint_qkv_norm_rope(qkv, norms, H, 1e-6, rope.cos, rope.sin)
    want_qk, want_v = [], []
    for x, (qw, kw) in zip(qkv, norms):
        weight = torch.cat([qw.expand(H, -1), kw.expand(Hk, -1)])
        want_qk.append(_reference_norm_rope(x[:, :, : H + Hk], weight, 1e-6, rope.cos, rope.sin))
        want_v.append(x[:, :, H + Hk :])
    assert torch.equal(qk, torch.cat(want_qk, dim=1)) and torch.equal(v, torch.cat(want_v, dim=1))
