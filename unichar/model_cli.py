"""``unichar model``: write the tiny model, inspect a model folder, try text-to-image and questions without a bot.

``init --tiny DIR`` writes the random test model; ``inspect DIR`` says what a folder holds and what is missing or
mismatched; ``generate`` and ``ask`` load the folder (CPU or GPU, ``UNICHAR_DEVICE``) and run one request.
The model modules (and torch) are imported inside the functions: every ``unichar`` command builds this parser.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from core.model.api import (
    ImageContexts,
    ImageParams,
    ImageSegment,
    TextParams,
    TextSegment,
)
from unichar.arguments import at_least

if TYPE_CHECKING:
    from core.config import Settings
    from core.model.runtime import UniCharacterRuntime

__all__ = ["add_subparsers", "ask", "generate", "init_tiny", "inspect"]

log = logging.getLogger(__name__)

_FILES = ("llm_config.json", "vit_config.json", "tokenizer.json", "ema.safetensors", "ae.safetensors")


def init_tiny(directory: Path, seed: int = 0) -> Path:
    """Write the tiny random model into ``directory``."""
    from core.model.tiny import write_tiny_model

    return write_tiny_model(directory, seed=seed)


def inspect(directory: Path) -> tuple[bool, str]:
    """A readable report of a model folder; the flag says whether it would load."""
    from core.model.checkpoint import check_model_dir
    from core.model.config import from_checkpoint_dir

    lines = [f"model folder {directory}"]
    missing = [name for name in _FILES if not (directory / name).is_file()]
    for name in _FILES:
        lines.append(f"  {'missing' if name in missing else 'ok':7} {name}")
    if missing:
        return False, "\n".join(lines)
    try:
        cfg = from_checkpoint_dir(directory)
    except (ValueError, KeyError, OSError) as exc:
        return False, "\n".join([*lines, f"  config problem: {exc}"])
    llm = cfg.llm
    lines.append(
        f"  decoder: {llm.num_hidden_layers} MoT layers, hidden {llm.hidden_size}, heads {llm.num_attention_heads}/"
        f"{llm.num_key_value_heads}, vocab {llm.vocab_size}; ViT: {cfg.vit.num_hidden_layers} layers used, "
        f"hidden {cfg.vit.hidden_size}; latent channels {cfg.latent_channels}"
    )
    problems = check_model_dir(directory, cfg)
    lines += [f"  problem: {p}" for p in problems] or ["  every tensor of ema.safetensors matches the network"]
    return not problems, "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return width, height


def _png_file(text: str) -> Path:
    """``--out``: the picture is written as PNG, so the name must say so."""
    if Path(text).suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"the picture is written as PNG: name a .png file, got {text!r}")
    return Path(text)


def _runtime(directory: Path, device: str = "auto") -> UniCharacterRuntime:
    from core.model.runtime import UniCharacterRuntime

    return UniCharacterRuntime.load(directory, device=device)


def generate(directory: Path, prompt: str, out: Path, *, size: tuple[int, int] = (1024, 1024), steps: int = 50,
             seed: int | None = None, device: str = "auto") -> Path:
    """Text-to-image with the notebook's settings; writes a PNG to ``out``."""
    runtime = _runtime(directory, device)
    params = ImageParams(width=size[0], height=size[1], num_timesteps=steps, seed=seed)
    image = runtime.generate_image(ImageContexts(cond=[TextSegment(prompt)]), params)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out


def ask(directory: Path, question: str, *, image: Path | None = None, max_new_tokens: int = 256,
        seed: int | None = None, device: str = "auto") -> str:
    """VQA (with ``image``) or knowledge QA; the answer is decoded greedily."""
    context = []
    if image is not None:
        try:
            with Image.open(image) as img:
                context.append(ImageSegment(img.convert("RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot read image {image}: {exc}") from exc
    context.append(TextSegment(question))
    runtime = _runtime(directory, device)
    return runtime.generate_text(context, TextParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed))


def _device(settings: Settings | None) -> str:
    return settings.device if settings is not None else "auto"


def _fail(message: str) -> int:
    print(f"unichar model: {message}", file=sys.stderr)
    return 2


def _init(args: argparse.Namespace, settings: Settings | None = None) -> int:
    if not args.tiny:
        return _fail("only --tiny is supported: the real model is downloaded, not written")
    print(f"wrote the tiny model to {init_tiny(Path(args.directory), seed=args.seed)}")
    return 0


def _inspect(args: argparse.Namespace, settings: Settings | None = None) -> int:
    ok, report = inspect(Path(args.directory))
    print(report)
    return 0 if ok else 1


def _generate(args: argparse.Namespace, settings: Settings | None = None) -> int:
    try:
        out = generate(Path(args.directory), args.prompt, args.out, size=args.size, steps=args.steps,
                       seed=args.seed, device=_device(settings))
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError is a ValueError
        return _fail(str(exc))
    print(f"wrote {out}")
    return 0


def _ask(args: argparse.Namespace, settings: Settings | None = None) -> int:
    try:
        answer = ask(Path(args.directory), args.question, image=Path(args.image) if args.image else None,
                     max_new_tokens=args.max_new_tokens, seed=args.seed, device=_device(settings))
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError is a ValueError
        return _fail(str(exc))
    print(answer)
    return 0


def add_subparsers(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``model init|inspect|generate|ask`` on the ``unichar`` command."""
    model = subparsers.add_parser("model", help="the BAGEL / UniCharacter model: tiny model, inspection, trials")
    actions = model.add_subparsers(dest="model_action", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="write a model folder (--tiny: the small random test model)")
    init.add_argument("--tiny", action="store_true", help="write the tiny random model")
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    init.add_argument("directory")
    init.set_defaults(handler=_init)
    insp = actions.add_parser("inspect", help="what a model folder holds and what is missing or mismatched")
    insp.add_argument("directory")
    insp.set_defaults(handler=_inspect)
    gen = actions.add_parser("generate", help="text-to-image: write one PNG")
    gen.add_argument("directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", type=_png_file, required=True, help="PNG file to write")
    gen.add_argument("--size", type=_size, default=(1024, 1024), help="WIDTHxHEIGHT (default 1024x1024)")
    gen.add_argument("--steps", type=int, default=50, help="number of timesteps (default 50)")
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(handler=_generate)
    ask_ = actions.add_parser("ask", help="ask a question, optionally about an image")
    ask_.add_argument("directory")
    ask_.add_argument("--question", required=True)
    ask_.add_argument("--image", default=None, help="image file to ask about")
    ask_.add_argument("--max-new-tokens", type=at_least(1), default=256)
    ask_.add_argument("--seed", type=int, default=None)
    ask_.set_defaults(handler=_ask)
