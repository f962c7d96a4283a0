"""Speed and memory of the model runtime on one GPU: full-size BAGEL-7B-MoT, random bf16 weights (issue 3, item 6).

Random weights do the same arithmetic as real ones, so times and memory carry over. Measured, as
shared/BENCHMARKS.md measures the official code:
- seconds per 1024x1024 text-to-image (50 steps, cfg text 4.0, cfg image 1.0, interval 0.4-1.0, shift 3.0),
  through the public ``generate_image``; the official count is 90 LLM passes over 4098 query tokens;
- text prefill of 512 tokens and decode of 256 new tokens at batch 1, through the runtime's own prefill and
  decoder (the one ``generate_text`` loops over, with its one host read per token), replayed as a CUDA graph
  (the default) and step by step; the graph also under the loops ``generate_text`` used before (a token read
  before the next step is launched, with and without its per-token detokenising) as a same-card baseline;
- with ``--compare-plain``, the same first without the runtime's fused (torch.compile'd) norms, RoPE and MLP;
- images with the generation expert in bf16 and then in FP8 (``--image-fp8 compare``, the bench's default), with
  the FP8 error: one guided velocity of the first step (same inputs) against bf16, and the
  PSNR of the finished image against the bf16 one of the same seed (random weights make that a worst case);
- decode with a character's LoRA adapter (rank 64 on every target, as training writes one; random factors),
  through its own CUDA graph as ``generate_text`` decodes with one, and step by step as a same-card baseline;
  the image (in the last image row's arithmetic) with the same adapter;
- peak GPU memory (weights, then the peaks of image and text work).
Prints a table last and writes JSON. ``--tiny`` runs the same code on the tiny config on the CPU (a smoke test);
``--text-only`` skips images (and the steps without a graph).

Usage: python -m bench.model_bench [--out FILE] [--runs N] [--profile DIR] [--compare-plain] [--tiny] [--text-only]
                                  [--image-fp8 compare|on|off]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.model import lora
from core.model.api import ImageContexts, ImageParams, TextSegment
from core.model.config import BagelConfig, full_size_config
from core.model.decode import TextStream
from core.model.flow import guidance_active, timestep_schedule
from core.model.runtime import UniCharacterRuntime, _TextBlock
from core.model.tiny import TINY_LLM, TINY_VIT, random_lora_factors
from unichar.arguments import at_least

logger = logging.getLogger(__name__)

PROMPT = "A photograph of a cat sitting on a red chair in a sunny coffee shop, warm light, detailed, 35 mm film."
IMAGE = ImageParams(width=1024, height=1024, num_timesteps=50, timestep_shift=3.0, cfg_text_scale=4.0,
                    cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global", seed=0)
PROMPT_TOKENS, NEW_TOKENS = 512, 256
ADAPTER_RANK = 64  # what the /newcharacter training writes (training/sft.py)
GIB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of ``fn`` with the device drained before and after."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def llm_passes(params: ImageParams) -> int:
    """Branch passes the official sampler makes (its count; this runtime batches guided branches as rows)."""
    ts = timestep_schedule(params.num_timesteps, params.timestep_shift).tolist()[:-1]
    guided = 1 + (params.cfg_text_scale > 1.0) + (params.cfg_img_scale > 1.0)
    return sum(guided if guidance_active(t, params.cfg_interval) else 1 for t in ts)


def image_bench(
    rt: UniCharacterRuntime, params: ImageParams, runs: int, adapter: str | None = None
) -> tuple[dict[str, Any], Image.Image]:
    """Warm up on the same shapes (8 steps: guided and unguided ones), then time ``runs`` full images (with the
    adapter file ``adapter``, if given); returns the figures and the last image."""
    contexts = ImageContexts(cond=[TextSegment(PROMPT)])
    warm = dataclasses.replace(params, num_timesteps=8)
    timed(lambda: rt.generate_image(contexts, warm, adapter=adapter), rt.device)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    seconds, image = [], None
    for _ in range(runs):
        s, image = timed(lambda: rt.generate_image(contexts, params, adapter=adapter), rt.device)
        seconds.append(s)
    passes = llm_passes(params)
    best = min(seconds)
    return {"seconds": seconds, "median_s": statistics.median(seconds), "best_s": best, "official_passes": passes,
            "s_per_official_pass": best / passes, "peak_gib": _peak_gib(rt.device)}, image


def first_velocities(rt: UniCharacterRuntime, params: ImageParams) -> torch.Tensor:
    """The velocities (every guided row, before CFG) of an image's first denoising step, float32."""
    seen: list[torch.Tensor] = []
    velocity = rt.model.velocity
    rt.model.velocity = lambda hidden: seen.append(velocity(hidden).float()) or seen[-1]  # type: ignore[method-assign]
    try:
        rt.generate_image(ImageContexts(cond=[TextSegment(PROMPT)]), dataclasses.replace(params, num_timesteps=2))
    finally:
        del rt.model.velocity  # back to the class's method
    return seen[0]


def fp8_kernel_error(device: torch.device) -> dict[str, float]:
    """The fast FP8 quantisation kernels against their reference (dequantised outputs, relative L2 error)."""
    from core.model.projection import fast_fp8_kernels, quantize_rows, silu_mul_rows

    fast_rows, fast_gated = fast_fp8_kernels()
    x = torch.randn(4099, 2 * 18944, device=device, dtype=torch.bfloat16)
    gate, up = x.chunk(2, dim=-1)
    out = {}
    for name, ours, ref in (("rows", fast_rows(x[:, :3584]), quantize_rows(x[:, :3584])),
                            ("silu_mul_rows", fast_gated(gate, up), silu_mul_rows(gate, up))):
        a, b = (v.float() * s for v, s in (ours, ref))
        out[name] = float((a - b).norm() / b.norm())
    return out


def fp8_error(v_fp8: torch.Tensor, v_bf16: torch.Tensor, image_fp8: Image.Image, image_bf16: Image.Image
              ) -> dict[str, float]:
    """How far FP8 lands from bf16: one velocity on the same inputs, and the finished images of the same seed."""
    a, b = v_fp8.flatten(), v_bf16.flatten()
    pixels = [torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in (image_fp8, image_bf16)]
    mse = float(((pixels[0] - pixels[1]) ** 2).mean())
    return {"velocity_relative_l2": float((a - b).norm() / b.norm()),
            "velocity_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "image_psnr_db": float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)}


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def prompt_ids(rt: UniCharacterRuntime, tokens: int) -> list[int]:
    """A ``<|im_start|> ... <|im_end|>`` segment of exactly ``tokens`` ids (real text, cut by ids)."""
    ids: list[int] = []
    while len(ids) < tokens - 2:
        ids += rt.tokenizer.encode(PROMPT + " ")
    special = rt.tokenizer.special
    return [special.bos, *ids[: tokens - 2], special.eos]


def pipelined(rt: UniCharacterRuntime, new_tokens: int, adapter: lora.Adapter | None = None) -> None:
    """Greedy steps as ``generate_text`` runs them: one step ahead, detokenised by a ``TextStream``, streamed."""
    stream, pieces = TextStream(rt.tokenizer.decode), []
    for token in rt._decoder.tokens(lambda logits: logits.argmax(dim=-1), new_tokens, stop=None, adapter=adapter):
        piece = stream.push(token)
        if piece:
            pieces.append(piece)


def stepwise(rt: UniCharacterRuntime, new_tokens: int, *, detokenise: bool = False) -> None:
    """Greedy steps as ``generate_text`` ran them before: read each token, then launch the next step; with
    ``detokenise``, the host work it did per token too (decode all ids so far)."""
    ids: list[int] = []
    for _ in range(new_tokens):
        nxt = rt._decoder.step().argmax(dim=-1)
        ids.append(int(nxt))  # the loop's one host read per token
        rt._decoder.advance(nxt)
        if detokenise:
            rt.tokenizer.decode(ids)


DECODE_LOOPS: dict[str, Callable[[UniCharacterRuntime, int], None]] = {
    "one step ahead (generate_text)": pipelined,
    "one step at a time": stepwise,
    "one step at a time, all ids decoded a token": lambda rt, n: stepwise(rt, n, detokenise=True),
}


def text_bench(rt: UniCharacterRuntime, new_tokens: int,
               loop: Callable[[UniCharacterRuntime, int], None] = pipelined) -> dict[str, Any]:
    """Prefill a 512-token segment, then ``new_tokens`` greedy steps of the runtime's decoder run by ``loop``,
    never stopping early at ``<|im_end|>``."""
    ids = prompt_ids(rt, PROMPT_TOKENS)
    decoder = rt._decoder
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)

    def prefill() -> int:
        cache = decoder.reserve(len(ids) + 1 + new_tokens)
        return rt._prefill([_TextBlock(ids)], cache, row=0, offset=0)

    def decode(rope_id: int) -> None:
        decoder.start(len(ids), rt.tokenizer.special.bos, rope_id)
        loop(rt, new_tokens)

    with torch.inference_mode():
        timed(prefill, rt.device)  # warm-up
        prefill_s = min(timed(prefill, rt.device)[0] for _ in range(3))
        first_s, _ = timed(lambda: decode(prefill()), rt.device)  # warm-up: graph capture or compilation
        rope_id = prefill()
        decode_s, _ = timed(lambda: decode(rope_id), rt.device)
    return {"prompt_tokens": len(ids), "prefill_s": prefill_s, "prefill_tok_s": len(ids) / prefill_s,
            "new_tokens": new_tokens, "decode_s": decode_s, "decode_tok_s": new_tokens / decode_s,
            "ms_per_token": 1000 * decode_s / new_tokens, "first_decode_run_s": first_s,
            "peak_gib": _peak_gib(rt.device)}


@contextmanager
def random_adapter(rt: UniCharacterRuntime, rank: int = ADAPTER_RANK) -> Iterator[tuple[str, lora.Adapter]]:
    """A random adapter on every LoRA target of ``rt``'s model, written and loaded as a character's is, and active
    on the layers (through the runtime's gate) while the block runs; yields its file and the loaded adapter."""
    tensors = random_lora_factors(rt.model, rank, scale=0.01, dtype=rt.dtype)
    with tempfile.TemporaryDirectory() as folder:
        meta = lora.AdapterMeta(base_model_hash="random", rank=rank, alpha=2.0 * rank)
        path = str(lora.save_adapter(Path(folder) / "adapter.safetensors", tensors, meta))
        adapter = rt._adapter(path)
        with torch.inference_mode(), rt._gate.holding(adapter):
            yield path, adapter


def profile_image(rt: UniCharacterRuntime, params: ImageParams, path: Path) -> str:
    """A torch.profiler summary of a few denoising steps (CUDA kernels by total time)."""
    from torch.profiler import ProfilerActivity, profile

    short = dataclasses.replace(params, num_timesteps=6)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        rt.generate_image(ImageContexts(cond=[TextSegment(PROMPT)]), short)
        _sync(rt.device)
    sort = "cuda_time_total" if rt.device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90)
    path.write_text(table, encoding="utf-8")
    return table


def build(tiny: bool, compile_kernels: bool | None, image_fp8: bool | None = False) -> UniCharacterRuntime:
    """The full-size (or tiny) random runtime; ``image_fp8`` None: FP8 where the GPU supports it."""
    cfg = BagelConfig(llm=TINY_LLM, vit=TINY_VIT) if tiny else full_size_config()
    device = "cpu" if tiny else "cuda"
    return UniCharacterRuntime.random(cfg, device=device, dtype=torch.bfloat16, compile_kernels=compile_kernels,
                                      image_fp8=image_fp8)


def variant(rt: UniCharacterRuntime, **options: Any) -> UniCharacterRuntime:
    """Another runtime over the same weights (``compile_kernels`` changes the model for good: use it last)."""
    return UniCharacterRuntime(rt.model, rt.vae, rt.tokenizer, **options)


def environment(rt: UniCharacterRuntime) -> dict[str, Any]:
    card = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"
    params = sum(p.numel() for p in rt.model.parameters()) + sum(p.numel() for p in rt.vae.parameters())
    return {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda, "params": params,
            "weights_gib": torch.cuda.memory_allocated(rt.device) / GIB if rt.device.type == "cuda" else None}


def table(results: dict[str, Any]) -> str:
    env, size = results["environment"], f"{results['settings']['width']}x{results['settings']['height']}"
    rows = [("card", env["card"]), ("parameters (model + VAE)", f"{env['params'] / 1e9:.2f} B")]
    if env["weights_gib"] is not None:
        rows.append(("weights on the GPU", f"{env['weights_gib']:.1f} GiB"))
    for name, img in results["image"].items():
        rows += [(f"{size} image ({name})", (f"{img['best_s']:.2f} s best, {img['median_s']:.2f} s median, "
                  f"{1000 * img['s_per_official_pass']:.0f} ms per official pass ({img['official_passes']})"))]
        if "error_vs_bf16" in img:
            err = img["error_vs_bf16"]
            rows.append((f"  {name} against bf16", (f"first velocity: relative L2 {err['velocity_relative_l2']:.4f}, "
                         f"cosine {err['velocity_cosine']:.5f}; image PSNR {err['image_psnr_db']:.1f} dB")))
        if img["peak_gib"] is not None:
            rows.append((f"  peak GPU memory ({name})", f"{img['peak_gib']:.1f} GiB"))
    for name, text in results["text"].items():
        rows += [(f"prefill {text['prompt_tokens']} tokens ({name})", (f"{text['prefill_tok_s']:,.0f} tokens/s "
                  f"({1000 * text['prefill_s']:.1f} ms)")),
                 (f"decode {text['new_tokens']} tokens ({name})", (f"{text['decode_tok_s']:.1f} tokens/s "
                  f"({text['ms_per_token']:.2f} ms a token)"))]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("model_bench.json"))
    parser.add_argument("--runs", type=at_least(1), default=2, help="timed images after the warm-up")
    parser.add_argument("--profile", type=Path, help="folder for a torch.profiler summary of a short image")
    parser.add_argument("--compare-plain", action="store_true",
                        help="first time the runtime without its compiled (fused) kernels")
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU, 64x64, 4 steps: a smoke test")
    parser.add_argument("--text-only", action="store_true", help="decode loops only: no images, no graph-less steps")
    parser.add_argument("--image-fp8", choices=("compare", "on", "off"), default="compare",
                        help="generation expert in FP8: bf16 then FP8 in the same run (compare), or one of them")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    rt = build(args.tiny, compile_kernels=False if args.compare_plain else None, image_fp8=args.image_fp8 == "on")
    image = IMAGE if not args.tiny else dataclasses.replace(IMAGE, width=64, height=64, num_timesteps=4)
    new_tokens = NEW_TOKENS if not args.tiny else 16
    results: dict[str, Any] = {"environment": environment(rt), "settings": dataclasses.asdict(image),
                               "image": {}, "text": {}}
    logger.info("built %s on %s", "tiny" if args.tiny else "full size", results["environment"]["card"])

    def record(kind: str, name: str, value: dict[str, Any]) -> None:
        results[kind][name] = value
        logger.info("%s %s: %s", kind, name, value)
        args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")  # partial results survive a timeout

    if args.compare_plain:
        if not args.text_only:
            record("image", "plain kernels", image_bench(rt, image, args.runs)[0])
        record("text", "plain kernels", text_bench(rt, new_tokens))
        rt = variant(rt, compile_kernels=None, image_fp8=args.image_fp8 == "on")  # fused kernels on CUDA
    if not args.text_only:
        figures, picture = image_bench(rt, image, args.runs)
        record("image", {"on": "fp8", "off": "bf16", "compare": "bf16"}[args.image_fp8], figures)
        if args.image_fp8 == "compare":
            v_bf16 = first_velocities(rt, image)
            rt = variant(rt, image_fp8=True)
            figures, picture_fp8 = image_bench(rt, image, args.runs)
            figures["error_vs_bf16"] = fp8_error(first_velocities(rt, image), v_bf16, picture_fp8, picture)
            figures["kernel_error"] = fp8_kernel_error(rt.device)
            record("image", "fp8", figures)
    for name, loop in DECODE_LOOPS.items():
        record("text", name, text_bench(rt, new_tokens, loop))
    with random_adapter(rt) as (path, adapter):
        if not args.text_only:
            arithmetic = "bf16" if args.image_fp8 == "off" else "fp8"
            record("image", f"{arithmetic}, rank-{ADAPTER_RANK} adapter",
                   image_bench(rt, image, args.runs, adapter=path)[0])
        record("text", f"rank-{ADAPTER_RANK} adapter, its graph (generate_text)",
               text_bench(rt, new_tokens, lambda rt, n: pipelined(rt, n, adapter)))
        graphs, rt._decoder.use_graphs = rt._decoder.use_graphs, False  # the baseline: how it decoded before
        record("text", f"rank-{ADAPTER_RANK} adapter, step by step", text_bench(rt, new_tokens,
               lambda rt, n: pipelined(rt, n, adapter)))
        rt._decoder.use_graphs = graphs
    if rt.device.type == "cuda" and not args.text_only:
        record("text", "steps without CUDA graph", text_bench(variant(rt, cuda_graphs=False), new_tokens))
    if args.profile:
        print(profile_image(rt, image, args.profile / "profile.txt")[:4000])
    print(table(results))


if __name__ == "__main__":
    main()
