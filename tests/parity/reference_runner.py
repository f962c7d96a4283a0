"""Run the official BAGEL code on a model folder and save what the parity test compares (not collected by pytest).

Runs in the reference's own virtual environment (transformers 4.49), in a subprocess, with the reference checkout
and the ``standin`` folder (a ``flash_attn`` on SDPA) on ``PYTHONPATH``. Nothing of the reference is imported by
the project. Inputs that involve randomness (images, noise, the VAE posterior sample) are made here from fixed
seeds and saved beside the outputs, so the project's side replays exactly the same inputs.

Usage: python reference_runner.py MODEL_DIR OUT_DIR
Writes OUT_DIR/reference.safetensors (tensors) and OUT_DIR/reference.json (token ids, sizes, settings).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
from data.data_utils import add_special_tokens
from inferencer import InterleaveInferencer
from modeling.autoencoder import AutoEncoder, AutoEncoderParams
from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
from modeling.qwen2 import Qwen2Tokenizer
from safetensors.torch import load_file, save_file

PROMPT = "A photograph of a cat sitting on a red chair in a sunny coffee shop."
QUESTION = "What is in this image? Describe the picture."
EDIT = "Make the cat blue."
DECODE_STEPS = 8
VIT_SIZES = ((28, 42), (56, 28))  # (H, W) of the packed ViT images, multiples of 14
EDIT_SIZE = (112, 224)  # (H, W) of the edit input: multiples of 16 (VAE) and 14 (ViT), so no resize is needed
T2I_SIZE = (64, 64)
FLOW_T = 0.9  # a shifted time inside the CFG interval
SAMPLING = dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=[0.4, 1.0], timestep_shift=3.0,
                num_timesteps=8, cfg_renorm_min=0.0, cfg_renorm_type="global")
EDIT_CFG = dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_renorm_type="text_channel", cfg_renorm_min=0.0)
SEED = 1234


def build(model_dir: Path) -> tuple[InterleaveInferencer, Bagel, AutoEncoder]:
    """Build as the official app does (config fix-ups included), load strictly, bf16 weights as published."""
    llm_config = Qwen2Config.from_json_file(str(model_dir / "llm_config.json"))
    llm_config.qk_norm = True
    llm_config.tie_word_embeddings = False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"
    vit_config = SiglipVisionConfig.from_json_file(str(model_dir / "vit_config.json"))
    vit_config.rope = False
    vit_config.num_hidden_layers -= 1

    ae_state = load_file(str(model_dir / "ae.safetensors"))
    ch = ae_state["encoder.conv_in.weight"].shape[0]  # load_ae hard-codes FLUX's sizes; the tiny VAE differs
    levels = len({k.split(".")[2] for k in ae_state if k.startswith("encoder.down.")})
    ae_params = AutoEncoderParams(
        resolution=256, in_channels=3, downsample=8, ch=ch, out_ch=3,
        ch_mult=[ae_state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)],
        num_res_blocks=len({k.split(".")[4] for k in ae_state if k.startswith("encoder.down.0.block.")}),
        z_channels=ae_state["encoder.conv_out.weight"].shape[0] // 2, scale_factor=0.3611, shift_factor=0.1159,
    )
    vae = AutoEncoder(ae_params)
    vae.load_state_dict(ae_state, strict=True)
    vae.eval()
    for name in ("encode", "decode"):  # the app keeps the VAE on the CPU in fp32, outside CUDA's autocast
        setattr(vae, name, _without_autocast(getattr(vae, name)))

    config = BagelConfig(
        visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config, vae_config=ae_params,
        vit_max_num_patch_per_side=70, connector_act="gelu_pytorch_tanh", latent_patch_size=2, max_latent_size=64,
    )
    model = Bagel(Qwen2ForCausalLM(llm_config), SiglipVisionModel(vit_config), config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    model.load_state_dict(load_file(str(model_dir / "ema.safetensors")), strict=True)
    model = model.to(torch.bfloat16).eval()

    tokenizer = Qwen2Tokenizer.from_pretrained(str(model_dir))
    tokenizer, new_token_ids, _ = add_special_tokens(tokenizer)
    identity = lambda x: x  # noqa: E731 - inputs are given as model-size tensors already
    inferencer = InterleaveInferencer(model, vae, tokenizer, identity, identity, new_token_ids)
    return inferencer, model, vae


def _without_autocast(fn):
    def run(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    return run


class Capture:
    """Forward hook that keeps each output of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(lambda _m, _i, out: self.outputs.append(out.detach().float()))

    def close(self) -> list[torch.Tensor]:
        self.handle.remove()
        return self.outputs


def greedy(inf: InterleaveInferencer, model: Bagel, ctx: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The official greedy decode (``generate_text``) from ``ctx``; returns fed ids and each step's logits."""
    ctx = copy.deepcopy(ctx)
    logits = Capture(model.language_model.lm_head)
    ids = model.generate_text(
        past_key_values=ctx["past_key_values"], max_length=DECODE_STEPS, do_sample=False,
        end_token_id=None, **model.prepare_start_tokens(ctx["kv_lens"], ctx["ropes"], inf.new_token_ids),
    )
    return ids[:, 0], torch.cat(logits.close())


def text_case(inf: InterleaveInferencer, model: Bagel, out: dict, meta: dict) -> None:
    """Prefill logits of one text segment, then greedy decode logits after it."""
    norm = Capture(model.language_model.model.norm)
    ctx = inf.update_context_text(PROMPT, inf.init_gen_context())
    (hidden,) = norm.close()
    out["text.prefill_logits"] = model.language_model.lm_head(hidden.to(torch.bfloat16)).float()
    meta["text.prompt_ids"] = [inf.new_token_ids["bos_token_id"], *inf.tokenizer.encode(PROMPT),
                               inf.new_token_ids["eos_token_id"]]
    ids, logits = greedy(inf, model, ctx)
    meta["text.decode_ids"] = ids.tolist()
    out["text.decode_logits"] = logits


def vit_case(inf: InterleaveInferencer, model: Bagel, out: dict, meta: dict) -> None:
    """ViT features of two packed images, and a VQA decode (ViT block, then the question)."""
    gen = torch.Generator().manual_seed(SEED)
    images = [torch.rand(3, h, w, generator=gen) * 2 - 1 for h, w in VIT_SIZES]
    for i, image in enumerate(images):
        out[f"vit.image{i}"] = image
    prepared, _, _ = model.prepare_vit_images([0] * 2, [0] * 2, images, lambda x: x, inf.new_token_ids)
    lens = torch.tensor([(h // 14) * (w // 14) for h, w in VIT_SIZES])
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    with torch.no_grad():
        features = model.vit_model(
            packed_pixel_values=prepared["packed_vit_tokens"].to(torch.bfloat16),
            packed_flattened_position_ids=prepared["packed_vit_position_ids"],
            cu_seqlens=cu, max_seqlen=int(lens.max()),
        )
        embeds = model.connector(features) + model.vit_pos_embed(prepared["packed_vit_position_ids"])
    out["vit.features"] = features.float()
    out["vit.llm_inputs"] = embeds.float()

    ctx = inf.update_context_image(images[0], inf.init_gen_context(), vae=False, vit=True)
    ctx = inf.update_context_text(QUESTION, ctx)
    ids, logits = greedy(inf, model, ctx)
    meta["vqa.decode_ids"] = ids.tolist()
    out["vqa.decode_logits"] = logits


def flow_inputs(model: Bagel, inf: InterleaveInferencer, ctxs: tuple[dict, dict, dict], size: tuple[int, int]) -> dict:
    """The official query and CFG-branch inputs for one latent of ``size`` after the three contexts."""
    cond, text_uncond, img_uncond = ctxs
    main = model.prepare_vae_latent(cond["kv_lens"], cond["ropes"], [size], inf.new_token_ids)
    text = model.prepare_vae_latent_cfg(text_uncond["kv_lens"], text_uncond["ropes"], [size])
    img = model.prepare_vae_latent_cfg(img_uncond["kv_lens"], img_uncond["ropes"], [size])
    main.pop("packed_init_noises")
    return dict(
        **main, past_key_values=cond["past_key_values"],
        cfg_text_packed_position_ids=text["cfg_packed_position_ids"],
        cfg_text_packed_query_indexes=text["cfg_packed_query_indexes"],
        cfg_text_key_values_lens=text["cfg_key_values_lens"],
        cfg_text_past_key_values=text_uncond["past_key_values"],
        cfg_text_packed_key_value_indexes=text["cfg_packed_key_value_indexes"],
        cfg_img_packed_position_ids=img["cfg_packed_position_ids"],
        cfg_img_packed_query_indexes=img["cfg_packed_query_indexes"],
        cfg_img_key_values_lens=img["cfg_key_values_lens"],
        cfg_img_past_key_values=img_uncond["past_key_values"],
        cfg_img_packed_key_value_indexes=img["cfg_packed_key_value_indexes"],
    )


def velocity(model: Bagel, inputs: dict, x_t: torch.Tensor, **cfg: object) -> torch.Tensor:
    """One official ``_forward_flow`` call at ``FLOW_T``."""
    with torch.no_grad():
        model.language_model.model.enable_taylorseer = False
        v = model._forward_flow(x_t=x_t, timestep=torch.tensor([FLOW_T]), **inputs, **cfg)
    return v.float()


def t2i_contexts(inf: InterleaveInferencer) -> tuple[dict, dict, dict]:
    """Pure text-to-image contexts, built as ``interleave_inference`` builds them."""
    empty = inf.init_gen_context()
    cond = inf.update_context_text(PROMPT, copy.deepcopy(empty))
    return cond, empty, copy.deepcopy(cond)


def flow_case(inf: InterleaveInferencer, model: Bagel, vae: AutoEncoder, out: dict, meta: dict) -> None:
    """Velocities with and without CFG for text-to-image and for an edit (VAE + ViT image, then text)."""
    h, w = (s // 16 for s in T2I_SIZE)
    x_t = torch.randn(h * w, 64, generator=torch.Generator().manual_seed(SEED))
    out["flow.t2i.x_t"] = x_t
    inputs = flow_inputs(model, inf, t2i_contexts(inf), T2I_SIZE)
    out["flow.t2i.v_cond"] = velocity(model, inputs, x_t, cfg_text_scale=1.0, cfg_img_scale=1.0)
    for renorm in ("global", "channel"):
        out[f"flow.t2i.v_cfg_{renorm}"] = velocity(model, inputs, x_t, cfg_text_scale=4.0, cfg_img_scale=1.0,
                                                  cfg_renorm_type=renorm)

    image = torch.rand(3, *EDIT_SIZE, generator=torch.Generator().manual_seed(SEED + 1)) * 2 - 1
    out["edit.image"] = image
    torch.manual_seed(SEED + 2)  # the official VAE posterior sample draws from the global generator
    with_image = inf.update_context_image(image, inf.init_gen_context(), vae=True, vit=True)
    cond = inf.update_context_text(EDIT, copy.deepcopy(with_image))
    img_uncond = inf.update_context_text(EDIT, inf.init_gen_context())
    meta["edit.posterior_seed"] = SEED + 2
    eh, ew = (s // 16 for s in EDIT_SIZE)
    x_e = torch.randn(eh * ew, 64, generator=torch.Generator().manual_seed(SEED + 3))
    out["flow.edit.x_t"] = x_e
    inputs = flow_inputs(model, inf, (cond, with_image, img_uncond), EDIT_SIZE)
    out["flow.edit.v_cond"] = velocity(model, inputs, x_e, cfg_text_scale=1.0, cfg_img_scale=1.0)
    out["flow.edit.v_cfg"] = velocity(model, inputs, x_e, **EDIT_CFG)


def sampling_case(inf: InterleaveInferencer, vae: AutoEncoder, out: dict, meta: dict) -> None:
    """A short full text-to-image run through ``interleave_inference``; the noise comes from the global seed."""
    decoded: list[torch.Tensor] = []
    decode = vae.decode
    vae.decode = lambda z: decoded.append(z.detach().clone()) or decode(z)  # keep the final latent
    torch.manual_seed(SEED + 4)
    h, w = (s // 16 for s in T2I_SIZE)
    out["sample.init_noise"] = torch.randn(h * w, 64)  # what prepare_vae_latent draws first after seeding
    torch.manual_seed(SEED + 4)
    (image,) = inf.interleave_inference([PROMPT], image_shapes=T2I_SIZE, **SAMPLING)
    vae.decode = decode
    out["sample.latent"] = decoded[0].float()
    out["sample.pixels"] = torch.from_numpy(np.asarray(image).copy())
    meta["sample.settings"] = SAMPLING | {"size": T2I_SIZE, "seed": SEED + 4}


def main() -> None:
    model_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    inf, model, vae = build(model_dir)
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, object] = {"new_token_ids": inf.new_token_ids, "decode_steps": DECODE_STEPS,
                               "prompt": PROMPT, "question": QUESTION, "edit": EDIT, "flow_t": FLOW_T,
                               "edit_cfg": EDIT_CFG, "t2i_size": T2I_SIZE, "edit_size": EDIT_SIZE}
    # The official inferencer runs under CUDA autocast (bf16); on the CPU the same role falls to CPU autocast.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        text_case(inf, model, out, meta)
        vit_case(inf, model, out, meta)
        flow_case(inf, model, vae, out, meta)
        sampling_case(inf, vae, out, meta)
    save_file({k: v.contiguous() for k, v in out.items()}, str(out_dir / "reference.safetensors"))
    (out_dir / "reference.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
