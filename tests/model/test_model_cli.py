"""``unichar model init|inspect|generate|ask``."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
from PIL import Image

from unichar import model_cli


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    model_cli.add_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args, None)


def test_init_inspect_generate_ask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "tiny"
    assert _run(["model", "init", "--tiny", str(d)]) == 0
    assert _run(["model", "inspect", str(d)]) == 0
    assert "every tensor" in capsys.readouterr().out
    out = tmp_path / "x.png"
    assert _run(["model", "generate", str(d), "--prompt", "a cat", "--out", str(out), "--size", "40x24",
                 "--steps", "3", "--seed", "1"]) == 0
    assert Image.open(out).size == (40, 24)
    capsys.readouterr()
    assert _run(["model", "ask", str(d), "--image", str(out), "--question", "what?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_inspect_names_what_is_missing_or_wrong(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "ae.safetensors").unlink()
    assert _run(["model", "inspect", str(d)]) == 1
    assert "missing ae.safetensors" in capsys.readouterr().out
    shutil.copy(tiny_dir / "ae.safetensors", d / "ae.safetensors")
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "ema.safetensors"))
    del state["llm2vae.bias"]
    save_file(state, str(d / "ema.safetensors"))
    assert _run(["model", "inspect", str(d)]) == 1
    assert "missing tensor llm2vae.bias" in capsys.readouterr().out


def test_bad_input_gives_a_clear_error(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert _run(["model", "ask", str(tiny_dir), "--image", str(bad), "--question", "q"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert _run(["model", "generate", str(tmp_path / "nowhere"), "--prompt", "p", "--out", str(tmp_path / "o.png")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(["model", "generate", str(tiny_dir), "--prompt", "p", "--out", "o.png", "--size", "big"])
    with pytest.raises(SystemExit):
        _run(["model", "generate", str(tiny_dir), "--prompt", "p", "--out", str(tmp_path / "o.jpg")])
    assert "name a .png file" in capsys.readouterr().err and not (tmp_path / "o.jpg").exists()
    with pytest.raises(SystemExit):
        _run(["model", "ask", str(tiny_dir), "--question", "q", "--max-new-tokens", "0"])
    assert "at least 1" in capsys.readouterr().err
    assert _run(["model", "init", str(tmp_path / "x")]) == 2
