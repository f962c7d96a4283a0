"""LoRA Unified-SFT step benchmark: seconds per step and peak memory at ``--tokens`` packed tokens a step.

The full-size BAGEL-7B-MoT architecture with random weights (the arithmetic is that of the real weights), LoRA on
both experts (rank 64, alpha 128 by default), bf16 base with fp32 factors, gradient checkpointing, AdamW. A step
packs what the recipe packs (MODEL.md 8.2): text-to-image samples with 1024x1024 targets (4096 noised latent tokens
each), one VQA sample with a ViT image and a role-play text sample, filled to the token budget.

    python bench/train_bench.py                 # full size on the GPU
    python bench/train_bench.py --tiny --steps 2 # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image

from core.model.bagel import Bagel, init_random_
from core.model.config import BagelConfig, full_size_config
from core.model.lora import attach_lora, lora_parameters
from core.model.tiny import TINY_LLM, TINY_VIT, tiny_tokenizer
from training.packing import ImagePart, Packer, Sample, TextPart, TrainingForward
from training.sft import sample_batch

WORDS = ["the", "cat", "sat", "on", "a", "warm", "red", "chair", "in", "the", "sunny", "garden", "and", "smiled", "at", "the", "little", "girl", "who", "loves", "mahjong"]


def _text(generator: torch.Generator, words: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (words,), generator=generator))


def _samples(generator: torch.Generator, images: int) -> list[Sample]:
    t2i = [Sample((TextPart(_text(generator, 60)), ImagePart(f"lat{i}", target=True)), "t2i") for i in range(images)]
    vqa = Sample((ImagePart("vit", vit=True), TextPart(_text(generator, 20)), TextPart(_text(generator, 40), True)))
    chat = Sample((TextPart(_text(generator, 300)), TextPart(_text(generator, 80), loss=True)))
    return [*t2i, vqa, chat]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=128.0)
    parser.add_argument("--latent-side", type=int, default=64, help="latent grid side of a target (64: 1024 px)")
    parser.add_argument("--vit-side", type=int, default=37, help="ViT patch grid side of the VQA image")
    parser.add_argument("--tiny", action="store_true", help="the tiny architecture on the CPU (smoke test)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = BagelConfig(llm=TINY_LLM, vit=TINY_VIT) if args.tiny else full_size_config()
    with torch.device("meta"):
        model = Bagel(cfg)
    model = init_random_(model.to(dtype).to_empty(device=device), seed=0).requires_grad_(False)
    attach_lora(model, args.rank, args.alpha, dtype=torch.float32)
    forward = TrainingForward(model, grad_checkpointing=True).train()
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)

    gen = torch.Generator().manual_seed(0)
    side = args.latent_side
    latents = {f"lat{i}": (torch.randn(side * side, cfg.patch_latent_dim, generator=gen), side, side) for i in range(4)}
    vit_px = args.vit_side * cfg.vit.patch_size
    images = {"vit": Image.new("RGB", (vit_px, vit_px), (200, 120, 80))}
    packer = Packer(tiny_tokenizer(), images, latents.__getitem__, vit_side=cfg.vit_max_num_patch_per_side,
                    latent_side=cfg.max_latent_size, patch_size=cfg.vit.patch_size)
    samples = _samples(gen, len(latents))
    batches = []
    for step in range(args.steps + 2):
        step_gen = torch.Generator().manual_seed(step)
        chosen = sample_batch(samples, packer.count, args.tokens, {"t2i": 20000.0, "vlm": 1.0}, step_gen, 0.0)
        batches.append(packer.pack(chosen, step_gen).to(device))

    def step(batch) -> float:  # type: ignore[no-untyped-def]
        losses = forward(batch)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(losses.total.detach())

    for batch in batches[:2]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], []
    for batch in batches[2:]:
        start = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens.append(batch.tokens)
    per_step = sum(times) / len(times)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "config": "tiny" if args.tiny else "BAGEL-7B-MoT (random weights)",
        "lora_rank": args.rank,
        "trainable_params": sum(p.numel() for p in params),
        "tokens_per_step": sum(tokens) / len(tokens),
        "seconds_per_step": round(per_step, 3),
        "tokens_per_second": round(sum(tokens) / sum(times), 1),
        "minutes_for_500_steps": round(per_step * 500 / 60, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "steps_timed": len(times),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
