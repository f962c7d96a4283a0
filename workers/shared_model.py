"""One model per worker process, shared by the worker's threads and loaded by whichever needs it first.

The model is loaded lazily inside the worker process (CUDA is never initialised in a parent that forks), once,
under a lock. ``UniCharacterRuntime`` is thread-safe: text replies take turns among themselves, images take turns
per denoising step, and the two run side by side on the GPU (core.model.scheduling), so replies keep flowing while a
picture renders. Requests are not batched together on the GPU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.config import Settings
    from core.model.api import CharacterModel

__all__ = ["SharedModel", "load_runtime"]

logger = logging.getLogger(__name__)


def load_runtime(settings: Settings) -> CharacterModel:
    """The UniCharacter runtime the settings describe."""
    from core.model.runtime import (
        UniCharacterRuntime,  # heavy (torch); imported only where a model is run
    )

    logger.info("loading the model from %s on %s", settings.resolved_model_dir, settings.device)
    return UniCharacterRuntime.load(
        settings.resolved_model_dir,
        device=settings.device,
        dtype=settings.dtype,
        checkpoint=settings.checkpoint,
        vit_checkpoint=settings.vit_checkpoint,
        image_fp8={"auto": None, "on": True, "off": False}[settings.image_fp8],
    )


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
