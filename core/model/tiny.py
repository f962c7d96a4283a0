"""A tiny random BAGEL in the official folder layout, for tests, CI and the embedded demo.

It has everything the real folder has and that the runtime reads: ``llm_config.json`` and ``vit_config.json``
in the published style (the ViT file counts one layer more than is used and carries no BAGEL fields; the
loaders' fix-ups apply as for the real one), a byte-level BPE tokenizer trained here with Qwen's special tokens
(``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``), an embedding with more rows than
the tokenizer has tokens, ``ema.safetensors`` and ``ae.safetensors`` with the official tensor names. Every
capability runs on it on a CPU in seconds. Its outputs are noise: it is random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from torch import nn

from core.model import lora
from core.model.bagel import Bagel, init_random_
from core.model.config import BagelConfig, LLMConfig
from core.model.tokenizer import BagelTokenizer
from core.model.vae import AutoEncoder, AutoEncoderParams
from core.model.vit import SiglipVisionConfig

__all__ = ["TINY_LLM", "TINY_VIT", "random_lora_factors", "random_vae", "tiny_tokenizer", "write_tiny_model"]

TINY_LLM = LLMConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
)
TINY_VIT = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)

# Qwen2.5's added tokens, in its order; BAGEL needs the first five (tokenizer.SPECIAL_TOKENS).
QWEN_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
# Qwen2's pre-tokenizer split.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_VOCAB = 400  # byte alphabet (256) plus merges; the special tokens come after
_CORPUS = (
    "Character Description: a cheerful girl who loves mahjong and cats.",
    "Opening: Hello! Shall we play a round together?",
    "User Input: What are you doing today? Character Response: I am reading a book in the garden.",
    "Please generate an image that visualizes this scene, with the character in it.",
    "A photograph of a cat sitting on a red chair in a sunny coffee shop.",
    "What is in this image? Describe the picture. The answer is yes, no, two, blue.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,:;'\"()[]{}<>",
)


def _train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    tok.add_special_tokens(list(QWEN_SPECIAL))
    return tok


def tiny_tokenizer() -> BagelTokenizer:
    """The tiny model's tokenizer without writing files (benchmarks with random full-size weights use it)."""
    return BagelTokenizer(_train_tokenizer())


def _write_tokenizer(directory: Path) -> int:
    """Save the four tokenizer files; returns the tokenizer's size."""
    tok = _train_tokenizer()
    tok.save(str(directory / "tokenizer.json"))
    tok.model.save(str(directory))  # vocab.json, merges.txt
    decoder = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in QWEN_SPECIAL
    }
    config = {
        "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t in QWEN_SPECIAL if t != "<|endoftext|>"],
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return tok.get_vocab_size(with_added_tokens=True)


def _write_configs(directory: Path, llm: LLMConfig, vit: SiglipVisionConfig, tokens: int) -> None:
    eos = tokens - len(QWEN_SPECIAL) + QWEN_SPECIAL.index("<|im_end|>")
    llm_json = {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": tokens - len(QWEN_SPECIAL), "eos_token_id": eos, "hidden_act": "silu",
        "hidden_size": llm.hidden_size, "initializer_range": 0.02, "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings, "max_window_layers": llm.num_hidden_layers,
        "model_type": "qwen2", "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers, "num_key_value_heads": llm.num_key_value_heads,
        "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta, "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
        "use_cache": True, "use_sliding_window": False, "vocab_size": llm.vocab_size,
    }
    vit_json = {  # as published: one layer more than BAGEL uses, no BAGEL fields
        "hidden_size": vit.hidden_size, "image_size": vit.image_size, "intermediate_size": vit.intermediate_size,
        "model_type": "siglip_vision_model", "num_attention_heads": vit.num_attention_heads,
        "num_hidden_layers": vit.num_hidden_layers + 1, "patch_size": vit.patch_size,
    }
    (directory / "llm_config.json").write_text(json.dumps(llm_json, indent=2) + "\n", encoding="utf-8")
    (directory / "vit_config.json").write_text(json.dumps(vit_json, indent=2) + "\n", encoding="utf-8")


@torch.no_grad()
def random_vae(params: AutoEncoderParams, seed: int = 0, device: torch.device | str = "cpu") -> AutoEncoder:
    """A FLUX-shaped autoencoder with seeded weights (scaled so activations stay in range), built on ``device``."""
    with torch.device("meta"):
        vae = AutoEncoder(params)
    vae = vae.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in vae.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.normal_(0.0, module.weight[0].numel() ** -0.5, generator=gen)
            module.bias.normal_(0.0, 0.02, generator=gen)
        elif isinstance(module, nn.GroupNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
    return vae.requires_grad_(False).eval()


def random_lora_factors(
    model: nn.Module, rank: int, *, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Seeded random LoRA factors on every target of ``model``, named as an adapter file holds them
    (``<module>.lora_A`` ``[rank, in]``, ``<module>.lora_B`` ``[out, rank]``), for tests and benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in lora.targeted_linears(model):
        tensors[f"{name}.lora_A"] = (torch.randn(rank, module.in_features, generator=gen) * scale).to(dtype)
        tensors[f"{name}.lora_B"] = (torch.randn(module.out_features, rank, generator=gen) * scale).to(dtype)
    return tensors


def write_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Write a tiny random model in the official layout into ``directory`` (created if needed); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = _write_tokenizer(directory)
    if tokens > TINY_LLM.vocab_size:
        raise RuntimeError(f"tiny tokenizer has {tokens} tokens, more than {TINY_LLM.vocab_size} embedding rows")
    _write_configs(directory, TINY_LLM, TINY_VIT, tokens)
    model = init_random_(Bagel(BagelConfig(llm=TINY_LLM, vit=TINY_VIT)), seed=seed)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}  # published in bf16
    save_file(state, str(directory / "ema.safetensors"))
    vae = random_vae(AutoEncoderParams.tiny(), seed)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(directory / "ae.safetensors"))
    return directory
