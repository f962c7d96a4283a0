"""One character's training job, start to finish: the function the ``train`` worker task calls.

``run_training(job_id, ...)`` reads the TrainingJob and its submission, annotates the images with the base model
(or reuses the annotation a previous attempt wrote), runs Unified-SFT with progress streamed to the job (SQL row
and ``core.streams`` Progress events) and milestones told to the submitter, evaluates the adapter against the
base model, stores the adapter in the file store and leaves the submission ``evaluated`` for an admin to publish.

The worker owns the Job row's life (claim, complete, fail); this function owns the TrainingJob and submission.
``check()`` (the worker's ``Watch.check``) raises to stop the run when the job is cancelled or times out; without
one, the Job row is read between steps. A crash leaves the last checkpoint: a retry resumes from it.
"""

from __future__ import annotations

import gc
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from sqlalchemy import select

from core.db.models import CharacterSubmission, Job, TrainingJob
from core.jobs import JobState, Progress
from core.media import FileStore
from core.model.api import CharacterModel
from core.model.lora import base_model_hash
from core.submissions import Submissions
from training.annotate import Annotation, Persona, annotate, read_jsonl, write_jsonl
from training.evaluate import EvalConfig, ViTFeatures, evaluate
from training.sft import SFTConfig, StepReport, pick_device, run_sft

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from core.config import Settings

__all__ = ["TrainingCancelled", "load_base_model", "run_training"]

log = logging.getLogger(__name__)

MILESTONES = (25, 50, 75)  # percent of SFT steps at which the submitter hears about progress
ANNOTATIONS = "annotations.jsonl"


class TrainingCancelled(Exception):
    """The job was cancelled while it ran; the run stopped and keeps its last checkpoint."""


@dataclass(frozen=True, slots=True)
class _Work:
    """The plain data of one run (no ORM objects leave their session)."""

    training_id: int
    submission_id: int
    work_dir: Path
    recipe: dict
    persona: Persona
    image_keys: tuple[str, ...]


def load_base_model(settings: Settings) -> CharacterModel:
    """The base runtime the settings name (annotation and evaluation use it; SFT loads its own copy)."""
    from core.model.runtime import UniCharacterRuntime

    return UniCharacterRuntime.load(settings.resolved_model_dir, device=settings.device, dtype=settings.dtype)


def _job_check(db: sessionmaker[Session], job_id: int) -> Callable[[], None]:
    def check() -> None:
        with db() as session:
            state = session.scalar(select(Job.state).where(Job.id == job_id))
        if state is None or state is JobState.CANCELLED:
            raise TrainingCancelled(f"job {job_id} was cancelled")

    return check


def _begin(db: sessionmaker[Session], service: Submissions, job_id: int) -> _Work:
    with db.begin() as session:
        training = session.scalars(select(TrainingJob).where(TrainingJob.job_id == job_id)).one_or_none()
        if training is None:
            raise LookupError(f"job {job_id} has no training job")
        submission = session.get(CharacterSubmission, training.submission_id)
        service.training_started(session, submission.id)
        training.state = "annotating"
        training.total_steps = int(training.config.get("steps", training.total_steps))
        return _Work(
            training_id=training.id,
            submission_id=submission.id,
            work_dir=Path(training.work_dir),
            recipe=dict(training.config),
            persona=Persona(submission.name, submission.description, submission.greeting,
                            submission.example_dialogues),
            image_keys=tuple(image.file_key for image in submission.images),
        )


def _update(db: sessionmaker[Session], training_id: int, **values: object) -> None:
    with db.begin() as session:
        training = session.get(TrainingJob, training_id)
        for name, value in values.items():
            setattr(training, name, value)


def run_training(
    job_id: int,
    *,
    settings: Settings,
    sessionmaker: sessionmaker[Session],
    store: FileStore,
    progress: Callable[[Progress], None] | None = None,
    load_model: Callable[[], CharacterModel] | None = None,
    check: Callable[[], None] | None = None,
    sft_overrides: dict | None = None,
    eval_config: EvalConfig | None = None,
    caption_tokens: int = 64,
) -> dict:
    """Annotate, train, evaluate and store one character's adapter; returns the Job's result dict.

    ``progress`` gets each stage's progress (a worker publishes it on the job's event stream).
    """
    db = sessionmaker
    service = Submissions(settings, store)
    check = check or _job_check(db, job_id)
    load_model = load_model or (lambda: load_base_model(settings))
    work = _begin(db, service, job_id)
    emit = progress or (lambda _event: None)
    try:
        return _run(job_id, work, settings, db, service, store, emit, load_model, check, sft_overrides or {},
                    eval_config or EvalConfig(), caption_tokens)
    except Exception as error:
        with db() as session:
            cancelled = session.scalar(select(Job.state).where(Job.id == job_id)) in (None, JobState.CANCELLED)
        if cancelled:  # the admin's cancel already moved the submission; the checkpoint stays for nothing
            _update(db, work.training_id, state="cancelled")
            shutil.rmtree(work.work_dir, ignore_errors=True)  # nothing to resume: a cancel is final
            log.info("training job %s stopped: %s", job_id, error)
            raise
        _update(db, work.training_id, state="failed")
        with db.begin() as session:
            service.training_failed(session, work.submission_id, f"{type(error).__name__}: {error}")
        raise


def _images(store: FileStore, keys: tuple[str, ...]) -> dict[str, Image.Image]:
    images = {}
    for key in keys:
        with store.open(key) as f:
            image = Image.open(f)
            image.load()
        images[key] = image
    return images


def _free(model: object) -> None:
    """Drop a model before the next phase loads another (one GPU holds one copy at a time)."""
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run(
    job_id: int, work: _Work, settings: Settings, db: sessionmaker[Session], service: Submissions, store: FileStore,
    emit: Callable[[Progress], None], load_model: Callable[[], CharacterModel], check: Callable[[], None],
    sft_overrides: dict, eval_config: EvalConfig, caption_tokens: int,
) -> dict:
    images = _images(store, work.image_keys)
    model_dir = settings.resolved_model_dir
    annotation_path = work.work_dir / ANNOTATIONS
    if annotation_path.is_file():  # a retried run keeps what it trained on
        annotation = read_jsonl(annotation_path)
    else:
        emit(Progress(stage="annotate", step=0, total=len(images)))
        model = load_model()
        annotation = annotate(
            model, work.persona, images, seed=int(work.recipe.get("seed", 0)), max_new_tokens=caption_tokens,
            on_progress=lambda done, total: (check(), emit(Progress("annotate", done, total))),
        )
        _free(model)
        write_jsonl(annotation, annotation_path)
    check()

    config = SFTConfig.from_recipe(work.recipe, **sft_overrides)
    _update(db, work.training_id, state="training", total_steps=config.steps)
    told = {m for m in MILESTONES}

    def on_step(report: StepReport) -> None:
        _update(db, work.training_id, step=report.step, loss=report.loss, eta_s=report.eta_s)
        emit(Progress(stage="train", step=report.step, total=report.total, eta_s=report.eta_s))
        percent = 100 * report.step // report.total
        due = [m for m in sorted(told) if percent >= m]
        if due:
            told.difference_update(due)
            with db.begin() as session:
                service.training_progress(session, work.submission_id, due[-1], report.eta_s)
        check()

    device, dtype = _train_device(settings)
    result = run_sft(
        model_dir, annotation.train, images, work.work_dir, config, device=device, dtype=dtype,
        base_hash=base_model_hash(model_dir), data_hash=annotation.data_hash(), on_step=on_step,
    )
    check()
    _update(db, work.training_id, state="evaluating")
    emit(Progress(stage="evaluate"))
    report = _evaluate(result.output, annotation, images, settings, load_model, store, eval_config, work)
    adapter_key = store.put_path(result.output, ".lora" if not config.full_finetune else ".ckpt")
    report |= {"final_loss": result.losses[-1], "first_loss": result.losses[0], "steps": result.steps,
               "resumed_from": result.resumed_from, "samples": len(annotation.train)}
    _update(db, work.training_id, state="done", adapter_key=adapter_key, report=report, checkpoint_key=None)
    with db.begin() as session:
        service.training_finished(session, work.submission_id)
    _cleanup(work.work_dir)
    return {"adapter_key": adapter_key, "report": report, "training_job_id": work.training_id}


def _train_device(settings: Settings) -> tuple[str, str]:
    device, dtype = pick_device(settings.device, settings.dtype)
    return str(device), str(dtype).removeprefix("torch.")


def _evaluate(
    output: Path, annotation: Annotation, images: dict[str, Image.Image], settings: Settings,
    load_model: Callable[[], CharacterModel], store: FileStore, config: EvalConfig, work: _Work,
) -> dict:
    if output.name != "adapter.safetensors":
        return {"note": "full fine-tune: evaluate by loading model.safetensors as the worker's checkpoint"}
    model = load_model()
    device, _ = pick_device(settings.device, settings.dtype)
    features = ViTFeatures(settings.resolved_model_dir, device)
    try:
        return evaluate(model, str(output), annotation, images, features, config, name=work.persona.name,
                        store_image=lambda data: store.put(data, ".png"))
    finally:
        _free(model)


def _cleanup(work_dir: Path) -> None:
    """Keep the annotation and adapter for review; checkpoints are only for resuming."""
    for path in work_dir.glob("ckpt-*"):
        shutil.rmtree(path, ignore_errors=True)
    (work_dir / "latest").unlink(missing_ok=True)
