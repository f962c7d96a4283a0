"""The warm-up runs every kind of request a worker serves, at the deployment's picture size, and changes no output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from core.model.api import ImageContexts, ImageParams, ImageSegment, Segment, TextParams, TextSegment
from core.model.runtime import UniCharacterRuntime
from core.model.warmup import warm_up


class Recording:
    """The runtime, with a note of every request made through it."""

    def __init__(self, runtime: UniCharacterRuntime) -> None:
        self.runtime = runtime
        self.texts: list[Sequence[Segment]] = []
        self.images: list[tuple[ImageContexts, ImageParams]] = []

    def generate_text(self, context: Sequence[Segment], params: TextParams, *args: Any, **kwargs: Any) -> str:
        self.texts.append(context)
        return self.runtime.generate_text(context, params, *args, **kwargs)

    def generate_image(self, contexts: ImageContexts, params: ImageParams, *args: Any, **kwargs: Any) -> Any:
        self.images.append((contexts, params))
        return self.runtime.generate_image(contexts, params, *args, **kwargs)

    def count_tokens(self, text: str) -> int:
        return self.runtime.count_tokens(text)


def _has_image(context: Sequence[Segment]) -> bool:
    return any(isinstance(segment, ImageSegment) for segment in context)


def test_every_kind_of_request_runs_at_two_sizes_and_the_pictures_at_the_deployments(
    runtime: UniCharacterRuntime,
) -> None:
    model = Recording(runtime)
    seconds = warm_up(model, 48, 32)

    assert set(seconds) == {"reply", "picture question", "picture", "scene"}
    assert all(s > 0 for s in seconds.values())
    replies = [c for c in model.texts if not _has_image(c)]
    questions = [c for c in model.texts if _has_image(c)]
    # a second length or picture size: compiled kernels become dynamic before users come
    assert len({runtime.count_tokens(c[0].text) for c in replies}) == 2  # type: ignore[union-attr]
    assert len({c[0].image.size for c in questions}) == 2  # type: ignore[union-attr]
    assert all((p.width, p.height) == (48, 32) for _, p in model.images)
    plain = [c for c, _ in model.images if not _has_image(c.cond)]
    scenes = [c for c, _ in model.images if _has_image(c.cond)]
    assert len(plain) == 2 and len(scenes) == 1
    assert scenes[0].cond[0].vae and scenes[0].cond[0].vit  # type: ignore[union-attr]
    # both kinds of denoising step: guided (t = 1) and the conditional row alone (t = 0.75)
    params = model.images[0][1]
    assert params.num_timesteps == 3 and params.cfg_interval[0] < 1.0 and params.cfg_interval[0] >= 0.75


def test_outputs_after_the_warm_up_are_those_before_it(tiny_dir: Any) -> None:
    fresh = UniCharacterRuntime.load(tiny_dir, device="cpu")
    context = [TextSegment("Character Description: a cat."), TextSegment("User Input: hi")]
    text = TextParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    image = (ImageContexts(cond=[TextSegment("a red boat")]), ImageParams(width=32, height=32, num_timesteps=4, seed=5))
    before = fresh.generate_text(context, text), np.asarray(fresh.generate_image(*image))

    warm_up(fresh, 32, 32)

    assert fresh.generate_text(context, text) == before[0]
    assert np.array_equal(np.asarray(fresh.generate_image(*image)), before[1])
