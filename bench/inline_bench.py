"""Inline scene images (issue 8): time from a user's message to the first text token and to the scene image, while
text replies for other users keep streaming on the same GPU.

Full-size BAGEL-7B-MoT with random bf16 weights (``UniCharacterRuntime.random``; random weights do the real
arithmetic). The user's turn is the paper's role-play prompt of about 1,000 tokens through the public
``generate_text`` with a streaming callback; then a 1024x1024 image (50 steps, cfg text 4.0 / image 1.0, interval
0.4-1.0, shift 3.0) from the scene-image prompt built on that reply. Meanwhile a second thread plays other users:
~600-token prompts, replies streamed token by token, a pause between replies. Reported: first text token (alone,
and with the other users running), the image's time, the other users' tokens/s while the image renders, their
worst gap between two tokens of one reply, and their worst wait for a reply's first token.
Prints a table last and writes JSON. ``--tiny`` runs the same code on the tiny config on the CPU (a smoke test).

Usage: python -m bench.inline_bench [--out FILE] [--other-pause S [S ...]] [--tiny] [--image-fp8 on|off]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.model_bench import IMAGE, build
from core.model.api import ImageContexts, ImageParams, TextParams, TextSegment
from core.model.roleplay import response_prompt, scene_image_prompt
from core.model.runtime import UniCharacterRuntime

logger = logging.getLogger(__name__)

NAME = "Mira"
PERSONA = (
    "Mira is a 27-year-old lighthouse keeper on a windswept northern island, with copper hair tied in a loose "
    "braid, freckles, grey-green eyes and a thick cable-knit sweater the colour of sea foam. She is wry, curious and "
    "kind, collects sea glass, talks to the gulls, and keeps a logbook of every ship that passes. "
)
OPENING = "The lamp room hums as Mira turns from the window. 'You made it up all 212 steps. Tea?'"
USER_TEXT = "Show me the view from up here while the storm rolls in, and you beside me."
REPLY = "Mira laughs and pulls you to the glass: the storm front rolls in over the dark water, lit by the beam."
USER_TOKENS, OTHER_TOKENS = 1000, 600
USER_NEW, OTHER_NEW = 128, 96


def roleplay_prompt(rt: UniCharacterRuntime, tokens: int, user_text: str) -> str:
    """The paper's role-play prompt, its history grown until the whole turn has about ``tokens`` tokens."""
    history: list[tuple[str, str]] = []
    while True:
        prompt = response_prompt(NAME, PERSONA, OPENING, user_text, history)
        if rt.count_tokens(prompt) >= tokens:
            return prompt
        turn = len(history) // 2
        history += [("User", f"Tell me about ship number {turn} in your logbook."),
                    (NAME, f"Ship {turn} was a rusty trawler called the Gannet; its captain waved at me at dawn.")]


@dataclasses.dataclass
class Stream:
    """Timestamps of one reply's pieces (each ``on_text`` call: one or a few tokens)."""

    asked: float
    pieces: list[float] = dataclasses.field(default_factory=list)

    def piece(self, _text: str) -> None:
        self.pieces.append(time.perf_counter())


class OtherUsers(threading.Thread):
    """Streams replies for other users, one after another with a pause, until stopped."""

    def __init__(self, rt: UniCharacterRuntime, prompt: str, pause: float) -> None:
        super().__init__(daemon=True)
        self.rt, self.prompt, self.pause = rt, prompt, pause
        self.streams: list[Stream] = []
        self.stop = threading.Event()

    def run(self) -> None:
        seed = 0
        while not self.stop.is_set():
            stream = Stream(asked=time.perf_counter())
            self.streams.append(stream)
            params = TextParams(max_new_tokens=OTHER_NEW, temperature=0.0, seed=seed)
            self.rt.generate_text([TextSegment(self.prompt)], params, on_text=stream.piece)
            seed += 1
            self.stop.wait(self.pause)

    def during(self, start: float, end: float) -> dict[str, Any]:
        """Tokens/s, worst gap inside a reply, and worst wait for a first token, within ``[start, end]``.

        A reply still waiting at ``end`` counts its wait up to ``end``, so starved requests are not left out.
        """
        pieces = [t for s in self.streams for t in s.pieces if start <= t <= end]
        gaps = [b - a for s in self.streams for a, b in zip(s.pieces, s.pieces[1:]) if start <= b <= end]
        waits = [(s.pieces[0] if s.pieces else end) - s.asked for s in self.streams
                 if s.asked <= end and (not s.pieces or s.pieces[0] >= start)]
        return {"replies_asked": sum(start <= s.asked <= end for s in self.streams), "pieces": len(pieces),
                "tokens_per_s": len(pieces) / (end - start), "worst_gap_s": max(gaps, default=None),
                "worst_first_token_wait_s": max(waits, default=None)}


def user_turn(rt: UniCharacterRuntime, prompt: str, scene: str, image: ImageParams) -> dict[str, Any]:
    """One user's message: the reply streams (first token timed), then the scene image; seconds from the message."""
    t0 = time.perf_counter()
    pieces: list[float] = []
    rt.generate_text([TextSegment(prompt)], TextParams(max_new_tokens=USER_NEW, temperature=0.0, seed=1),
                     on_text=lambda _: pieces.append(time.perf_counter()))
    text_done = time.perf_counter()
    image_start = time.perf_counter()
    rt.generate_image(ImageContexts(cond=[TextSegment(scene)], text_uncond=[]), image)
    _sync(rt)
    end = time.perf_counter()
    return {"first_token_s": pieces[0] - t0 if pieces else None, "reply_s": text_done - t0,
            "reply_pieces": len(pieces), "image_s": end - image_start, "to_image_s": end - t0,
            "image_window": (image_start, end)}


def _sync(rt: UniCharacterRuntime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def table(results: dict[str, Any]) -> str:
    alone = results["alone"]

    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} s"

    rows = [
        ("card", results["card"]),
        ("user prompt tokens", str(results["user_prompt_tokens"])),
        ("first text token, GPU otherwise idle", s(alone["first_token_s"])),
        ("image after the reply / message to image, idle", f"{s(alone['image_s'])} / {s(alone['to_image_s'])}"),
    ]
    for pause, busy in results["with_other_users"].items():
        others = busy["other_users_during_image"]
        rows += [
            (f"other users, {pause} s between replies:", ""),
            ("  first text token", s(busy["first_token_s"])),
            ("  image after the reply / message to image", f"{s(busy['image_s'])} / {s(busy['to_image_s'])}"),
            ("  their tokens/s during the image",
             f"{others['tokens_per_s']:.1f} ({others['replies_asked']} replies asked)"),
            ("  their worst gap inside a reply", s(others["worst_gap_s"])),
            ("  their worst wait for a first token", s(others["worst_first_token_wait_s"])),
        ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("inline_bench.json"))
    parser.add_argument("--other-pause", type=float, nargs="+", default=[0.5, 2.0],
                        help="seconds between the other users' replies (one measured turn per value)")
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU, 64x64, 4 steps: a smoke test")
    parser.add_argument("--image-fp8", choices=("on", "off"), default="off",
                        help="the generation expert in FP8 (UNICHAR_IMAGE_FP8) or in bf16 (the default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    rt = build(args.tiny, compile_kernels=None, image_fp8=args.image_fp8 == "on")
    image = IMAGE if not args.tiny else dataclasses.replace(IMAGE, width=64, height=64, num_timesteps=4)
    prompt = roleplay_prompt(rt, USER_TOKENS if not args.tiny else 200, USER_TEXT)
    other = roleplay_prompt(rt, OTHER_TOKENS if not args.tiny else 120, "What ships passed today?")
    scene = scene_image_prompt(PERSONA, USER_TEXT, REPLY)
    card = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"
    results: dict[str, Any] = {"card": card, "image_fp8": args.image_fp8, "user_prompt_tokens": rt.count_tokens(prompt),
                               "other_prompt_tokens": rt.count_tokens(other), "settings": dataclasses.asdict(image)}

    # warm-up on the same shapes: kernels compiled, the decode graph captured for the largest cache
    user_turn(rt, prompt, scene, dataclasses.replace(image, num_timesteps=8))
    rt.generate_text([TextSegment(other)], TextParams(max_new_tokens=4, temperature=0.0))

    results["alone"] = {k: v for k, v in user_turn(rt, prompt, scene, image).items() if k != "image_window"}
    logger.info("alone: %s", results["alone"])
    args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    results["with_other_users"] = {}
    for pause in args.other_pause:
        others = OtherUsers(rt, other, pause)
        others.start()
        time.sleep(0.2 if not args.tiny else 0.0)  # let the other users' first reply get going
        busy = user_turn(rt, prompt, scene, image)
        others.stop.set()
        others.join()
        busy["other_users_during_image"] = others.during(*busy.pop("image_window"))
        results["with_other_users"][str(pause)] = busy
        logger.info("other users every %s s: %s", pause, busy)
        args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")  # partial results survive a timeout
    print(table(results))


if __name__ == "__main__":
    main()
