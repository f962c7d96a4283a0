"""The Qwen2.5 byte-level BPE tokenizer of a model folder, with BAGEL's special tokens.

BAGEL's "bos" is ``<|im_start|>`` and its "eos" ``<|im_end|>`` (MODEL.md 6, 10.7); ids are read from the
tokenizer itself so the tiny model's small vocabulary works the same way as the real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

__all__ = ["SPECIAL_TOKENS", "BagelTokenizer", "SpecialTokens", "load_tokenizer"]

# The four tokens BAGEL's add_special_tokens() guarantees, plus Qwen's document separator.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


@dataclass(frozen=True, slots=True)
class SpecialTokens:
    """Ids of the tokens that frame segments and image blocks."""

    bos: int  # <|im_start|>
    eos: int  # <|im_end|>
    vision_start: int
    vision_end: int


class BagelTokenizer:
    """Encodes one segment's text and decodes generated ids; thread-safe (``tokenizers`` is)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.special = SpecialTokens(
            bos=self._id("<|im_start|>"),
            eos=self._id("<|im_end|>"),
            vision_start=self._id("<|vision_start|>"),
            vision_end=self._id("<|vision_end|>"),
        )
        # Embedding rows past this are padding: never sampled (MODEL.md 11.6).
        self.size = tokenizer.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token} token")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone (no bos/eos), as Qwen2Tokenizer.encode does."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def segment(self, text: str) -> list[int]:
        """``<|im_start|> text <|im_end|>``: the only framing BAGEL uses (no chat template)."""
        return [self.special.bos, *self.encode(text), self.special.eos]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(directory: str | Path) -> BagelTokenizer:
    """Load ``tokenizer.json`` from a model folder."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.json is missing in {directory}")
    try:
        return BagelTokenizer(Tokenizer.from_file(str(path)))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"{path} is not a valid tokenizer file: {exc}") from exc
