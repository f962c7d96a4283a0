"""A RoleScape character from submission to a published adapter used in chat, on the tiny model (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from core.db.models import Character, CharacterSubmission, Job, TrainingJob
from core.jobs import JobState
from core.model.api import ImageContexts, ImageParams, TextParams, TextSegment
from core.model.lora import read_meta
from core.model.runtime import UniCharacterRuntime
from core.submissions import Actor, State
from tests.doubles import EchoModel
from training.annotate import read_jsonl
from training.evaluate import EvalConfig
from training.intake import submit_rolescape
from training.pipeline import TrainingCancelled, run_training

USER = Actor("test", "fan")
ADMIN = Actor("test", "admin")
SFT = {"steps": 4, "rank": 4, "alpha": 8.0, "lr": 5e-3, "tokens_per_step": 1500, "image_size": 64,
       "checkpoint_every": 2}
EVAL = EvalConfig(width=64, height=64, num_timesteps=3, max_new_tokens=8, max_qa_items=2)


def approved(stack, folder) -> int:
    settings, db, store, service = stack
    with db.begin() as s:
        sid = submit_rolescape(s, service, USER, folder).id
    with db.begin() as s:
        job_id = service.approve(s, ADMIN, sid)
        s.get(Job, job_id).state = JobState.RUNNING  # what the worker's claim does
    return job_id


def train(stack, job_id, model=None, **kwargs):
    """Run the pipeline; annotation and evaluation use ``model`` (default: the tiny runtime itself)."""
    settings, db, store, _ = stack
    model = model or UniCharacterRuntime.load(settings.resolved_model_dir, device="cpu")
    return run_training(job_id, settings=settings, sessionmaker=db, store=store, load_model=lambda: model,
                        sft_overrides=SFT, eval_config=EVAL, caption_tokens=6, **kwargs), model


def test_submission_to_published_adapter_in_chat(stack, ichihime):
    settings, db, store, service = stack
    job_id = approved(stack, ichihime)
    result, runtime = train(stack, job_id)
    report = result["report"]
    assert report["steps"] == 4 and report["identity_similarity"] is not None and report["qa_items"] == 2
    with db.begin() as s:
        training = s.scalars(select(TrainingJob)).one()
        assert training.state == "done" and training.step == 4 and training.report == report
        annotation = read_jsonl(settings.data_dir / "training" / f"job-{training.id}" / "annotations.jsonl")
        assert len(annotation.captions) == 10 and len(annotation.heldout_images) == 2
        assert {s.group for s in annotation.train} == {"t2i", "vlm"}
        sid = training.submission_id
        assert s.get(CharacterSubmission, sid).state == State.EVALUATED
        character = service.publish(s, ADMIN, sid)
        adapter_path = store.path(character.adapter_key)
    meta = read_meta(adapter_path)
    assert meta.steps == 4 and meta.rank == 4 and meta.data_hash == annotation.data_hash()

    with db() as s:
        assert s.scalars(select(Character)).one().adapter_version == 1
    context = [TextSegment("Hello Ichihime!")]
    reply = runtime.generate_text(context, TextParams(max_new_tokens=6, temperature=0.0), adapter=str(adapter_path))
    assert isinstance(reply, str)
    params = ImageParams(width=64, height=64, num_timesteps=3, seed=1)
    tuned = runtime.generate_image(ImageContexts(cond=context), params, adapter=str(adapter_path))
    base = runtime.generate_image(ImageContexts(cond=context), params)
    assert tuned.size == (64, 64)
    assert not np.array_equal(np.asarray(tuned), np.asarray(base))  # the adapter is really applied


def test_crash_resumes_from_last_checkpoint(stack, ichihime):
    settings, db, store, service = stack
    job_id = approved(stack, ichihime)

    def crash_at_step_3() -> None:
        with db() as s:
            if s.scalars(select(TrainingJob.step)).one() >= 3:
                raise RuntimeError("worker died")

    events: list = []
    with pytest.raises(RuntimeError, match="worker died"):
        train(stack, job_id, EchoModel(), check=crash_at_step_3, progress=events.append)
    assert [(e.stage, e.step) for e in events if e.stage == "train"] == [("train", 1), ("train", 2), ("train", 3)]
    with db.begin() as s:
        submission = s.scalars(select(CharacterSubmission)).one()
        assert submission.state == State.FAILED and "worker died" in submission.reason
        retry_job = service.retry(s, ADMIN, submission.id)
        s.get(Job, retry_job).state = JobState.RUNNING
    result, _ = train(stack, retry_job, EchoModel())
    assert result["report"]["resumed_from"] == 2  # the checkpoint written at step 2


def test_cancelled_training_stops_and_leaves_nothing(stack, ichihime):
    settings, db, store, service = stack
    job_id = approved(stack, ichihime)
    with db() as s:
        work_dir = settings.data_dir / "training" / f"job-{s.scalars(select(TrainingJob.id)).one()}"

    def cancel_at_step_2() -> None:
        with db.begin() as s:
            training = s.scalars(select(TrainingJob)).one()
            if training.step >= 2 and s.get(Job, job_id).state is JobState.RUNNING:
                service.admin_cancel(s, ADMIN, training.submission_id, "test")
        with db() as s:
            if s.get(Job, job_id).state is JobState.CANCELLED:
                raise TrainingCancelled("cancelled")

    with pytest.raises(TrainingCancelled):
        train(stack, job_id, EchoModel(), check=cancel_at_step_2)
    with db() as s:
        assert s.scalars(select(TrainingJob.state)).one() == "cancelled"
        assert s.scalars(select(CharacterSubmission.state)).one() == State.CANCELLED
        assert s.scalars(select(CharacterSubmission)).one().images == []
    assert not work_dir.exists()
