"""UniCharacter on BAGEL-7B-MoT: the engine behind :class:`core.model.api.CharacterModel`.

Notable:
- A context is turned into *blocks* (MODEL.md 6, 7): consecutive text segments become one causal und-expert
  prefill of ``<|im_start|> text <|im_end|>`` runs; an image becomes a VAE block (clean latents at t = 0, mixed
  experts) and/or a ViT block (und expert), each framed by the vision markers, non-causal, on one rope id.
- Text decoding (core.model.decode) uses a persistent static KV cache and a step of fixed shapes, replayed from a
  CUDA graph on the GPU. The loop makes one host read per token, the stop check, which also feeds streaming;
  it runs one step ahead, so detokenising and the streaming callback overlap the GPU's next step.
- ``fuse_projections`` (default: on) runs each expert's Q/K/V and gate/up as one matrix product each, over the
  same memory as the checkpoint's Parameters; active LoRA updates are added on top (core.model.projection).
- ``image_fp8`` (default: off; None: on where the GPU has FP8 tensor cores) runs the generation expert, i.e. the
  image latents, in FP8 with per-channel and per-token scales: 1024x1024 in 7.4 s instead of 10.1 s on an H100, its
  bf16 weights released, but no longer the official bf16 outputs (about 11x bf16's deviation from fp32 on random
  weights, bench/RESULTS.md). Text, the ViT and decoding stay in bf16.
- ``compile_kernels`` (default: on CUDA) fuses the decoder's element-wise work with ``torch.compile``: on an H100
  it took a 1024x1024 image from 13.0 s to 10.6 s and cuts the ~50 small kernels per layer that bound decoding.
- Image generation prefills each CFG context into its own cache row, left-padded so that every row's latent
  query sits at the same slice; a denoising step is one forward over all active rows. Outside the CFG interval
  (tested on the shifted t) only the conditional row runs. The schedule's host copy drives those decisions,
  so a step needs no host sync inside it.
- Randomness comes from one ``torch.Generator`` per request, seeded from the request.
- Text and images are two lanes that run side by side (core.model.scheduling): text requests take turns among
  themselves on a high-priority CUDA stream, images take turns per denoising step (letting each step finish before
  the next image's), and both share the weights. Only a LoRA adapter is exclusive: the lanes overlap while they
  want the same one (or none), else one waits for the other's reply or step. Adapters (core.model.lora) are kept
  in a small LRU. A text reply never waits behind an image, and an image loses little to replies beside it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from core.model import lora
from core.model.api import (
    ImageContexts,
    ImageParams,
    ImageSegment,
    OnProgress,
    OnText,
    Segment,
    TextParams,
    TextSegment,
)
from core.model.bagel import Bagel, init_random_
from core.model.checkpoint import load_bagel, load_vae
from core.model.config import BagelConfig, from_checkpoint_dir, full_size_config
from core.model.decode import TextDecoder, TextStream
from core.model.flow import cfg_combine, euler_step, guidance_active, timestep_schedule
from core.model.kv_cache import CacheSpan, KVCache
from core.model.projection import fp8_supported
from core.model.sampling import mask_padding_rows, sample_next
from core.model.scheduling import AdapterGate, TurnLock
from core.model.tokenizer import BagelTokenizer, load_tokenizer
from core.model.transforms import (
    LATENT_MAX_PATCHES_PER_SIDE,
    VAE_TRANSFORM,
    VIT_MAX_PATCHES_PER_SIDE,
    VIT_TRANSFORM,
    flattened_position_ids,
    patchify,
    to_rgb,
    unpatchify,
)
from core.model.vae import AutoEncoder, AutoEncoderParams, to_pil_image

__all__ = ["UniCharacterRuntime", "resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)

ADAPTER_LRU_SIZE = 8


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"unsupported dtype {dtype!r}")
    return getattr(torch, dtype)


@dataclass(frozen=True, slots=True)
class _TextBlock:
    ids: list[int]

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class _ImageBlock:
    """A ViT (``vit=True``) or clean-VAE block: tokens, their 2D table positions, and the markers around them."""

    tokens: Tensor  # [N, patch values]
    position_ids: Tensor  # [N]
    vit: bool

    @property
    def length(self) -> int:
        return self.tokens.shape[0] + 2


_Block = _TextBlock | _ImageBlock


def _rope_span(block: _Block) -> int:
    """How far a block advances the rope id: one per text token, one for a whole image block."""
    return block.length if isinstance(block, _TextBlock) else 1


class UniCharacterRuntime:
    """Loads a BAGEL folder (plus optional UniCharacter checkpoint) and serves text and images from it."""

    def __init__(
        self, model: Bagel, vae: AutoEncoder, tokenizer: BagelTokenizer, *,
        model_dir: Path | None = None, cuda_graphs: bool = True, compile_kernels: bool | None = None,
        fuse_projections: bool = True, image_fp8: bool | None = False,
    ) -> None:
        self.model, self.vae, self.tokenizer = model, vae, tokenizer
        self.cfg: BagelConfig = model.cfg
        self.device, self.dtype = model.vae2llm.weight.device, model.dtype
        self.model_dir = model_dir
        self._text_turns, self._image_turns = TurnLock(), TurnLock()
        self._gate: AdapterGate[lora.Adapter] = AdapterGate(self._switch_adapter, key=lambda a: a.id)
        self._registry = threading.Lock()  # the adapter LRU
        self._adapters: OrderedDict[str, lora.Adapter] = OrderedDict()
        self._lora_attached = False
        # decoding is bandwidth-bound, an image's steps compute-bound: text kernels go first where they meet
        self._text_stream = torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        self._decoder = TextDecoder(model, cuda_graphs=cuda_graphs)
        llm = model.language_model.model
        if fuse_projections:
            llm.fuse_projections()
        if image_fp8 is None:
            image_fp8 = fuse_projections and fp8_supported(self.device)
        if image_fp8:
            llm.generation_expert_to_fp8()
        if compile_kernels is None:
            compile_kernels = self.device.type == "cuda"
        if compile_kernels:
            llm.compile_kernels()

    # --- construction -------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls, model_dir: str | Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
        checkpoint: str | Path | None = None, vit_checkpoint: str | Path | None = None, **options: object,
    ) -> UniCharacterRuntime:
        """Load an official-layout folder; ``checkpoint`` is a UniCharacter SFT or GRPO file (MODEL.md 8.4)."""
        model_dir = Path(model_dir)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        cfg = from_checkpoint_dir(model_dir)
        tokenizer = load_tokenizer(model_dir)
        model = load_bagel(
            cfg, model_dir, device=dev, dtype=dt,
            checkpoint=Path(checkpoint) if checkpoint else None,
            vit_checkpoint=Path(vit_checkpoint) if vit_checkpoint else None,
        )
        if tokenizer.size > cfg.llm.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.size} tokens, the embedding only {cfg.llm.vocab_size} rows")
        vae = load_vae(model_dir / "ae.safetensors", device=dev)
        logger.info("loaded %s on %s as %s", model_dir, dev, dt)
        return cls(model, vae, tokenizer, model_dir=model_dir, **options)

    @classmethod
    def random(
        cls, cfg: BagelConfig | None = None, *, device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto", seed: int = 0, tokenizer: BagelTokenizer | None = None,
        vae_params: AutoEncoderParams | None = None, **options: object,
    ) -> UniCharacterRuntime:
        """Random weights of ``cfg`` and ``vae_params`` (default: full size, FLUX) built directly on ``device``.

        For benchmarks and tests: no files; the tokenizer defaults to the tiny model's.
        """
        from core.model.tiny import (  # only the benchmark path needs the local tokenizer
            random_vae,
            tiny_tokenizer,
        )

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        cfg = cfg or full_size_config()
        with torch.device("meta"):
            model = Bagel(cfg)
        model = init_random_(model.to(dt).to_empty(device=dev), seed=seed).requires_grad_(False).eval()
        vae = random_vae(vae_params or AutoEncoderParams(z_channels=cfg.latent_channels), seed=seed, device=dev)
        return cls(model, vae, tokenizer or tiny_tokenizer(), **options)

    def _new_cache(self, rows: int, capacity: int) -> KVCache:
        c = self.cfg.llm
        layers, heads = c.num_hidden_layers, c.num_key_value_heads
        return KVCache(layers, rows, heads, capacity, c.head_dim, self.dtype, self.device)

    # --- contexts -----------------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.segment(text))

    def _blocks(
        self, context: Sequence[Segment], generator: torch.Generator, latents: dict[int, Tensor]
    ) -> list[_Block]:
        """Blocks of a context; consecutive texts merge into one causal prefill (same result, fewer passes)."""
        blocks: list[_Block] = []
        for seg in context:
            if isinstance(seg, TextSegment):
                ids = self.tokenizer.segment(seg.text)
                if blocks and isinstance(blocks[-1], _TextBlock):
                    blocks[-1] = _TextBlock(blocks[-1].ids + ids)
                else:
                    blocks.append(_TextBlock(ids))
            elif isinstance(seg, ImageSegment):
                if not (seg.vit or seg.vae):
                    raise ValueError("an image segment must go through the ViT, the VAE or both")
                # The official inferencer applies the VAE resize to every input image first (MODEL.md 11.5).
                image = VAE_TRANSFORM.resize(to_rgb(seg.image))
                if seg.vae:
                    if id(seg.image) not in latents:
                        latents[id(seg.image)] = self._encode(image, generator)
                    blocks.append(self._vae_block(latents[id(seg.image)]))
                if seg.vit:
                    blocks.append(self._vit_block(image))
            else:
                raise TypeError(f"unknown context segment {type(seg).__name__}")
        return blocks

    def _vit_block(self, image: Image.Image) -> _ImageBlock:
        pixels = VIT_TRANSFORM(image)  # [3, H, W]
        p = self.cfg.vit.patch_size
        grid_h, grid_w = pixels.shape[1] // p, pixels.shape[2] // p
        pos = flattened_position_ids(grid_h, grid_w, VIT_MAX_PATCHES_PER_SIDE)
        return _ImageBlock(patchify(pixels, p).to(self.device), pos.to(self.device), vit=True)

    def _encode(self, image: Image.Image, generator: torch.Generator) -> Tensor:
        """One posterior sample ``[z, H/8, W/8]``; memoised per request so every CFG context sees the same latents,
        as in the official inferencer, which copies the context after encoding."""
        return self.vae.encode(VAE_TRANSFORM(image).to(self.device)[None], generator=generator)[0]

    def _vae_block(self, z: Tensor) -> _ImageBlock:
        p = self.cfg.latent_patch_size
        grid_h, grid_w = z.shape[1] // p, z.shape[2] // p
        pos = flattened_position_ids(grid_h, grid_w, LATENT_MAX_PATCHES_PER_SIDE)
        return _ImageBlock(patchify(z.float(), p), pos.to(self.device), vit=False)

    def _markers(self) -> tuple[Tensor, Tensor]:
        """``<|vision_start|>`` and ``<|vision_end|>`` embedded, ``[1, 1, C]`` each."""
        s = self.tokenizer.special
        e = self.model.embed_text(torch.tensor([[s.vision_start, s.vision_end]], device=self.device))
        return e[:, :1], e[:, 1:]

    def _embed(self, block: _Block) -> Tensor:
        """The block's input embeddings ``[1, L, C]``."""
        if isinstance(block, _TextBlock):
            return self.model.embed_text(torch.tensor([block.ids], device=self.device))
        n = block.tokens.shape[0]
        if block.vit:
            cu = torch.tensor([0, n], device=self.device, dtype=torch.int32)
            body = self.model.embed_vit(block.tokens, cu, block.position_ids, n)[None]
        else:
            t0 = torch.zeros(1, device=self.device)  # a clean context image is at t = 0
            body = self.model.embed_latents(block.tokens[None], t0, block.position_ids)
        start, end = self._markers()
        return torch.cat([start, body, end], dim=1)

    def _prefill(self, blocks: list[_Block], cache: KVCache, row: int, offset: int) -> int:
        """Write a context into ``cache`` row ``row`` from position ``offset``; returns the next rope id."""
        pos, rope = offset, 0
        for block in blocks:
            x = self._embed(block)
            L = x.shape[1]
            text = isinstance(block, _TextBlock)
            # text tokens count up; every token of an image block shares one rope id, which then advances by 1
            positions = torch.arange(rope, rope + L, device=self.device)[None] if text else \
                torch.full((1, 1), rope, device=self.device)
            span = CacheSpan(rows=slice(row, row + 1), start=offset, write=pos, end=pos + L)
            mixed = not text and not block.vit
            self.model.language_model.model(x, positions, cache=cache, span=span, causal=text, mixed=mixed)
            pos, rope = pos + L, rope + _rope_span(block)
        return rope

    # --- adapters -----------------------------------------------------------------------------------------

    def _adapter(self, path: str | None) -> lora.Adapter | None:
        """The loaded adapter for ``path`` (LRU; a replaced file is noticed by its modification time)."""
        if path is None:
            return None
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"adapter file {path} does not exist")
        with self._registry:
            cached = self._adapters.get(str(p))
            if cached is not None and cached.id == f"{p.name}@{p.stat().st_mtime_ns}":
                self._adapters.move_to_end(str(p))
                return cached
            base = lora.base_model_hash(self.model_dir) if self.model_dir is not None else None
            adapter = lora.load_adapter(p, device=self.device, dtype=self.dtype, base_model_hash=base)
            if self.device.type == "cuda":  # copied on this thread's stream; either lane may read the factors next
                torch.cuda.current_stream(self.device).synchronize()
            self._adapters[str(p)] = adapter
            self._adapters.move_to_end(str(p))
            while len(self._adapters) > ADAPTER_LRU_SIZE:
                self._adapters.popitem(last=False)
            return adapter

    def _switch_adapter(self, adapter: lora.Adapter | None) -> None:
        """Put ``adapter`` (None: the base model) on the layers; the gate calls this with no request inside."""
        if adapter is None:
            if self._lora_attached:
                lora.deactivate(self.model)
            return
        if not self._lora_attached:
            lora.attach_lora(self.model, rank=None)  # serving wrappers: no factors until one is activated
            self._lora_attached = True
        lora.activate(self.model, adapter)
        self.model.language_model.model.stack_lora()
        if self.device.type == "cuda":  # stacked on this lane's stream: done before either lane reads them
            torch.cuda.current_stream(self.device).synchronize()

    @contextmanager
    def _image_turn(self, adapter: lora.Adapter | None) -> Iterator[None]:
        """The image lane's turn for one unit of work, with ``adapter`` (or the base model) on the layers."""
        with self._image_turns, self._gate.holding(adapter):
            yield

    def _step_done(self) -> None:
        """Wait until the image work enqueued so far has run, so that the next image's step queues behind nothing."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    # --- text ---------------------------------------------------------------------------------------------

    def generate_text(
        self, context: Sequence[Segment], params: TextParams, on_text: OnText | None = None,
        adapter: str | None = None,
    ) -> str:
        """Decode after ``context`` until ``<|im_end|>`` or ``max_new_tokens``; ``on_text`` gets each new piece."""
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        loaded = self._adapter(adapter)
        stream = torch.cuda.stream(self._text_stream) if self._text_stream is not None else nullcontext()
        with self._text_turns, stream, torch.inference_mode(), self._gate.holding(loaded):
            return self._generate_text(context, params, on_text, loaded)

    def _generate_text(
        self, context: Sequence[Segment], params: TextParams, on_text: OnText | None, adapter: lora.Adapter | None
    ) -> str:
        gen = self._generator(params.seed)
        blocks = self._blocks(context, gen, {})
        length = sum(b.length for b in blocks)
        decoder = self._decoder
        rope = self._prefill(blocks, decoder.reserve(length + 1 + params.max_new_tokens), row=0, offset=0)
        # decoding starts by feeding <|im_start|> (the official prepare_start_tokens)
        decoder.start(length, self.tokenizer.special.bos, rope)
        size = self.tokenizer.size

        def sample(logits: Tensor) -> Tensor:
            return sample_next(mask_padding_rows(logits, size), temperature=params.temperature, top_p=params.top_p,
                               generator=gen)

        stream = TextStream(self.tokenizer.decode)
        # the loop body runs while the GPU computes the next token (TextDecoder.tokens runs one step ahead)
        for token in decoder.tokens(sample, params.max_new_tokens, stop=self.tokenizer.special.eos, adapter=adapter):
            piece = stream.push(token)
            if piece and on_text is not None:
                on_text(piece)
        rest = stream.flush()
        if rest and on_text is not None:
            on_text(rest)
        return stream.text

    # --- images -------------------------------------------------------------------------------------------

    def generate_image(
        self, contexts: ImageContexts, params: ImageParams, on_progress: OnProgress | None = None,
        adapter: str | None = None,
    ) -> Image.Image:
        """Text-to-image (or editing) with the flow-matching Euler sampler and CFG (MODEL.md 5)."""
        self._check_image_params(params)
        loaded = self._adapter(adapter)  # held by this request even if the LRU drops it meanwhile
        with torch.inference_mode():
            return self._generate_image(contexts, params, on_progress, loaded)

    def _check_image_params(self, params: ImageParams) -> None:
        most = self.cfg.max_latent_size * self.cfg.latent_downsample
        for side in (params.width, params.height):
            if not 1 <= side <= most:
                raise ValueError(f"image sides must be 1 to {most} pixels, got {params.width}x{params.height}")
        if params.num_timesteps < 2:
            raise ValueError("num_timesteps must be at least 2")
        if params.timestep_shift <= 0 or params.cfg_text_scale < 0 or params.cfg_img_scale < 0:
            raise ValueError("timestep_shift must be positive and CFG scales non-negative")
        low, high = params.cfg_interval
        if not 0 <= low <= high <= 1:
            raise ValueError(f"cfg_interval must satisfy 0 <= low <= high <= 1, got {params.cfg_interval}")

    def _branches(self, contexts: ImageContexts, params: ImageParams) -> list[Sequence[Segment]]:
        """The contexts that need their own pass: cond, then text-uncond and image-uncond when guidance uses them."""
        branches = [contexts.cond]
        if params.cfg_text_scale > 1.0:
            branches.append(contexts.text_uncond)
            if params.cfg_img_scale > 1.0 and contexts.image_uncond is not None:
                branches.append(contexts.image_uncond)
        return branches

    def _generate_image(
        self, contexts: ImageContexts, params: ImageParams, on_progress: OnProgress | None,
        adapter: lora.Adapter | None,
    ) -> Image.Image:
        gen = self._generator(params.seed)
        step = self.cfg.latent_downsample
        # the model works in multiples of 16 pixels; other sizes are generated just above and resized
        height, width = -(-params.height // step) * step, -(-params.width // step) * step
        grid_h, grid_w = height // step, width // step
        latents: dict[int, Tensor] = {}
        branches = self._branches(contexts, params)
        with self._image_turn(adapter):
            plans = [self._blocks(ctx, gen, latents) for ctx in branches]
            lengths = [sum(b.length for b in blocks) for blocks in plans]
            P, Q = max(lengths), grid_h * grid_w + 2
            cache = self._new_cache(rows=len(plans), capacity=P + Q)
            ropes = [self._prefill(plans[0], cache, 0, P - lengths[0])]
            for row in range(1, len(plans)):
                start = P - lengths[row]
                if list(branches[row]) == list(branches[0][: len(branches[row])]):
                    # a context that starts the conditional one (text-uncond usually does): its keys and values
                    # are the first positions of row 0, since text is causal and image blocks are whole
                    cache.fan_out(0, P - lengths[0], row, start, lengths[row])
                    ropes.append(sum(map(_rope_span, plans[row])))
                else:
                    ropes.append(self._prefill(plans[row], cache, row, start))
            self._step_done()
        x = self._denoise(cache, lengths, ropes, grid_h, grid_w, params, gen, on_progress, adapter)
        with self._image_turns:
            z = unpatchify(x[0], grid_h, grid_w, self.cfg.latent_patch_size)  # [z, 2h, 2w]
            image = to_pil_image(self.vae.decode(z[None])[0])
        if image.size != (params.width, params.height):
            image = image.resize((params.width, params.height), Image.Resampling.BICUBIC)
        return image

    def _denoise(
        self, cache: KVCache, lengths: list[int], ropes: list[int], grid_h: int, grid_w: int,
        params: ImageParams, gen: torch.Generator, on_progress: OnProgress | None, adapter: lora.Adapter | None,
    ) -> Tensor:
        """The Euler loop over the shifted schedule; returns the final latent tokens ``[1, N, p*p*z]`` (float32).

        Each step holds the model until it has run, then lets any waiting request go first.
        """
        rows, P = len(lengths), max(lengths)
        Q = grid_h * grid_w + 2
        with self._image_turns:
            pos_ids = flattened_position_ids(grid_h, grid_w, LATENT_MAX_PATCHES_PER_SIDE).to(self.device)
            x = torch.randn(1, grid_h * grid_w, self.cfg.patch_latent_dim, generator=gen, device=self.device)
            ts = timestep_schedule(params.num_timesteps, params.timestep_shift)
            ts_host, ts_dev = ts.tolist(), ts.to(self.device)  # host copy for decisions, device copy for arithmetic
            rope = torch.tensor(ropes, device=self.device)[:, None]  # [rows, 1]: each branch's own rope id
            # left padding: row r's keys start at P - lengths[r]
            starts = tuple(P - n for n in lengths)
            spans = {
                1: CacheSpan(rows=slice(0, 1), start=starts[0], write=P, end=P + Q),
                rows: CacheSpan(rows=slice(0, rows), start=min(starts), write=P, end=P + Q,
                                row_starts=starts if len(set(starts)) > 1 else None),
            }
            markers = torch.cat(self._markers(), dim=1)  # [1, 2, C]
        total = params.num_timesteps - 1
        for i in range(total):
            active = rows if guidance_active(ts_host[i], params.cfg_interval) else 1
            with self._image_turn(adapter):
                lat = self.model.embed_latents(x, ts_dev[i : i + 1], pos_ids)  # [1, N, C]
                # the query: the two markers (und expert) and the latents (gen expert), the same in every row
                parts = [markers.expand(active, -1, -1), lat.expand(active, -1, -1)]
                _, hidden = self.model.language_model.model.forward_parts(
                    parts, rope[:active], cache=cache, span=spans[active], causal=False
                )
                v = self.model.velocity(hidden)  # [active, N, p*p*z]
                if active > 1:
                    v = cfg_combine(
                        v[:1], v[1:2], v[2:3] if rows > 2 else v[:1], params.cfg_text_scale, params.cfg_img_scale,
                        params.cfg_renorm_type, params.cfg_renorm_min,
                    )
                x = euler_step(x, v, ts_dev[i], ts_dev[i + 1])
                self._step_done()
            if on_progress is not None:
                on_progress(i + 1, total)
        return x

    # --- misc ---------------------------------------------------------------------------------------------

    def _generator(self, seed: int | None) -> torch.Generator:
        """A per-request generator on the model's device; without a seed, a fresh one from the OS."""
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator(device=self.device).manual_seed(seed)
