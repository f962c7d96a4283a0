"""What the first users after a worker starts wait for: each kind of request run twice in a fresh process, the
first time against the second, with or without the worker's warm-up (``core.model.warmup``) before them.

The first run of a request pays for what the runtime compiles (``torch.compile``'s kernels, and again when a
second length makes them dynamic) and captures (the decode step's CUDA graph). For a new deployment's case, point
the compile caches at empty folders: ``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d)``.
Full-size BAGEL-7B-MoT with random bf16 weights on the GPU (``--tiny``: the tiny model on the CPU, a smoke test).

Usage: python -m bench.cold_start [--warm-up] [--tiny]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.model_bench import build, timed
from core.model.api import ImageContexts, ImageParams, ImageSegment, TextParams, TextSegment
from core.model.runtime import UniCharacterRuntime
from core.model.warmup import filler_text, noise_picture, warm_up


def requests(rt: UniCharacterRuntime, side: int) -> dict[str, Callable[[], object]]:
    """Users' requests, of other lengths and sizes than the warm-up's own: replies (32 tokens), a question about a
    picture, a ``side``-pixel picture and a scene with a reference image (5 denoising steps each)."""
    reply = TextParams(max_new_tokens=32, temperature=0.0)
    picture = ImageParams(width=side, height=side, num_timesteps=6, seed=0)
    reference = noise_picture(480, 600, 1)
    scene = ImageContexts(
        cond=[ImageSegment(reference, vit=True, vae=True), TextSegment(filler_text(150))],
        text_uncond=[ImageSegment(reference, vit=True, vae=True)],
        image_uncond=[TextSegment(filler_text(150))],
    )
    return {
        "reply after ~300 words": lambda: rt.generate_text([TextSegment(filler_text(300))], reply),
        "reply after ~900 words": lambda: rt.generate_text([TextSegment(filler_text(900))], reply),
        "question about a 480x600 picture": lambda: rt.generate_text(
            [ImageSegment(noise_picture(480, 600, 0)), TextSegment("What is in this picture?")], reply
        ),
        f"{side}x{side} picture, 5 steps": lambda: rt.generate_image(
            ImageContexts(cond=[TextSegment(filler_text(20))]), picture
        ),
        "scene with a reference image, 5 steps": lambda: rt.generate_image(scene, picture),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-up", action="store_true", help="run core.model.warmup first, as a worker does")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: a smoke test")
    args = parser.parse_args()
    rt = build(args.tiny, compile_kernels=None, image_fp8=False)
    side = 64 if args.tiny else 1024
    card = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"
    if args.warm_up:
        seconds = warm_up(rt, side, side)
        print(f"warm-up: {sum(seconds.values()):.2f} s ({', '.join(f'{k} {s:.2f} s' for k, s in seconds.items())})")
    print(f"| request ({card}) | first run, s | second run, s |\n|---|---|---|")
    for name, request in requests(rt, side).items():
        (first, _), (second, _) = timed(request, rt.device), timed(request, rt.device)
        print(f"| {name} | {first:.2f} | {second:.2f} |", flush=True)


if __name__ == "__main__":
    main()
