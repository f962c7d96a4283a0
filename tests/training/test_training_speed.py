"""The speed paths of the training step compute what the plain ones do: flex vs SDPA attention, fewer recomputed
layers, LoRA products in the activations' dtype."""

from __future__ import annotations

import warnings

import torch

from core.model.checkpoint import load_bagel
from core.model.config import from_checkpoint_dir
from core.model.lora import LoRALinear, attach_lora, lora_parameters
from core.model.tokenizer import load_tokenizer
from tests.training.test_sft import SAMPLES, images, latent_encoder
from training.attention import PAD_MULTIPLE, PackedAttention, dense_mask
from training.packing import Packer, TrainingForward
from training.sft import SFTConfig, _recomputed_layers


def _model_and_batch(model_dir):
    cfg = from_checkpoint_dir(model_dir)
    model = load_bagel(cfg, model_dir, device=torch.device("cpu"), dtype=torch.float32).requires_grad_(False)
    attach_lora(model, 4, 8.0, seed=0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))  # a non-zero update
    packer = Packer(load_tokenizer(model_dir), images(), latent_encoder, vit_side=70, latent_side=64)
    return model, packer.pack(SAMPLES * 2, torch.Generator().manual_seed(0))


def test_padded_mask_keeps_the_rules_and_isolates_padding(tiny_model_dir):
    _, batch = _model_and_batch(tiny_model_dir)
    length = batch.tokens
    padded = dense_mask(batch.mask_tokens, PAD_MULTIPLE)
    assert torch.equal(padded[:length, :length], dense_mask(batch.mask_tokens))
    assert not padded[:length, length:].any() and not padded[length:, :length].any()
    assert torch.equal(padded[length:, length:], torch.eye(PAD_MULTIPLE - length, dtype=torch.bool))


def test_flex_attention_matches_sdpa(tiny_model_dir):
    """flex_attention runs forward-only on the CPU (unfused): enough to prove the block mask is the dense one."""
    model, batch = _model_and_batch(tiny_model_dir)
    H, Hk, D, L = 4, 2, 16, batch.tokens
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, L, D, generator=gen) for h in (H, Hk, Hk))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex warns that it runs unfused without torch.compile
        flex = PackedAttention(batch.mask_tokens, "flex")(q, k, v)
        torch.testing.assert_close(flex, PackedAttention(batch.mask_tokens, "sdpa")(q, k, v))
        forward = TrainingForward(model, attention="flex").eval()
        with torch.no_grad():
            by_flex = forward(batch)
            forward.attention = "sdpa"
            by_sdpa = forward(batch)
    torch.testing.assert_close(by_flex.total, by_sdpa.total)
    assert by_flex.ce_tokens > 0 and by_flex.mse_tokens == 8


def test_recompute_changes_nothing_but_memory(tiny_model_dir):
    model, batch = _model_and_batch(tiny_model_dir)
    params = lora_parameters(model)
    results = []
    for recompute in (None, 1, 0):
        losses = TrainingForward(model, recompute=recompute).train()(batch)
        grads = torch.autograd.grad(losses.total, params)
        results.append((losses.total.detach(), grads))
    for total, grads in results[1:]:
        torch.testing.assert_close(total, results[0][0])
        for g, ref in zip(grads, results[0][1]):
            torch.testing.assert_close(g, ref)


def test_lora_runs_in_the_activations_dtype_with_fp32_master_factors():
    base = torch.nn.Linear(32, 48).to(torch.bfloat16)
    layer = LoRALinear(base)
    layer.init_trainable(8, 16.0, torch.float32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    fast = layer(x)
    layer.compute_dtype = torch.float32  # the whole low-rank path in fp32
    exact = layer(x)
    reference = base(x).double() + 2.0 * (x.double() @ layer.lora_A.double().t() @ layer.lora_B.double().t())
    assert fast.dtype == torch.bfloat16 and fast.shape == (2, 5, 48)
    torch.testing.assert_close(fast.double(), reference, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(exact.double(), reference, rtol=2e-2, atol=2e-2)
    fast.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_recomputed_layers_follow_the_token_budget():
    assert _recomputed_layers(SFTConfig(tokens_per_step=8192), 28) == 8  # 20 layers keep their activations
    assert _recomputed_layers(SFTConfig(tokens_per_step=16384), 28) == 18
    assert _recomputed_layers(SFTConfig(tokens_per_step=2048), 28) == 0
    assert _recomputed_layers(SFTConfig(checkpoint_layers=28), 28) == 28
    assert _recomputed_layers(SFTConfig(grad_checkpointing=False, checkpoint_layers=28), 28) == 0
