"""A TRAIN job goes through the same claim/complete/fail life as a reply, handing the work to training.pipeline."""

from __future__ import annotations

import pytest

from core.db import repositories as repo
from core.db.models import Job
from core.jobs import JobKind, JobState, Progress, decode_event, stream_key
from workers.tasks import execute


@pytest.fixture
def train_job(ctx) -> int:
    with ctx.sessionmaker.begin() as session:
        return repo.create_job(session, JobKind.TRAIN, None).id


def test_the_pipeline_result_completes_the_job(ctx, train_job, monkeypatch):
    calls = []

    def run_training(job_id, **kwargs):
        calls.append((job_id, kwargs))
        kwargs["check"]()  # the worker's watch: the job is running and ours
        kwargs["progress"](Progress("train", step=1, total=2))
        return {"adapter_key": "a" * 64}

    monkeypatch.setattr("training.pipeline.run_training", run_training)
    execute(ctx, train_job)
    [(job_id, kwargs)] = calls
    assert job_id == train_job and kwargs["store"] is ctx.store and kwargs["load_model"] == ctx.model.get
    with ctx.sessionmaker() as session:
        job = session.get(Job, train_job)
    assert job.state is JobState.DONE and job.result == {"adapter_key": "a" * 64} and job.reply_message_id is None
    sent = [decode_event(fields) for _id, fields in ctx.redis.xrange(stream_key(ctx.installation, train_job))]
    assert sent[0] == Progress("train", step=1, total=2)  # the pipeline's progress, on the job's stream


def test_a_pipeline_failure_fails_the_job(ctx, train_job, monkeypatch):
    def run_training(job_id, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("training.pipeline.run_training", run_training)
    execute(ctx, train_job)
    with ctx.sessionmaker() as session:
        job = session.get(Job, train_job)
    assert job.state is JobState.FAILED and "out of memory" in job.error
