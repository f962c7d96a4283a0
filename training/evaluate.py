"""Does the trained character look and talk like itself? A report for the admin before it is published.

- Identity: images generated with the adapter from the held-out images' captions, compared with the held-out
  references by cosine similarity of the model's own SigLIP features (mean-pooled ViT output). The same prompts
  without the adapter give the base model's score, so the report shows the gain, not just a number.
- Persona: the held-out role-play turns answered greedily with and without the adapter, scored by unigram F1
  against the submitter's own reply text.
Only the ViT is loaded for features (``vit_model.*`` tensors of the base file), not a second copy of the model.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from core.model.api import (
    CharacterModel,
    ImageContexts,
    ImageParams,
    TextParams,
    TextSegment,
)
from core.model.config import from_checkpoint_dir
from core.model.transforms import (
    VIT_MAX_PATCHES_PER_SIDE,
    VIT_TRANSFORM,
    flattened_position_ids,
    patchify,
)
from core.model.vit import SiglipVisionModel
from training.annotate import Annotation

__all__ = ["EvalConfig", "ViTFeatures", "evaluate", "token_f1"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """How much to generate: images per held-out reference, their size and steps, reply length."""

    images_per_reference: int = 1
    width: int = 512
    height: int = 512
    num_timesteps: int = 30
    max_new_tokens: int = 128
    max_qa_items: int = 20
    seed: int = 0


class ViTFeatures:
    """Mean-pooled SigLIP features of images, with the base model's own ViT weights."""

    def __init__(self, model_dir: Path, device: torch.device | str = "cpu") -> None:
        cfg = from_checkpoint_dir(model_dir)
        self.device = torch.device(device)
        with torch.device("meta"):
            vit = SiglipVisionModel(cfg.vit)
        prefix = "vit_model."
        with safe_open(str(model_dir / "ema.safetensors"), framework="pt", device=str(self.device)) as f:
            state = {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
        vit.load_state_dict(state, strict=True, assign=True)
        self.vit = vit.eval().requires_grad_(False)
        self.patch = cfg.vit.patch_size

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> torch.Tensor:
        """A unit feature vector ``[hidden]``."""
        pixels = VIT_TRANSFORM(image.convert("RGB"))
        h, w = pixels.shape[1] // self.patch, pixels.shape[2] // self.patch
        patches = patchify(pixels, self.patch).to(self.device)
        positions = flattened_position_ids(h, w, VIT_MAX_PATCHES_PER_SIDE).to(self.device)
        cu = torch.tensor([0, patches.shape[0]], dtype=torch.int32)
        features = self.vit(patches, cu, positions)
        return F.normalize(features.float().mean(0), dim=0)


_WORD = re.compile(r"\w+", re.UNICODE)


def token_f1(prediction: str, reference: str) -> float:
    """Unigram F1 of lower-cased words (SQuAD-style), 0 when either side is empty."""
    pred, ref = Counter(_WORD.findall(prediction.lower())), Counter(_WORD.findall(reference.lower()))
    common = sum((pred & ref).values())
    if not common:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True, slots=True)
class _Side:
    identity: float | None
    qa_f1: float | None
    replies: list[str]
    images: list[Image.Image]


def _run_side(
    model: CharacterModel, adapter: str | None, prompts: Sequence[str], references: Sequence[torch.Tensor],
    qa: Sequence[tuple[str, str]], features: ViTFeatures, config: EvalConfig,
) -> _Side:
    images, sims = [], []
    for i, prompt in enumerate(prompts):
        params = ImageParams(width=config.width, height=config.height, num_timesteps=config.num_timesteps,
                             seed=config.seed + i)
        image = model.generate_image(ImageContexts(cond=[TextSegment(prompt)]), params, adapter=adapter)
        images.append(image)
        feature = features(image)
        sims.append(max(float(feature @ ref) for ref in references))
    replies, scores = [], []
    text = TextParams(max_new_tokens=config.max_new_tokens, temperature=0.0, seed=config.seed)
    for prompt, expected in qa:
        reply = model.generate_text([TextSegment(prompt)], text, adapter=adapter)
        replies.append(reply)
        scores.append(token_f1(reply, expected))
    return _Side(
        identity=sum(sims) / len(sims) if sims else None,
        qa_f1=sum(scores) / len(scores) if scores else None,
        replies=replies,
        images=images,
    )


def evaluate(
    model: CharacterModel,
    adapter: str,
    annotation: Annotation,
    images: dict[str, Image.Image],
    features: ViTFeatures,
    config: EvalConfig = EvalConfig(),
    *,
    name: str,
    store_image: Callable[[bytes], str] | None = None,
) -> dict:
    """The evaluation report (JSON-able): identity and persona scores with and without the adapter, examples."""
    captions = {c.key: c for c in annotation.captions}
    refs = list(annotation.heldout_images) or sorted(images)[:1]  # with no held-out image, any reference
    references = [features(images[key]) for key in refs]
    prompts = [captions[key].short(name) for key in refs if key in captions] * config.images_per_reference
    qa = list(annotation.heldout_qa)[: config.max_qa_items]
    tuned = _run_side(model, adapter, prompts, references, qa, features, config)
    base = _run_side(model, None, prompts, references, qa, features, config)
    keys = []
    if store_image is not None:
        for image in tuned.images:
            out = io.BytesIO()
            image.save(out, format="PNG")
            keys.append(store_image(out.getvalue()))
    report = {
        "identity_similarity": tuned.identity,
        "identity_similarity_base": base.identity,
        "persona_f1": tuned.qa_f1,
        "persona_f1_base": base.qa_f1,
        "references": refs,
        "generated_images": keys,
        "qa_items": len(qa),
        "examples": [
            {"prompt": p[-300:], "expected": e, "reply": r} for (p, e), r in zip(qa[:3], tuned.replies[:3])
        ],
        "config": asdict(config),
    }
    log.info("evaluation of %s: identity %s (base %s), persona F1 %s (base %s)", name,
             report["identity_similarity"], report["identity_similarity_base"], report["persona_f1"],
             report["persona_f1_base"])
    return report
