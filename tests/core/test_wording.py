"""Counts in replies agree with their nouns."""

from __future__ import annotations

import pytest

from core.wording import counted


@pytest.mark.parametrize(
    ("number", "noun", "text"), [(1, "fact", "1 fact"), (0, "fact", "0 facts"), (2, "picture", "2 pictures")]
)
def test_the_noun_follows_the_number(number: int, noun: str, text: str) -> None:
    assert counted(number, noun) == text
