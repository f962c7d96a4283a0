"""The runtime's public contract: what a caller hands the model and what comes back.

Everything above the model (the worker, the CLI, training's evaluation) talks to a :class:`CharacterModel`.
A context is a list of segments in the model's own format (MODEL.md section 6): each text segment becomes
``<|im_start|> text <|im_end|>``, each image a ViT block (understanding) and/or a VAE block (generation).
Callbacks stream results; a callback that raises stops the work (that is how a job is cancelled).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "TextSegment",
    "ImageSegment",
    "Segment",
    "TextParams",
    "ImageParams",
    "ImageContexts",
    "OnText",
    "OnProgress",
    "CharacterModel",
]


@dataclass(frozen=True, slots=True)
class TextSegment:
    """One ``<|im_start|> text <|im_end|>`` segment."""

    text: str


@dataclass(frozen=True, slots=True)
class ImageSegment:
    """An image in context: through the ViT (``vit``) and/or as clean VAE latents (``vae``)."""

    image: Image.Image
    vit: bool = True
    vae: bool = False


Segment: TypeAlias = TextSegment | ImageSegment


@dataclass(frozen=True, slots=True)
class TextParams:
    """How to decode text; ``temperature == 0`` is greedy. ``seed`` makes sampling reproducible."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class ImageParams:
    """Flow-matching sampler settings (MODEL.md section 5); defaults are the notebook's text-to-image ones."""

    width: int = 1024
    height: int = 1024
    num_timesteps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_min: float = 0.0
    cfg_renorm_type: Literal["global", "channel", "text_channel"] = "global"
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class ImageContexts:
    """The three contexts of classifier-free guidance (MODEL.md 5.3).

    ``text_uncond`` is the context without the last text; ``image_uncond`` the context without input images.
    ``image_uncond=None`` means it equals ``cond`` (pure text-to-image), so that branch is skipped.
    """

    cond: Sequence[Segment]
    text_uncond: Sequence[Segment] = ()
    image_uncond: Sequence[Segment] | None = None


OnText: TypeAlias = Callable[[str], None]  # receives each new piece of decoded text
OnProgress: TypeAlias = Callable[[int, int], None]  # receives (step done, total steps)


class CharacterModel(Protocol):
    """A text-and-image model behind one interface; the real one is UniCharacter on BAGEL."""

    def generate_text(
        self,
        context: Sequence[Segment],
        params: TextParams,
        on_text: OnText | None = None,
        adapter: str | None = None,
    ) -> str:
        """Decode a reply after ``context``; stops at ``<|im_end|>`` or ``max_new_tokens``.

        ``adapter`` is a character adapter's file path, or None for the base model.
        """
        ...

    def generate_image(
        self,
        contexts: ImageContexts,
        params: ImageParams,
        on_progress: OnProgress | None = None,
        adapter: str | None = None,
    ) -> Image.Image:
        """Sample an image of ``params.width`` x ``params.height`` after the contexts."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in one segment, markers included; used for prompt budgets."""
        ...
