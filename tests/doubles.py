"""A deterministic ``CharacterModel`` double for tests of the job path (never used by production code).

It echoes the user's input in several pieces through ``on_text``, draws a real (small) PIL image with one
progress callback per step, and can be told to block until released or to fail, so tests can hold a job
mid-run, kill its worker, or check error handling. It records every call.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

from PIL import Image, ImageDraw

from core.model.api import (
    ImageContexts,
    ImageParams,
    ImageSegment,
    OnProgress,
    OnText,
    Segment,
    TextParams,
    TextSegment,
)

__all__ = ["EchoModel", "ModelFailure"]


class ModelFailure(RuntimeError):
    """What an EchoModel told to fail raises."""


class EchoModel:
    """Echo replies and gradient images, deterministic for a given input and seed."""

    def __init__(self, pieces: int = 3, block: threading.Event | None = None, fail: bool = False) -> None:
        self.pieces = pieces
        self.block = block  # when set: each call waits for this event (tests release or kill the worker)
        self.fail = fail
        self.calls: list[tuple[str, object]] = []
        self.started = threading.Event()  # set when a call begins
        self._lock = threading.Lock()

    def _begin(self, kind: str, payload: object) -> None:
        with self._lock:
            self.calls.append((kind, payload))
        self.started.set()
        if self.block is not None:
            self.block.wait(timeout=120)
        if self.fail:
            raise ModelFailure(f"{kind} failed on purpose")

    @staticmethod
    def reply_to(context: Sequence[Segment]) -> str:
        """The reply this double gives to ``context``: the user input echoed, with the images counted."""
        text = "\n".join(s.text for s in context if isinstance(s, TextSegment))
        match = re.search(r"User Input: (.*?)(?:\n\n|$)", text, re.S)
        said = (match.group(1) if match else text.rsplit("\n", 1)[-1]).strip()
        images = sum(isinstance(s, ImageSegment) for s in context)
        return f"echo: {said}" + (f" (I see {images} image{'s' * (images != 1)})" if images else "")

    def generate_text(
        self, context: Sequence[Segment], params: TextParams, on_text: OnText | None = None, adapter: str | None = None
    ) -> str:
        """Stream the echo in ``pieces`` parts and return it whole."""
        self._begin("text", list(context))
        reply = self.reply_to(context)
        size = max(1, -(-len(reply) // self.pieces))
        for start in range(0, len(reply), size):
            if on_text is not None:
                on_text(reply[start : start + size])
        return reply

    def generate_image(
        self,
        contexts: ImageContexts,
        params: ImageParams,
        on_progress: OnProgress | None = None,
        adapter: str | None = None,
    ) -> Image.Image:
        """A gradient whose colour follows the seed, after one progress call per step."""
        self._begin("image", contexts)
        for step in range(1, params.num_timesteps + 1):
            if on_progress is not None:
                on_progress(step, params.num_timesteps)
        seed = params.seed or 0
        image = Image.new("RGB", (params.width, params.height), (seed % 256, (seed >> 8) % 256, 128))
        draw = ImageDraw.Draw(image)
        for x in range(0, params.width, 4):
            draw.line([(x, 0), (x, params.height)], fill=(x % 256, 255 - x % 256, seed % 200))
        return image

    def count_tokens(self, text: str) -> int:
        """Whitespace words plus the two segment markers."""
        return len(text.split()) + 2
