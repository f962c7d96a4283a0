"""One model per worker process, shared by the worker's threads.

The model is loaded inside the worker process (CUDA is never initialised in a parent that forks), once, under a
lock: by a chat or image worker before it takes jobs (``workers.celery_app.start_worker``), else by whichever
thread needs it first. ``UniCharacterRuntime`` is thread-safe: text replies take turns among themselves, images
take turns per denoising step, and the two run side by side on the GPU (core.model.scheduling), so replies keep
flowing while a picture renders. Requests are not batched together on the GPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.config import Settings
    from core.model.api import CharacterModel

__all__ = ["SharedModel", "load_runtime"]

logger = logging.getLogger(__name__)


def load_runtime(settings: Settings) -> CharacterModel:
    """The UniCharacter runtime the settings describe, warmed up on a GPU (``core.model.warmup``)."""
    from core.model.runtime import UniCharacterRuntime  # heavy (torch); imported only where a model is run
    from core.model.warmup import warm_up

    logger.info("loading the model from %s on %s", settings.resolved_model_dir, settings.device)
    start = time.perf_counter()
    runtime = UniCharacterRuntime.load(
        settings.resolved_model_dir,
        device=settings.device,
        dtype=settings.dtype,
        checkpoint=settings.checkpoint,
        vit_checkpoint=settings.vit_checkpoint,
        image_fp8={"auto": None, "on": True, "off": False}[settings.image_fp8],
    )
    logger.info("model loaded in %.1f s", time.perf_counter() - start)
    if runtime.device.type == "cuda":  # compiled kernels and decode graphs exist only there
        width, height, _ = settings.image_shape
        logger.info("warming up: each kind of request once, %dx%d pictures", width, height)
        seconds = warm_up(runtime, width, height)
        logger.info("warmed up in %.1f s (%s)", sum(seconds.values()),
                    ", ".join(f"{kind} {s:.1f} s" for kind, s in seconds.items()))
    return runtime


class SharedModel:
    """A lazily loaded model; ``get()`` is safe from any thread and loads at most once."""

    def __init__(self, loader: Callable[[], CharacterModel]) -> None:
        self._loader = loader
        self._model: CharacterModel | None = None
        self._lock = threading.Lock()

    def get(self) -> CharacterModel:
        """The model, loading it on first use."""
        model = self._model
        if model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._loader()
                model = self._model
        return model
