"""The runtime behind CharacterModel on the tiny model: text, VQA, images, seeds, streaming, bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.model.api import (
    CharacterModel,
    ImageContexts,
    ImageParams,
    ImageSegment,
    TextParams,
    TextSegment,
)
from core.model.runtime import UniCharacterRuntime
from tests.model.adapters import write_random_adapter

FAST = {"width": 48, "height": 32, "num_timesteps": 4}


def _photo(seed: int = 0, size: tuple[int, int] = (90, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_implements_the_model_interface(runtime: UniCharacterRuntime) -> None:
    assert isinstance(runtime, UniCharacterRuntime)
    model: CharacterModel = runtime  # structural check for the type checker
    assert model.count_tokens("hello") == len(runtime.tokenizer.encode("hello")) + 2


def test_text_is_deterministic_under_a_seed(runtime: UniCharacterRuntime) -> None:
    ctx = [TextSegment("Character Description: a cat."), TextSegment("User Input: hi")]
    params = TextParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first = runtime.generate_text(ctx, params)
    assert runtime.generate_text(ctx, params) == first
    others = {runtime.generate_text(ctx, TextParams(max_new_tokens=12, temperature=1.0, seed=s)) for s in range(4)}
    assert len(others) > 1


def test_streaming_sees_every_token(runtime: UniCharacterRuntime) -> None:
    pieces: list[str] = []
    out = runtime.generate_text([TextSegment("hello")], TextParams(max_new_tokens=16, temperature=1.0, seed=3),
                                on_text=pieces.append)
    assert "".join(pieces) == out and all(pieces)


def test_greedy_reply_equals_argmax_of_a_full_forward(runtime: UniCharacterRuntime) -> None:
    """The whole cached path (prefill, <|im_start|>, static decode) against one uncached forward."""
    tok, lm = runtime.tokenizer, runtime.model.language_model
    out_ids: list[int] = []
    runtime_ids = tok.segment("what is this") + [tok.special.bos]
    with torch.inference_mode():
        for _ in range(6):
            ids = torch.tensor([runtime_ids + out_ids])
            logits = lm.logits(lm.model(lm.model.embed_tokens(ids), torch.arange(ids.shape[1])[None], causal=True))
            logits[..., tok.size :] = float("-inf")
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.special.eos:
                break
            out_ids.append(nxt)
    got = runtime.generate_text([TextSegment("what is this")], TextParams(max_new_tokens=6, temperature=0.0))
    assert got == tok.decode(out_ids)


def test_vqa_on_images_runs_and_stops_at_the_limit(runtime: UniCharacterRuntime) -> None:
    ctx = [ImageSegment(_photo(1)), ImageSegment(_photo(2, (40, 300))), TextSegment("What is in the picture?")]
    answer = runtime.generate_text(ctx, TextParams(max_new_tokens=5, temperature=0.0))
    assert isinstance(answer, str)
    assert len(runtime.tokenizer.encode(answer)) <= 5 + 2  # byte-level merges may re-split slightly
    assert runtime.generate_text(ctx, TextParams(max_new_tokens=5, temperature=0.0)) == answer


def test_text_to_image_is_a_reproducible_png_of_the_requested_size(runtime: UniCharacterRuntime) -> None:
    contexts = ImageContexts(cond=[TextSegment("a cat on a chair")])
    steps: list[tuple[int, int]] = []
    image = runtime.generate_image(contexts, ImageParams(**FAST, seed=11), on_progress=lambda d, t: steps.append((d, t)))
    assert image.size == (48, 32) and image.mode == "RGB"
    assert steps == [(1, 3), (2, 3), (3, 3)]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).size == (48, 32)
    again = runtime.generate_image(contexts, ImageParams(**FAST, seed=11))
    assert np.array_equal(np.asarray(image), np.asarray(again))
    other = runtime.generate_image(contexts, ImageParams(**FAST, seed=12))
    assert not np.array_equal(np.asarray(image), np.asarray(other))


def test_fp8_images_stay_close_to_bf16_and_text_is_unchanged(runtime: UniCharacterRuntime, tiny_dir: Path) -> None:
    fp8 = UniCharacterRuntime.load(tiny_dir, device="cpu", image_fp8=True)
    contexts, params = ImageContexts(cond=[TextSegment("a cat on a chair")]), ImageParams(**FAST, seed=11)
    ours, ref = (np.asarray(rt.generate_image(contexts, params), dtype=np.float32) for rt in (fp8, runtime))
    assert ours.shape == ref.shape
    assert 0 < np.abs(ours - ref).mean() < 8  # pixel values 0-255: FP8 rounding, not another picture
    text = TextParams(max_new_tokens=8, temperature=0.0)
    prompt = [TextSegment("hello there")]
    assert fp8.generate_text(prompt, text) == runtime.generate_text(prompt, text)


def test_odd_sizes_come_back_at_the_requested_size(runtime: UniCharacterRuntime) -> None:
    image = runtime.generate_image(ImageContexts(cond=[TextSegment("x")]), ImageParams(width=50, height=21, num_timesteps=2, seed=0))
    assert image.size == (50, 21)


def test_editing_with_three_cfg_branches_runs(runtime: UniCharacterRuntime) -> None:
    photo = _photo(4, (64, 64))  # the VAE transform makes it 512x512, the smallest it allows
    contexts = ImageContexts(
        cond=[ImageSegment(photo, vit=True, vae=True), TextSegment("make it blue")],
        text_uncond=[ImageSegment(photo, vit=True, vae=True)],
        image_uncond=[TextSegment("make it blue")],
    )
    params = ImageParams(**FAST, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel", seed=5)
    assert runtime.generate_image(contexts, params).size == (48, 32)


@pytest.mark.parametrize(
    ("cond", "uncond"),
    [
        ([TextSegment("a long prompt about a red cat on a chair")], [TextSegment("x")]),  # its own prefill
        ([TextSegment("persona text"), TextSegment("draw the scene")], [TextSegment("persona text")]),  # fan-out
        ([TextSegment("draw a cat")], []),  # pure text-to-image: an empty unconditional context
    ],
)
def test_cfg_rows_in_one_batch_equal_separate_passes(runtime: UniCharacterRuntime, cond, uncond) -> None:
    """Left-padded batched CFG rows (prefilled or fanned out) give each branch exactly its own context's velocity."""
    params = ImageParams(width=32, height=32, num_timesteps=2, cfg_text_scale=4.0, cfg_interval=(0.0, 1.0), seed=1)
    velocities = {}

    def capture(rt: UniCharacterRuntime, contexts: ImageContexts, p: ImageParams, key: str) -> None:
        original = rt.model.velocity
        rt.model.velocity = lambda h: velocities.setdefault(key, original(h))  # type: ignore[method-assign]
        try:
            rt.generate_image(contexts, p)
        finally:
            del rt.model.velocity

    capture(runtime, ImageContexts(cond=cond, text_uncond=uncond), params, "batched")
    no_cfg = ImageParams(width=32, height=32, num_timesteps=2, cfg_text_scale=1.0, seed=1)
    capture(runtime, ImageContexts(cond=cond), no_cfg, "cond")
    capture(runtime, ImageContexts(cond=uncond), no_cfg, "uncond")
    batched = velocities["batched"]
    torch.testing.assert_close(batched[:1], velocities["cond"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched[1:2], velocities["uncond"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "params",
    [ImageParams(width=2048, height=64), ImageParams(width=0, height=64), ImageParams(num_timesteps=1),
     ImageParams(cfg_interval=(0.8, 0.2)), ImageParams(timestep_shift=0.0)],
)
def test_bad_image_params_are_refused(runtime: UniCharacterRuntime, params: ImageParams) -> None:
    with pytest.raises(ValueError):
        runtime.generate_image(ImageContexts(cond=[TextSegment("x")]), params)


@pytest.mark.parametrize("params", [TextParams(max_new_tokens=0), TextParams(temperature=-1), TextParams(top_p=0)])
def test_bad_text_params_are_refused(runtime: UniCharacterRuntime, params: TextParams) -> None:
    with pytest.raises(ValueError):
        runtime.generate_text([TextSegment("x")], params)


def test_a_raising_callback_stops_the_work(runtime: UniCharacterRuntime) -> None:
    def cancel(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runtime.generate_image(ImageContexts(cond=[TextSegment("x")]), ImageParams(**FAST), on_progress=cancel)
    assert runtime.generate_text([TextSegment("x")], TextParams(max_new_tokens=2, temperature=0.0)) is not None


def test_missing_adapter_file_is_a_clear_error(runtime: UniCharacterRuntime, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="adapter"):
        runtime.generate_text([TextSegment("x")], TextParams(max_new_tokens=2), adapter=str(tmp_path / "none.safetensors"))


def test_a_character_adapter_changes_replies_and_is_switched_off_after(runtime: UniCharacterRuntime, tiny_dir: Path,
                                                                       tmp_path: Path) -> None:
    path = write_random_adapter(runtime, tiny_dir, tmp_path / "char.safetensors", seed=0)
    ctx, params = [TextSegment("hello there")], TextParams(max_new_tokens=8, temperature=0.0)
    base = runtime.generate_text(ctx, params)
    adapted = runtime.generate_text(ctx, params, adapter=str(path))
    assert adapted != base
    assert runtime.generate_text(ctx, params) == base
    assert runtime.generate_text(ctx, params, adapter=str(path)) == adapted


def test_concurrent_requests_are_serialised_and_unaffected(runtime: UniCharacterRuntime) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ctx = [TextSegment("tell me a story")]
    params = [TextParams(max_new_tokens=8, temperature=1.0, seed=s) for s in range(4)]
    alone = [runtime.generate_text(ctx, p) for p in params]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: runtime.generate_text(ctx, p), params))
    assert together == alone


def test_random_weights_build_without_files_for_benchmarks() -> None:
    from core.model.config import BagelConfig
    from core.model.tiny import TINY_LLM, TINY_VIT
    from core.model.vae import AutoEncoderParams

    cfg = BagelConfig(llm=TINY_LLM, vit=TINY_VIT)
    rt = UniCharacterRuntime.random(cfg, device="cpu", seed=3, vae_params=AutoEncoderParams.tiny())
    assert rt.dtype == torch.float32 and not any(p.is_meta for p in rt.model.parameters())
    assert isinstance(rt.generate_text([TextSegment("hi")], TextParams(max_new_tokens=3, temperature=0.0)), str)
    image = rt.generate_image(ImageContexts(cond=[TextSegment("x")]), ImageParams(width=32, height=32, num_timesteps=2))
    assert image.size == (32, 32)
