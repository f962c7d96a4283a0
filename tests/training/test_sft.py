"""Packed training forward and the SFT loop on the tiny model: the attention rules, a falling loss, a resume."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from core.model.lora import read_meta
from core.model.tokenizer import load_tokenizer
from tests.training.builders import noise_png
from training.attention import dense_mask
from training.packing import ImagePart, Packer, Sample, TextPart
from training.sft import SFTConfig, run_sft, sample_batch


def images() -> dict[str, Image.Image]:
    return {str(i): Image.open(io.BytesIO(noise_png(i, 64))) for i in range(2)}


def latent_encoder(key: str):
    return torch.randn(4, 64, generator=torch.Generator().manual_seed(int(key))), 2, 2


SAMPLES = [
    Sample((TextPart("A picture of Ichihime"), ImagePart("0", target=True)), "t2i"),
    Sample((ImagePart("1", vit=True), TextPart("What is she wearing?"), TextPart("A red dress.", loss=True))),
]


def test_mask_follows_the_training_rules(tiny_model_dir):
    packer = Packer(load_tokenizer(tiny_model_dir), images(), latent_encoder, vit_side=70, latent_side=64)
    batch = packer.pack(SAMPLES, torch.Generator().manual_seed(0))
    assert batch.tokens == sum(packer.count(s) for s in SAMPLES)
    und, mask = batch.num_und, dense_mask(batch.mask_tokens)
    gen = torch.arange(und, batch.tokens)
    assert batch.target_rows.tolist() == [0, 1, 2, 3] and len(gen) == 4  # the target's latents, after all und tokens
    # the first sample's text prompt: causal, so its first token sees only itself
    first_text = batch.text_slots[0]
    assert mask[first_text].sum() == 1
    # noised latents see the prompt and each other (full block) but nothing of the second sample
    assert mask[gen][:, gen].all()
    assert mask[gen][:, first_text].all()
    second_sample_rows = batch.label_rows
    assert not mask[second_sample_rows][:, gen].any()  # documents never cross, noise is hidden
    assert batch.labels.numel() == len(load_tokenizer(tiny_model_dir).encode("A red dress.")) + 1  # + <|im_end|>


def test_batches_take_one_of_each_group_then_fill():
    gen = torch.Generator().manual_seed(0)
    batch = sample_batch(SAMPLES * 3, lambda s: 10, 100, {"t2i": 20000.0, "vlm": 1.0}, gen, 0.0)
    groups = [s.group for s in batch]
    assert groups[:2] == ["t2i", "vlm"] and len(batch) == 10 and groups.count("t2i") >= 8


def test_loss_falls_and_a_crash_resumes(tiny_model_dir, tmp_path):
    config = SFTConfig(steps=10, lr=1e-2, rank=4, alpha=8.0, tokens_per_step=4096, checkpoint_every=5,
                       image_size=64, text_dropout=0.0)
    imgs = images()

    def crash(report):
        if report.step == 7:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        run_sft(tiny_model_dir, SAMPLES, imgs, tmp_path, config, device="cpu", on_step=crash)
    result = run_sft(tiny_model_dir, SAMPLES, imgs, tmp_path, config, device="cpu", base_hash="h", data_hash="d")
    assert result.resumed_from == 5 and len(result.losses) == 10
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    meta = read_meta(result.output)
    assert (meta.steps, meta.rank, meta.base_model_hash, meta.data_hash) == (10, 4, "h", "d")


def test_full_finetune_writes_a_checkpoint(tiny_model_dir, tmp_path):
    config = SFTConfig(steps=1, lr=1e-4, full_finetune=True, tokens_per_step=4096, image_size=64)
    result = run_sft(tiny_model_dir, SAMPLES, images(), tmp_path, config, device="cpu")
    assert result.output.name == "model.safetensors" and result.output.stat().st_size > 0
