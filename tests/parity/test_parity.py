"""Parity with the official ByteDance-Seed/Bagel code on the same random tiny weights (issue 3, item 5).

Runs only when ``BAGEL_REFERENCE_DIR`` points at a checkout of the official repository and
``BAGEL_REFERENCE_PYTHON`` at a Python whose environment can import it (transformers 4.49, einops, accelerate;
MODEL.md 11.9). The reference runs in that interpreter, in a subprocess (``reference_runner.py``), and saves its
inputs and outputs; this side replays the same inputs through the project's runtime and compares.

Setting it up (nothing of it enters the repository): ``git clone`` ByteDance-Seed/Bagel somewhere outside it; make a
virtual environment with torch 2.13.0 (or a ``.pth`` file pointing at this project's site-packages for torch),
``pip install transformers==4.49.0 einops accelerate``; then
``BAGEL_REFERENCE_DIR=... BAGEL_REFERENCE_PYTHON=.../bin/python pytest tests/parity -s``. The ``flash_attn`` the
reference imports is ``standin/flash_attn`` (SDPA), put on its path by this test.

The reference runs as published: bf16 weights under autocast (what its inferencer does on a GPU), the VAE in fp32.
The project runs in float32 (its CPU default) and in bfloat16; tolerances are bf16's, and every comparison prints
its max and mean absolute difference (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.model.api import ImageContexts, ImageParams, TextParams, TextSegment
from core.model.flow import cfg_combine
from core.model.kv_cache import CacheSpan
from core.model.runtime import UniCharacterRuntime, _ImageBlock, _TextBlock
from core.model.sampling import mask_padding_rows
from core.model.tiny import write_tiny_model
from core.model.transforms import (
    LATENT_MAX_PATCHES_PER_SIDE,
    VIT_MAX_PATCHES_PER_SIDE,
    flattened_position_ids,
    patchify,
)

HERE = Path(__file__).parent
REFERENCE_DIR = os.environ.get("BAGEL_REFERENCE_DIR")
REFERENCE_PYTHON = os.environ.get("BAGEL_REFERENCE_PYTHON")

pytestmark = pytest.mark.skipif(
    not (REFERENCE_DIR and REFERENCE_PYTHON and Path(REFERENCE_DIR, "inferencer.py").is_file()),
    reason="set BAGEL_REFERENCE_DIR (an official Bagel checkout) and BAGEL_REFERENCE_PYTHON (its interpreter)",
)

# Allowed max abs difference as a fraction of the reference's largest magnitude (times the CFG gain): the reference
# rounds through bf16 everywhere, so about 1% is its own noise; a wrong rope id, time or context moves outputs by
# 5% to 50% on the unit-gain weights.
RELATIVE_TOLERANCE = 2e-2


@dataclass(frozen=True)
class Reference:
    tensors: dict[str, torch.Tensor]
    meta: dict


def redraw_unit_gain(path: Path, seed: int) -> None:
    """Re-draw ``ema.safetensors`` so every path moves the outputs: unit-gain matrices, random norm scales.

    The tiny model's std-0.02 init leaves the residual stream dominated by the embeddings; its velocities then
    barely depend on t or on the prompt, so a wrong time embedding or context would pass unnoticed. Norm scales
    are drawn around 1 so that using the other expert's norm shows. The sin-cos tables stay as they are.
    """
    state = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    redrawn = {}
    for name, t in sorted(state.items()):
        if name.endswith("pos_embed"):
            redrawn[name] = t
            continue
        if t.ndim == 2:  # Linear [out, in], or an embedding table [rows, dim]
            std = 1.0 if "embed_tokens" in name or "position_embedding" in name else t.shape[1] ** -0.5
            new = torch.randn(t.shape, generator=gen) * std
        elif "norm" in name and name.endswith("weight"):
            new = 1 + 0.3 * torch.randn(t.shape, generator=gen)
        else:  # biases
            new = 0.1 * torch.randn(t.shape, generator=gen)
        redrawn[name] = new.to(t.dtype).contiguous()
    save_file(redrawn, str(path))


@pytest.fixture(scope="module", params=["tiny", "unit-gain"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as written, and the same folder with unit-gain weights (see :func:`redraw_unit_gain`)."""
    directory = write_tiny_model(tmp_path_factory.mktemp(request.param), seed=0)
    if request.param == "unit-gain":
        redraw_unit_gain(directory / "ema.safetensors", seed=1)
    return directory


@pytest.fixture(scope="module")
def reference(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    out = tmp_path_factory.mktemp("reference")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([REFERENCE_DIR, str(HERE / "standin")])}
    proc = subprocess.run(
        [REFERENCE_PYTHON, str(HERE / "reference_runner.py"), str(model_dir), str(out)],
        cwd=REFERENCE_DIR, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"the reference run failed:\n{proc.stderr[-4000:]}"
    meta = json.loads((out / "reference.json").read_text(encoding="utf-8"))
    return Reference(load_file(str(out / "reference.safetensors")), meta)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def runtime(request: pytest.FixtureRequest, model_dir: Path) -> UniCharacterRuntime:
    return UniCharacterRuntime.load(model_dir, device="cpu", dtype=request.param)


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, rt: UniCharacterRuntime, gain: float = 1.0) -> None:
    """Assert ``max|ours - ref| <= 2% * gain * max|ref|`` and print max/mean absolute differences."""
    ours, ref = ours.float().cpu(), ref.float().cpu()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    diff, scale = (ours - ref).abs(), float(ref.abs().max())
    variant = f"{rt.model_dir.name.rstrip('0123456789')}, {str(rt.dtype).removeprefix('torch.')}"
    line = (f"{name} [{variant}]: max abs diff {diff.max():.3e} "
            f"({float(diff.max()) / scale:.2%} of max |ref| {scale:.3e}), mean abs diff {diff.mean():.3e}")
    print(line)
    torch.testing.assert_close(ours, ref, atol=RELATIVE_TOLERANCE * gain * scale, rtol=0, msg=lambda m: f"{line}\n{m}")


def _forward(rt: UniCharacterRuntime, x: torch.Tensor, rope: int, cache, span: CacheSpan, *, text: bool,
             mixed: bool = False) -> torch.Tensor:
    """One decoder pass of a block at rope id ``rope`` (text counts up from it; images share it)."""
    L = x.shape[1]
    positions = torch.arange(rope, rope + L)[None] if text else torch.full((x.shape[0], 1), rope)
    return rt.model.language_model.model(x, positions, cache=cache, span=span, causal=text, mixed=mixed)


def teacher_forced_logits(rt: UniCharacterRuntime, blocks: list, fed: list[int]) -> torch.Tensor:
    """Prefill ``blocks``, then feed ``fed`` one token at a time through the cache; logits of every step."""
    length = sum(b.length for b in blocks)
    cache = rt._new_cache(rows=1, capacity=length + len(fed))
    rope = rt._prefill(blocks, cache, row=0, offset=0)  # the next rope id
    logits = []
    for i, token in enumerate(fed):
        pos = length + i
        span = CacheSpan(rows=slice(0, 1), start=0, write=pos, end=pos + 1)
        hidden = _forward(rt, rt.model.embed_text(torch.tensor([[token]])), rope + i, cache, span, text=True)
        logits.append(rt.model.language_model.logits(hidden[:, -1]))
    return torch.cat(logits)


def vit_block(rt: UniCharacterRuntime, image: torch.Tensor) -> _ImageBlock:
    p = rt.cfg.vit.patch_size
    pos = flattened_position_ids(image.shape[1] // p, image.shape[2] // p, VIT_MAX_PATCHES_PER_SIDE)
    return _ImageBlock(patchify(image, p), pos, vit=True)


def test_tokenization_matches(runtime: UniCharacterRuntime, reference: Reference) -> None:
    meta = reference.meta
    assert runtime.tokenizer.segment(meta["prompt"]) == meta["text.prompt_ids"]
    ids = meta["new_token_ids"]
    special = runtime.tokenizer.special
    assert (special.bos, special.eos, special.vision_start, special.vision_end) == (
        ids["bos_token_id"], ids["eos_token_id"], ids["start_of_image"], ids["end_of_image"])


def test_text_logits(runtime: UniCharacterRuntime, reference: Reference) -> None:
    rt, meta, ref = runtime, reference.meta, reference.tensors
    ids = meta["text.prompt_ids"]
    with torch.inference_mode():
        hidden = rt.model.language_model.model(rt.model.embed_text(torch.tensor([ids])), torch.arange(len(ids))[None],
                                               causal=True)
        compare("text prefill logits", rt.model.language_model.logits(hidden)[0], ref["text.prefill_logits"], rt)
        decoded = teacher_forced_logits(rt, [_TextBlock(ids)], meta["text.decode_ids"])
    compare("text decode logits (teacher-forced, cached)", decoded, ref["text.decode_logits"], rt)


def test_greedy_first_token(runtime: UniCharacterRuntime, reference: Reference) -> None:
    """The public decode picks the reference's best token among real (non-padding) rows."""
    logits = mask_padding_rows(reference.tensors["text.decode_logits"][:1].clone(), runtime.tokenizer.size)
    expected = int(logits.argmax())
    text = runtime.generate_text([TextSegment(reference.meta["prompt"])], TextParams(max_new_tokens=1, temperature=0))
    assert text == ("" if expected == runtime.tokenizer.special.eos else runtime.tokenizer.decode([expected]))


def test_vit_features(runtime: UniCharacterRuntime, reference: Reference) -> None:
    rt, ref = runtime, reference.tensors
    images = [ref["vit.image0"], ref["vit.image1"]]
    blocks = [vit_block(rt, im) for im in images]
    lens = torch.tensor([b.tokens.shape[0] for b in blocks])
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    tokens, pos = torch.cat([b.tokens for b in blocks]), torch.cat([b.position_ids for b in blocks])
    with torch.inference_mode():
        compare("ViT features (2 packed images)", rt.model.vit_model(tokens, cu, pos), ref["vit.features"], rt)
        embeds = rt.model.embed_vit(tokens, cu, pos, int(lens.max()))
    compare("ViT block LLM inputs (connector + sin-cos)", embeds, ref["vit.llm_inputs"], rt)


def test_vqa_logits(runtime: UniCharacterRuntime, reference: Reference) -> None:
    rt, meta, ref = runtime, reference.meta, reference.tensors
    blocks = [vit_block(rt, ref["vit.image0"]), _TextBlock(rt.tokenizer.segment(meta["question"]))]
    with torch.inference_mode():
        logits = teacher_forced_logits(rt, blocks, meta["vqa.decode_ids"])
    compare("VQA decode logits (ViT block + question)", logits, ref["vqa.decode_logits"], rt)


def velocity(
    rt: UniCharacterRuntime, plans: list[list], x_t: torch.Tensor, grid: tuple[int, int], t: float
) -> torch.Tensor:
    """Velocities of every branch at flow time ``t`` (one left-padded cache row per context)."""
    lengths = [sum(b.length for b in blocks) for blocks in plans]
    P, Q = max(lengths), grid[0] * grid[1] + 2
    cache = rt._new_cache(rows=len(plans), capacity=P + Q)
    ropes = [rt._prefill(blocks, cache, row, P - n) for row, (blocks, n) in enumerate(zip(plans, lengths))]
    mask = torch.arange(P + Q)[None] >= torch.tensor([P - n for n in lengths])[:, None]
    span = CacheSpan(rows=slice(0, len(plans)), start=0, write=P, end=P + Q, key_mask=mask)
    pos = flattened_position_ids(*grid, LATENT_MAX_PATCHES_PER_SIDE)
    start, end = rt._markers()
    lat = rt.model.embed_latents(x_t[None], torch.tensor([t]), pos)
    query = torch.cat([start, lat, end], dim=1).expand(len(plans), -1, -1)
    positions = torch.tensor(ropes)[:, None]
    hidden = rt.model.language_model.model(query, positions, cache=cache, span=span, causal=False, mixed=True)
    return rt.model.velocity(hidden[:, 1:-1])


def test_t2i_velocity_with_cfg(runtime: UniCharacterRuntime, reference: Reference) -> None:
    rt, meta, ref = runtime, reference.meta, reference.tensors
    grid = tuple(s // 16 for s in meta["t2i_size"])
    plans = [[_TextBlock(rt.tokenizer.segment(meta["prompt"]))], []]  # cond, text-uncond (empty context)
    with torch.inference_mode():
        v = velocity(rt, plans, ref["flow.t2i.x_t"], grid, meta["flow_t"])
    compare("T2I velocity, cond branch", v[0], ref["flow.t2i.v_cond"], rt)
    for renorm in ("global", "channel"):
        guided = cfg_combine(v[0], v[1], None, 4.0, 1.0, renorm, 0.0)
        compare(f"T2I velocity, CFG text 4.0 ({renorm} renorm)", guided, ref[f"flow.t2i.v_cfg_{renorm}"], rt,
                gain=4.0)


def test_edit_velocity_with_cfg(runtime: UniCharacterRuntime, reference: Reference) -> None:
    """Image in context through the VAE (posterior sampled with the reference's seed) and the ViT, then text."""
    rt, meta, ref = runtime, reference.meta, reference.tensors
    image = ref["edit.image"]
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(meta["edit.posterior_seed"])
        z = rt.vae.encode(image[None], generator=gen)[0]
        image_blocks = [rt._vae_block(z), vit_block(rt, image)]
        text = _TextBlock(rt.tokenizer.segment(meta["edit"]))
        plans = [image_blocks + [text], image_blocks, [text]]  # cond, text-uncond, image-uncond
        grid = tuple(s // 16 for s in meta["edit_size"])
        v = velocity(rt, plans, ref["flow.edit.x_t"], grid, meta["flow_t"])
    cfg = meta["edit_cfg"]
    compare("edit velocity, cond branch", v[0], ref["flow.edit.v_cond"], rt)
    guided = cfg_combine(v[0], v[1], v[2], cfg["cfg_text_scale"], cfg["cfg_img_scale"], cfg["cfg_renorm_type"],
                         cfg["cfg_renorm_min"])
    compare("edit velocity, CFG text 4.0 image 2.0 (text_channel)", guided, ref["flow.edit.v_cfg"], rt,
            gain=cfg["cfg_text_scale"] * cfg["cfg_img_scale"])


def test_short_text_to_image_sampling(runtime: UniCharacterRuntime, reference: Reference) -> None:
    """The public sampler from the same initial noise (same seed, same draw) ends at the reference's image."""
    s = reference.meta["sample.settings"]
    params = ImageParams(
        width=s["size"][1], height=s["size"][0], num_timesteps=s["num_timesteps"], timestep_shift=s["timestep_shift"],
        cfg_text_scale=s["cfg_text_scale"], cfg_img_scale=s["cfg_img_scale"], cfg_interval=tuple(s["cfg_interval"]),
        cfg_renorm_min=s["cfg_renorm_min"], cfg_renorm_type=s["cfg_renorm_type"], seed=s["seed"],
    )
    # the runtime draws its initial noise as torch.randn([1, N, 64]) from a generator seeded with the request's seed
    gen = torch.Generator().manual_seed(s["seed"])
    noise = torch.randn(1, *reference.tensors["sample.init_noise"].shape, generator=gen)
    assert torch.equal(noise[0], reference.tensors["sample.init_noise"]), "the runtime's noise draw changed"
    image = runtime.generate_image(ImageContexts(cond=[TextSegment(reference.meta["prompt"])]), params)
    pixels = torch.from_numpy(np.asarray(image).copy()).float()
    compare("T2I sampling, final pixels (0-255)", pixels, reference.tensors["sample.pixels"], runtime)


def test_comparisons_can_fail(runtime: UniCharacterRuntime, reference: Reference, model_dir: Path) -> None:
    """On the unit-gain weights a wrong flow time or a different prompt lands outside the tolerance."""
    if not model_dir.name.startswith("unit-gain"):
        pytest.skip("the std-0.02 tiny weights barely react to t or the prompt (see redraw_unit_gain)")
    rt, meta, ref = runtime, reference.meta, reference.tensors
    grid = tuple(s // 16 for s in meta["t2i_size"])
    wrong = {
        "flow time 0.2 instead of 0.9": ([[_TextBlock(rt.tokenizer.segment(meta["prompt"]))], []], 0.2),
        "another prompt": ([[_TextBlock(rt.tokenizer.segment(meta["edit"]))], []], meta["flow_t"]),
    }
    for what, (plans, t) in wrong.items():
        with torch.inference_mode():
            v = velocity(rt, plans, ref["flow.t2i.x_t"], grid, t)[0].float()
        target = ref["flow.t2i.v_cond"]
        off = float((v - target).abs().max() / target.abs().max())
        print(f"{what}: max abs diff {off:.2%} of max |ref|")
        assert off > 2 * RELATIVE_TOLERANCE, f"{what} is within the parity tolerance: the test could not see it"
