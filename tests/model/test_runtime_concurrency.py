"""Issue 8: text replies for other users go on while an image renders (the image takes the lock per step)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from core.model import lora
from core.model.api import ImageContexts, ImageParams, TextParams, TextSegment
from core.model.runtime import UniCharacterRuntime
from core.model.scheduling import TurnLock
from tests.model.adapters import write_random_adapter

TEXT = [TextSegment("User Input: how was your day?")]
TEXT_PARAMS = TextParams(max_new_tokens=6, temperature=1.0, seed=3)
SCENE = ImageContexts(cond=[TextSegment("the two of us at the beach")], text_uncond=[])
LONG_IMAGE = ImageParams(width=32, height=32, num_timesteps=30, cfg_text_scale=4.0, seed=5)
DEADLOCK_GUARD_S = 120  # not a timing assertion: only stops a broken lock from hanging the suite


def test_the_lock_serves_in_order_so_a_thread_asking_again_queues_behind_waiters() -> None:
    lock, order = TurnLock(), []

    def waiter() -> None:
        with lock:
            order.append("waiter")

    with lock:  # the image's step
        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        deadline = time.monotonic() + DEADLOCK_GUARD_S
        while lock.queued < 2 and time.monotonic() < deadline:  # until the waiter holds a ticket
            time.sleep(0.001)
    with lock:  # the image asks again at once: the waiter goes first
        order.append("image")
    thread.join(DEADLOCK_GUARD_S)
    assert order == ["waiter", "image"]


@pytest.mark.parametrize("image_adapter", [False, True], ids=["base", "image-with-adapter"])
def test_a_text_reply_completes_while_a_long_image_is_still_rendering(
    runtime: UniCharacterRuntime, tiny_dir: Path, tmp_path: Path, image_adapter: bool
) -> None:
    adapter = write_random_adapter(runtime, tiny_dir, tmp_path / "char.safetensors", seed=1) if image_adapter else None
    text_alone = runtime.generate_text(TEXT, TEXT_PARAMS)
    image_alone = runtime.generate_image(SCENE, LONG_IMAGE, adapter=adapter)

    steps: list[int] = []
    replies: list[str] = []
    pieces: list[str] = []
    steps_when_replied: list[int] = []
    replied = threading.Event()

    def reply() -> None:
        replies.append(runtime.generate_text(TEXT, TEXT_PARAMS, on_text=pieces.append))
        steps_when_replied.append(len(steps))
        replied.set()

    def on_progress(step: int, total: int) -> None:
        steps.append(step)
        if step == 2:  # another user's message arrives mid-render; the image goes on only once it is answered
            threading.Thread(target=reply, daemon=True).start()
            replied.wait(DEADLOCK_GUARD_S)

    image = runtime.generate_image(SCENE, LONG_IMAGE, on_progress, adapter=adapter)

    assert replied.is_set(), "the text reply could not run between two denoising steps"
    assert steps_when_replied == [2] and steps == list(range(1, LONG_IMAGE.num_timesteps))
    # interleaving changes neither result: per-request state (generator, cache, adapter) stayed with its request
    assert replies == [text_alone] and "".join(pieces) == text_alone
    np.testing.assert_array_equal(np.asarray(image), np.asarray(image_alone))
    assert lora.active_adapter(runtime.model) is None
