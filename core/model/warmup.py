"""Warm-up: each kind of request once, before a worker takes jobs, so that no user waits for compilation.

On a GPU the runtime's first request of each shape pays for ``torch.compile``'s kernels (a second, different length
recompiles them for dynamic shapes) and for the decode step's CUDA graph. On an H200 with an empty compile cache,
those first requests took 12 s before a first reply, 3.5 s before a first answer about a picture, 7 s before a
first picture and 8 s before a first scene with a reference image (bench/RESULTS.md): that is what the first users
after a deployment would wait. Warmed up, the worker serves them at its steady speed, and until then their jobs
wait in the queue, where they see their position.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from core.model.api import CharacterModel, ImageContexts, ImageParams, ImageSegment, TextParams, TextSegment

__all__ = ["filler_text", "noise_picture", "warm_up"]

_WORDS = "the quiet harbour town wakes up as gulls circle over the fishing boats at dawn".split()
_TEXT = TextParams(max_new_tokens=4, temperature=0.0, seed=0)  # more than one token: decoding steps run too


def filler_text(words: int) -> str:
    """A text of ``words`` words: the lengths, not the content, decide what is compiled."""
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(words))


def noise_picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A noise picture: the shapes, not the content, decide what is compiled."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def warm_up(model: CharacterModel, width: int, height: int) -> dict[str, float]:
    """Run a reply, a question about a picture, a picture and a scene with a reference image (each kind at two
    sizes where the size varies between users' requests); pictures are ``width`` x ``height``, as the deployment
    draws them. Returns the seconds each kind took. Outputs are discarded, and every request has its own seed, so
    nothing later depends on it."""
    # Three steps at shifted t = 1 and 0.75: one guided (two rows), one not (the conditional row alone).
    picture = ImageParams(width=width, height=height, num_timesteps=3, cfg_interval=(0.9, 1.0), seed=0)
    reference = noise_picture(384, 512)
    kinds: dict[str, Callable[[], object]] = {
        "reply": lambda: [model.generate_text([TextSegment(filler_text(n))], _TEXT) for n in (24, 80)],
        "picture question": lambda: [
            model.generate_text([ImageSegment(noise_picture(*size)), TextSegment("What is in this picture?")], _TEXT)
            for size in ((448, 336), (320, 480))
        ],
        "picture": lambda: [
            model.generate_image(ImageContexts(cond=[TextSegment(filler_text(n))]), picture) for n in (12, 40)
        ],
        "scene": lambda: model.generate_image(
            ImageContexts(
                cond=[ImageSegment(reference, vit=True, vae=True), TextSegment(filler_text(60))],
                text_uncond=[ImageSegment(reference, vit=True, vae=True)],
                image_uncond=[TextSegment(filler_text(60))],
            ),
            picture,
        ),
    }
    seconds = {}
    for kind, run in kinds.items():
        start = time.perf_counter()
        run()
        seconds[kind] = time.perf_counter() - start
    return seconds
