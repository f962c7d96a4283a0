"""Unified-SFT of one character (MODEL.md 8.2): LoRA on both experts by default, a full fine-tune as an option.

Notable:
- Joint loss ``ce_weight * CE(text) + mse_weight * MSE(velocity)`` on packed sequences (training/packing.py); the
  VAE is frozen and only encodes each image once. AdamW betas (0.9, 0.95), eps 1e-15, no weight decay, gradient
  norm clipped at 1.0, constant learning rate: the UniCharacter script's values.
- Batches follow the recipe's mixture: each step takes one sample of each group, then fills up to
  ``tokens_per_step`` by group weight (t2i 20000 : vlm 1, so nearly always text-to-image). Step ``n``'s batch and
  noise come from a generator seeded by ``(seed, rank, n)``, so a resumed run sees the batches it would have seen.
- Resumable: every ``checkpoint_every`` steps the trainable weights and the optimizer are written with
  ``torch.distributed.checkpoint`` (sharded under FSDP, plain files in one process) and ``latest`` is switched
  atomically; a restarted run continues from there.
- ``torchrun --nproc-per-node N``: FSDP2 ``fully_shard`` per decoder layer and on the root, one data stream per
  rank; rank 0 reports and writes the adapter. bf16 weights with fp32 LoRA factors on GPU (their products run in
  bf16, as under FSDP's mixed precision), fp32 on CPU.
- One host sync per step (reading the losses), after the next batch is packed: the CPU's packing overlaps the
  GPU's step. Speed knobs: ``checkpoint_layers`` (by default as many layers keep their activations as
  :data:`KEPT_LAYER_TOKENS` allows) and ``compile_kernels``; bench/train_bench.py measures them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from core.model.bagel import Bagel
from core.model.checkpoint import load_bagel, load_vae
from core.model.config import from_checkpoint_dir
from core.model.lora import (
    ALL_TARGETS,
    AdapterMeta,
    attach_lora,
    lora_state_dict,
    save_adapter,
)
from core.model.tokenizer import load_tokenizer
from core.model.transforms import ImageTransform, patchify
from core.model.vae import AutoEncoder
from training.packing import ImagePart, PackedBatch, Packer, Sample, TrainingForward

__all__ = ["SFTConfig", "SFTResult", "StepReport", "Stopped", "pick_device", "run_sft", "sample_batch"]

log = logging.getLogger(__name__)

# Decoder layers x tokens whose activations may stay in memory instead of being recomputed: 20 layers at 8,192
# tokens, about 25 GiB on the 7B with compiled kernels, so one step peaks near 60 GiB on an 80 GB card
# (bench/RESULTS.md). Longer steps keep proportionally fewer layers.
KEPT_LAYER_TOKENS = 20 * 8192


@dataclass(frozen=True)
class SFTConfig:
    """One SFT run's recipe; ``from_recipe`` reads the dict stored on the TrainingJob."""

    steps: int = 500
    lr: float = 1e-4
    rank: int = 64
    alpha: float = 128.0
    targets: tuple[str, ...] = ALL_TARGETS
    tokens_per_step: int = 8192
    ce_weight: float = 0.25
    mse_weight: float = 1.0
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    full_finetune: bool = False
    checkpoint_every: int = 50
    seed: int = 0
    image_size: int = 512
    timestep_shift: float = 1.0
    text_dropout: float = 0.1
    grad_checkpointing: bool = True
    checkpoint_layers: int | None = None  # decoder layers recomputed in backward; None: from the token budget
    compile_kernels: bool = True  # GPU: fuse the element-wise work with torch.compile
    group_weights: dict[str, float] = field(default_factory=lambda: {"t2i": 20000.0, "vlm": 1.0})

    @classmethod
    def from_recipe(cls, recipe: dict, **overrides: object) -> SFTConfig:
        """Build from a TrainingJob's ``config`` dict (unknown keys ignored), then apply ``overrides``."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in {**recipe, **overrides}.items() if k in known}
        for name in ("targets", "betas"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class StepReport:
    """What the loop tells its caller after each optimizer step."""

    step: int
    total: int
    loss: float
    ce: float
    mse: float
    tokens: int
    seconds: float  # this step's wall time
    eta_s: float


@dataclass(frozen=True, slots=True)
class SFTResult:
    """Where the trained weights are and how the loss went."""

    output: Path  # adapter.safetensors (LoRA) or model.safetensors (full fine-tune)
    steps: int
    losses: list[float]
    resumed_from: int


class Stopped(Exception):
    """The caller asked the run to stop (the job was cancelled); the last checkpoint stays for a retry."""


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto``: the local CUDA device in bf16, else the CPU in fp32."""
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


def sample_batch(
    samples: Sequence[Sample], count: Callable[[Sample], int], budget: int, weights: dict[str, float],
    generator: torch.Generator, text_dropout: float,
) -> list[Sample]:
    """One step's samples: one of each group first, then by group weight until ``budget`` tokens are used."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.group, []).append(sample)
    names = sorted(groups)
    probs = torch.tensor([weights.get(n, 1.0) for n in names], dtype=torch.float64)

    def draw(name: str) -> Sample:
        pool = groups[name]
        sample = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        if name == "t2i" and float(torch.rand(1, generator=generator)) < text_dropout:
            sample = Sample(tuple(p for p in sample.parts if isinstance(p, ImagePart)), sample.group)  # for CFG
        return sample

    batch, used = [], 0
    for name in names:
        sample = draw(name)
        if used + count(sample) <= budget or not batch:
            batch.append(sample)
            used += count(sample)
    misses = 0
    while misses < 8:  # fill; eight draws in a row that do not fit end it
        sample = draw(names[int(torch.multinomial(probs, 1, generator=generator))])
        need = count(sample)
        if used + need > budget:
            misses += 1
            continue
        batch.append(sample)
        used += need
    return batch


def _encoder(vae: AutoEncoder, images: dict[str, Image.Image], size: int, device: torch.device, seed: int):  # type: ignore[no-untyped-def]
    """key -> (latent tokens, grid h, grid w); each image encoded once (a posterior sample), kept on the CPU."""
    transform = ImageTransform(max_size=size, min_size=max(16, size // 2), stride=16)
    cache: dict[str, tuple[torch.Tensor, int, int]] = {}

    def encode(key: str) -> tuple[torch.Tensor, int, int]:
        if key not in cache:
            pixels = transform(images[key].convert("RGB"))[None].to(device)
            gen = torch.Generator(device=device).manual_seed(seed)
            with torch.no_grad():
                z = vae.encode(pixels, generator=gen)[0].float().cpu()  # [z, h, w]
            cache[key] = (patchify(z, 2), z.shape[1] // 2, z.shape[2] // 2)
        return cache[key]

    return encode


def _trainable(model: Bagel, config: SFTConfig, dtype: torch.dtype) -> list[str]:
    """Make the right weights trainable; returns their names."""
    if config.full_finetune:
        model.requires_grad_(True)
        for name, param in model.named_parameters():
            if name.endswith("pos_embed"):
                param.requires_grad_(False)  # the frozen sin-cos tables
    else:
        # fp32 master factors while the base runs in bf16
        attach_lora(model, config.rank, config.alpha, config.targets, dtype=torch.float32, seed=config.seed)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _recomputed_layers(config: SFTConfig, layers: int) -> int:
    """How many decoder layers checkpoint their activations (the rest keep them: less recompute)."""
    if not config.grad_checkpointing:
        return 0
    if config.checkpoint_layers is not None:
        return config.checkpoint_layers
    return max(0, layers - KEPT_LAYER_TOKENS // config.tokens_per_step)


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _shard(forward: TrainingForward) -> None:
    """FSDP2 over the ranks of ``torchrun``: one unit per decoder layer, the rest in the root unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=forward.model.dtype, reduce_dtype=torch.float32)
    in_layers: set[nn.Parameter] = set()
    for layer in forward.layers:
        fully_shard(layer, mp_policy=policy)
        in_layers |= set(layer.parameters())
    # the root also reaches the layers' weights through forward.model; those belong to the layer units
    fully_shard(forward, mp_policy=policy, ignored_params=in_layers)


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it runs without a process group; in one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class _Checkpoints:
    """``work_dir/ckpt-<step>`` directories written by DCP, and a ``latest`` pointer switched atomically."""

    def __init__(self, root: Path, rank: int) -> None:
        self.root, self.rank = root, rank

    def latest(self) -> tuple[int, Path] | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        info = json.loads(pointer.read_text())
        path = self.root / info["dir"]
        return (int(info["step"]), path) if path.is_dir() else None

    def save(self, step: int, state: dict, losses: list[float]) -> None:
        path = self.root / f"ckpt-{step}"
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(path))
        if _distributed():
            dist.barrier()
        if self.rank == 0:
            previous = self.latest()
            tmp = self.root / "latest.tmp"
            tmp.write_text(json.dumps({"step": step, "dir": path.name, "losses": losses}))
            tmp.replace(self.root / "latest")
            if previous is not None and previous[1] != path:
                shutil.rmtree(previous[1], ignore_errors=True)

    def losses(self) -> list[float]:
        pointer = self.root / "latest"
        return json.loads(pointer.read_text()).get("losses", []) if pointer.is_file() else []


def run_sft(
    model_dir: Path,
    samples: Sequence[Sample],
    images: dict[str, Image.Image],
    work_dir: Path,
    config: SFTConfig,
    *,
    device: str = "auto",
    dtype: str = "auto",
    base_hash: str = "",
    data_hash: str = "",
    on_step: Callable[[StepReport], bool | None] | None = None,
) -> SFTResult:
    """Train, checkpointing as it goes; resumes from ``work_dir``'s last checkpoint. ``on_step`` False stops it."""
    if not samples:
        raise ValueError("no training samples")
    if _distributed() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    dev, dt = pick_device(device, dtype)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    work_dir.mkdir(parents=True, exist_ok=True)

    cfg = from_checkpoint_dir(model_dir)
    model = load_bagel(cfg, model_dir, device=dev, dtype=dt)
    vae = load_vae(model_dir / "ae.safetensors", device=dev)
    trainable = _trainable(model, config, dt)
    forward = TrainingForward(
        model, recompute=_recomputed_layers(config, cfg.llm.num_hidden_layers),
        compile_kernels=config.compile_kernels and dev.type == "cuda",
    ).train()
    if _distributed():
        _shard(forward)
    params = [p for p in forward.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
        fused=dev.type == "cuda" and not _distributed(),  # one kernel for all parameters (plain tensors only)
    )
    packer = Packer(
        load_tokenizer(model_dir), images, _encoder(vae, images, config.image_size, dev, config.seed),
        vit_side=cfg.vit_max_num_patch_per_side, latent_side=cfg.max_latent_size, patch_size=cfg.vit.patch_size,
    )
    checkpoints = _Checkpoints(work_dir, rank)
    options = StateDictOptions(ignore_frozen_params=True)
    start, losses = 0, []
    if (latest := checkpoints.latest()) is not None:
        start, path = latest
        state = {"model": get_model_state_dict(forward, options=options),
                 "optim": get_optimizer_state_dict(forward, optimizer, options=options)}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
        loading = StateDictOptions(ignore_frozen_params=True, strict=False)  # the base comes from the model folder
        set_model_state_dict(forward, state["model"], options=loading)
        set_optimizer_state_dict(forward, optimizer, state["optim"], options=loading)
        losses = checkpoints.losses()[:start]
        log.info("resuming SFT from step %s of %s", start, config.steps)

    def packed_batch(step: int) -> PackedBatch:
        """Step ``step``'s batch and noise, from a generator of its own (a resumed run sees the same ones)."""
        generator = torch.Generator().manual_seed((config.seed * 1_000_003 + rank * 10_007 + step) & 0x7FFFFFFF)
        batch = sample_batch(samples, packer.count, config.tokens_per_step, config.group_weights, generator,
                             config.text_dropout)
        return packer.pack(batch, generator, config.timestep_shift).to(dev)

    began = time.perf_counter()
    packed = packed_batch(start) if start < config.steps else None
    for step in range(start, config.steps):
        tick = time.perf_counter()
        result = forward(packed, config.ce_weight, config.mse_weight)
        optimizer.zero_grad(set_to_none=True)
        result.total.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        tokens = packed.tokens
        # the next batch is packed on the CPU while the GPU still runs this step; reading the losses is the sync
        packed = packed_batch(step + 1) if step + 1 < config.steps else None
        loss, ce, mse = torch.stack([result.total.detach(), result.ce, result.mse]).tolist()
        losses.append(loss)
        done_here, elapsed = step + 1 - start, time.perf_counter() - began
        report = StepReport(
            step=step + 1, total=config.steps, loss=loss, ce=ce, mse=mse, tokens=tokens,
            seconds=time.perf_counter() - tick, eta_s=elapsed / done_here * (config.steps - step - 1),
        )
        last = step + 1 == config.steps
        if (step + 1) % config.checkpoint_every == 0 or last:
            state = {"model": get_model_state_dict(forward, options=options),
                     "optim": get_optimizer_state_dict(forward, optimizer, options=options)}
            checkpoints.save(step + 1, state, losses)
        if on_step is not None and rank == 0 and on_step(report) is False:
            raise Stopped(f"stopped after step {step + 1}")

    output = _export(forward.model, trainable, config, work_dir, rank, base_hash, data_hash)
    return SFTResult(output=output, steps=config.steps, losses=losses, resumed_from=start)


def _export(
    model: nn.Module, trainable: list[str], config: SFTConfig, work_dir: Path, rank: int, base_hash: str,
    data_hash: str,
) -> Path:
    """The adapter file (LoRA) or the fine-tuned checkpoint (full), written by rank 0."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if config.full_finetune:
        path = work_dir / "model.safetensors"
        if rank == 0:
            tensors = {k: v.contiguous() for k, v in full.items() if k in set(trainable) or "pos_embed" in k}
            save_file(tensors, str(path), metadata={"base_model_hash": base_hash, "steps": str(config.steps),
                                                    "data_hash": data_hash})
        return path
    path = work_dir / "adapter.safetensors"
    if rank == 0:
        tensors = {k: v.contiguous() for k, v in full.items() if ".lora_" in k} if _distributed() else lora_state_dict(model)
        meta = AdapterMeta(base_model_hash=base_hash, rank=config.rank, alpha=config.alpha, steps=config.steps,
                           data_hash=data_hash, targets=config.targets)
        save_adapter(path, tensors, meta)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m training.sft ...``: one SFT run over several GPUs (FSDP)."""
    import argparse

    from core.media import FileStore
    from core.model.lora import base_model_hash
    from training.annotate import read_jsonl

    parser = argparse.ArgumentParser(prog="python -m training.sft", description=main.__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="the base model folder (official layout)")
    parser.add_argument("--annotations", type=Path, required=True, help="annotations.jsonl of a training job")
    parser.add_argument("--files", type=Path, required=True, help="the file store root holding the images")
    parser.add_argument("--work-dir", type=Path, required=True, help="checkpoints and the output go here")
    parser.add_argument("--recipe", default="{}", help='JSON overrides of SFTConfig, e.g. {"steps": 501}')
    parser.add_argument("--full-finetune", action="store_true", help="train every weight (the paper's recipe)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    annotation = read_jsonl(args.annotations)
    store = FileStore(args.files)
    keys = {p.key for s in annotation.train for p in s.parts if isinstance(p, ImagePart)}
    images = {key: Image.open(store.path(key)) for key in keys}
    config = SFTConfig.from_recipe(json.loads(args.recipe), **({"full_finetune": True} if args.full_finetune else {}))
    result = run_sft(args.model_dir, annotation.train, images, args.work_dir, config,
                     base_hash=base_model_hash(args.model_dir), data_hash=annotation.data_hash(),
                     on_step=lambda r: log.info("step %s/%s loss %.4f eta %.0fs", r.step, r.total, r.loss, r.eta_s))
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info("wrote %s", result.output)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
