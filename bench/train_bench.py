"""LoRA Unified-SFT step benchmark: seconds per step and peak memory at ``--tokens`` packed tokens a step.

The full-size BAGEL-7B-MoT architecture with random weights (the arithmetic is that of the real weights), LoRA on
both experts (rank 64, alpha 128 by default), bf16 base with fp32 factors, AdamW. A step packs what the recipe
packs (MODEL.md 8.2): text-to-image samples with ``--latent-side`` targets, one VQA sample with a ViT image and a
role-play text sample, filled to the token budget. The model is built once; each variant then runs warm-up and
timed steps on the same batches, so the ratios come from one card in one process.

A variant is ``attention:lora:recompute:kernels:adamw``:
- attention ``sdpa`` (dense boolean mask) or ``flex`` (block mask; CUDA);
- lora ``fp32`` (the low-rank products in fp32) or ``act`` (in the activations' dtype, fp32 master factors);
- recompute ``all`` or the number of checkpointed decoder layers;
- kernels ``eager`` or ``compiled`` (the model's fused element-wise kernels; irreversible, so compiled variants
  come last);
- adamw ``foreach`` or ``fused``.

    python bench/train_bench.py --latent-side 32 --steps 4                  # before vs after on the GPU
    python bench/train_bench.py --variants flex:act:14:compiled:fused       # one variant
    python bench/train_bench.py --tiny --steps 2                            # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from core.model.bagel import Bagel, init_random_
from core.model.config import BagelConfig, full_size_config
from core.model.lora import attach_lora, lora_modules, lora_parameters
from core.model.tiny import TINY_LLM, TINY_VIT, tiny_tokenizer
from training.packing import (
    ImagePart,
    PackedBatch,
    Packer,
    Sample,
    TextPart,
    TrainingForward,
)
from training.sft import sample_batch
from unichar.arguments import at_least

WORDS = ["the", "cat", "sat", "on", "a", "warm", "red", "chair", "in", "the", "sunny", "garden", "and", "smiled", "at", "the", "little", "girl", "who", "loves", "mahjong"]
GPU_VARIANTS = (
    "sdpa:fp32:all:eager:foreach",  # the code as it was: dense-mask SDPA, fp32 LoRA path, every layer recomputed
    "flex:fp32:all:eager:foreach",
    "flex:act:all:eager:fused",
    "flex:act:14:eager:fused",
    "flex:act:all:compiled:fused",
    "flex:act:14:compiled:fused",
    "flex:act:8:compiled:fused",
)
CPU_VARIANTS = ("sdpa:fp32:all:eager:foreach", "sdpa:act:0:eager:foreach")


@dataclass(frozen=True)
class Variant:
    attention: str
    lora: str
    recompute: int | None
    kernels: str
    adamw: str

    @classmethod
    def parse(cls, spec: str) -> Variant:
        attention, lora, recompute, kernels, adamw = spec.split(":")
        return cls(attention, lora, None if recompute == "all" else int(recompute), kernels, adamw)


def _text(generator: torch.Generator, words: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (words,), generator=generator))


def _samples(generator: torch.Generator, images: int) -> list[Sample]:
    t2i = [Sample((TextPart(_text(generator, 60)), ImagePart(f"lat{i}", target=True)), "t2i") for i in range(images)]
    vqa = Sample((ImagePart("vit", vit=True), TextPart(_text(generator, 20)), TextPart(_text(generator, 40), True)))
    chat = Sample((TextPart(_text(generator, 300)), TextPart(_text(generator, 80), loss=True)))
    return [*t2i, vqa, chat]


def _run_variant(
    model: Bagel, variant: Variant, batches: list[PackedBatch], warmup: int, profile: Path | None = None
) -> dict:
    """Warm-up then timed steps of one variant; the optimizer starts fresh (its state is part of the peak).
    ``profile``: afterwards, one more step under the profiler; its kernels by GPU time go to that file."""
    cuda = batches[0].rope.is_cuda
    for module in lora_modules(model).values():
        module.compute_dtype = torch.float32 if variant.lora == "fp32" else None
    forward = TrainingForward(model, recompute=variant.recompute, attention=variant.attention,
                              compile_kernels=variant.kernels == "compiled").train()
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0,
                                  **({"fused": True} if variant.adamw == "fused" else {"foreach": cuda}))

    def step(batch: PackedBatch) -> float:
        losses = forward(batch)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(losses.total.detach())

    started = time.perf_counter()
    for batch in batches[:warmup]:
        step(batch)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - started
    times, tokens, losses = [], [], []
    for batch in batches[warmup:]:
        start = time.perf_counter()
        losses.append(step(batch))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens.append(batch.tokens)
    if profile is not None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(batches[-1])
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
        profile.write_text(table)
    per_step = sum(times) / len(times)
    result = {
        **asdict(variant),
        "warmup_s": round(warm_s, 1),
        "tokens_per_step": sum(tokens) / len(tokens),
        "seconds_per_step": round(per_step, 3),
        "step_seconds": [round(t, 3) for t in times],
        "tokens_per_second": round(sum(tokens) / sum(times), 1),
        "minutes_for_500_steps": round(per_step * 500 / 60, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "losses": [round(x, 4) for x in losses],
    }
    model.zero_grad(set_to_none=True)
    return result  # the optimizer and its state go with this frame


def _parity(model: Bagel, batch: PackedBatch) -> dict:
    """The first batch's loss by flex and by SDPA attention (LoRA B is zero: the base model's loss)."""
    out = {}
    for backend in ("sdpa", "flex"):
        forward = TrainingForward(model, attention=backend).train()
        out[backend] = float(forward(batch).total.detach())
    out["relative_difference"] = abs(out["flex"] - out["sdpa"]) / abs(out["sdpa"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=at_least(1), default=8192)
    parser.add_argument("--steps", type=at_least(1), default=4, help="timed steps per variant")
    parser.add_argument(
        "--warmup", type=at_least(0), default=2, help="untimed steps per variant (compilation happens here)"
    )
    parser.add_argument("--rank", type=at_least(1), default=64)
    parser.add_argument("--alpha", type=float, default=128.0)
    parser.add_argument(
        "--latent-side", type=at_least(1), default=64, help="latent grid side of a target (64: 1024 px)"
    )
    parser.add_argument("--vit-side", type=at_least(1), default=37, help="ViT patch grid side of the VQA image")
    parser.add_argument("--variants", default="", help="comma-separated variants (see the module doc)")
    parser.add_argument("--json", type=Path, help="also write the results here (rewritten after each variant)")
    parser.add_argument("--profile", type=Path, help="profile one extra step of the last variant (CUDA) into this file")
    parser.add_argument("--tiny", action="store_true", help="the tiny architecture on the CPU (smoke test)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    specs = args.variants.split(",") if args.variants else GPU_VARIANTS if device.type == "cuda" else CPU_VARIANTS
    variants = [Variant.parse(s) for s in specs]
    cfg = BagelConfig(llm=TINY_LLM, vit=TINY_VIT) if args.tiny else full_size_config()
    started = time.perf_counter()
    with torch.device("meta"):
        model = Bagel(cfg)
    model = init_random_(model.to(dtype).to_empty(device=device), seed=0).requires_grad_(False)
    attach_lora(model, args.rank, args.alpha, dtype=torch.float32)

    gen = torch.Generator().manual_seed(0)
    side = args.latent_side
    latents = {f"lat{i}": (torch.randn(side * side, cfg.patch_latent_dim, generator=gen), side, side) for i in range(4)}
    vit_px = args.vit_side * cfg.vit.patch_size
    images = {"vit": Image.new("RGB", (vit_px, vit_px), (200, 120, 80))}
    packer = Packer(tiny_tokenizer(), images, latents.__getitem__, vit_side=cfg.vit_max_num_patch_per_side,
                    latent_side=cfg.max_latent_size, patch_size=cfg.vit.patch_size)
    samples = _samples(gen, len(latents))
    batches = []
    for step in range(args.steps + args.warmup):
        step_gen = torch.Generator().manual_seed(step)
        chosen = sample_batch(samples, packer.count, args.tokens, {"t2i": 20000.0, "vlm": 1.0}, step_gen, 0.0)
        batches.append(packer.pack(chosen, step_gen).to(device))
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": "tiny" if args.tiny else "BAGEL-7B-MoT (random weights)",
        "lora_rank": args.rank,
        "trainable_params": sum(p.numel() for p in lora_parameters(model)),
        "build_s": round(time.perf_counter() - started, 1),
        "variants": [],
    }
    if device.type == "cuda" and any(v.attention == "flex" for v in variants):
        report["parity"] = _parity(model, batches[0])
    for variant in variants:
        profile = args.profile if variant is variants[-1] and device.type == "cuda" else None
        try:
            result = _run_variant(model, variant, batches, args.warmup, profile)
        except torch.OutOfMemoryError as exc:
            result = {**asdict(variant), "error": f"out of memory: {str(exc)[:200]}"}
            model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["variants"].append(result)
        print(json.dumps(result), flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    print(f"{report['device']}, {report['config']}, build {report['build_s']} s, parity {report.get('parity')}")
    print(f"{'variant':40} {'s/step':>7} {'tokens':>7} {'peak GiB':>9} {'warm-up s':>9}")
    for r in report["variants"]:
        recompute = "all" if r["recompute"] is None else r["recompute"]
        name = f"{r['attention']}:{r['lora']}:{recompute}:{r['kernels']}:{r['adamw']}"
        if "error" in r:
            print(f"{name:40} {r['error'][:40]}")
            continue
        print(f"{name:40} {r['seconds_per_step']:7.3f} {r['tokens_per_step']:7.0f} {r['peak_memory_gib'] or 0:9.2f} "
              f"{r['warmup_s']:9.1f}")


if __name__ == "__main__":
    main()
