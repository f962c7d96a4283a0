"""End to end with the real runtime on the tiny random model: a reply and an image through the worker path."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core.db.models import Message
from core.jobs import Attachment, Done, ImageReady, Progress, TextDelta
from core.streams import follow_sync
from tests.factories import image_bytes, incoming
from workers.shared_model import SharedModel, load_runtime
from workers.tasks import execute

pytestmark = pytest.mark.integration


@pytest.fixture
def tiny(ctx, tiny_model_dir):
    """The worker context with the real runtime on the tiny model: small images, few steps, short replies."""
    pytest.importorskip("core.model.runtime")
    small = {"model_dir": tiny_model_dir, "device": "cpu", "image_width": 64, "image_height": 64, "image_steps": 3}
    ctx.settings = ctx.settings.model_copy(update=small | {"max_reply_tokens": 12, "context_tokens": 1024})
    ctx.model = SharedModel(lambda: load_runtime(ctx.settings))
    return ctx


def events(ctx, job_id: int) -> list:
    return [e for _id, e in follow_sync(ctx.redis, ctx.installation, job_id, idle_timeout_s=60)]


def test_a_reply_from_the_tiny_model(tiny, service):
    picture = Attachment("p.png", "image/png", image_bytes())
    job_id = service.handle(incoming("hello, who are you?", attachments=(picture,))).job_id
    execute(tiny, job_id)
    stream = events(tiny, job_id)
    assert isinstance(stream[-1], Done), stream[-1]
    with tiny.sessionmaker() as session:
        reply = session.get(Message, stream[-1].message_id)
    assert reply.role == "character"
    assert reply.text == "".join(e.text for e in stream if isinstance(e, TextDelta)).strip()


def test_an_image_from_the_tiny_model(tiny, service):
    job_id = service.handle(incoming("/imagine a lighthouse")).job_id
    execute(tiny, job_id)
    stream = events(tiny, job_id)
    assert isinstance(stream[-1], Done), stream[-1]
    [ready] = [e for e in stream if isinstance(e, ImageReady)]
    assert (ready.width, ready.height) == (64, 64) and tiny.store.exists(ready.key)
    last = [e for e in stream if isinstance(e, Progress) and e.stage == "image"][-1]
    assert last.step == last.total > 0
    with tiny.sessionmaker() as session:
        assert session.scalars(select(Message.image_keys).where(Message.role == "character")).one() == [ready.key]
