"""The tokenizer of a model folder: special ids read from it, BAGEL's segment framing."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.model.tokenizer import load_tokenizer


def test_special_ids_come_from_the_tokenizer(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    ids = tok.special
    assert len({ids.bos, ids.eos, ids.vision_start, ids.vision_end}) == 4
    assert tok.encode("<|im_start|>") == [ids.bos] and tok.encode("<|vision_end|>") == [ids.vision_end]


def test_segment_is_im_start_text_im_end_and_round_trips(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    ids = tok.segment("Hello, wörld! 你好")
    assert ids[0] == tok.special.bos and ids[-1] == tok.special.eos
    assert tok.decode(ids) == "Hello, wörld! 你好"


def test_files_of_the_official_layout_exist(tiny_dir: Path) -> None:
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tiny_dir / name).is_file()


def test_bad_tokenizer_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(tmp_path)
