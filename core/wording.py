"""Small pieces of the wording users read, shared by every reply that counts something."""

from __future__ import annotations

__all__ = ["counted"]


def counted(number: int, noun: str) -> str:
    """``1 fact``, ``2 facts``: the number with its (regular) noun in the right number."""
    return f"{number} {noun if number == 1 else noun + 's'}"
