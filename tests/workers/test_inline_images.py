"""Scene pictures after replies (issue 8): policies, auto thinking, refusals, failures, reproducible seeds."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from sqlalchemy import select, update

from core.chat import JobQueued, Refusal
from core.db.models import Character, Chat, Job, Message
from core.jobs import Done, Failed, ImageFollows, ImageReady, ImageRefused, JobKind, JobState, TextDelta
from core.model.api import ImageContexts, ImageParams, OnProgress, OnText, Segment, TextParams, TextSegment
from core.model.roleplay import THINK_INSTRUCTION
from core.streams import follow_sync
from tests.doubles import EchoModel, ModelFailure
from tests.factories import incoming
from workers.shared_model import SharedModel
from workers.tasks import execute


class ThinkingModel(EchoModel):
    """An EchoModel whose thinking step plans a picture (``<gen>``) or not; pictures may be told to fail."""

    def __init__(self, plan: str = "", fail_images: bool = False) -> None:
        super().__init__()
        self.plan = plan
        self.fail_images = fail_images

    def generate_text(
        self, context: Sequence[Segment], params: TextParams, on_text: OnText | None = None, adapter: str | None = None
    ) -> str:
        if any(isinstance(s, TextSegment) and s.text.startswith(THINK_INSTRUCTION) for s in context):
            self.calls.append(("thinking", list(context)))
            return self.plan
        return super().generate_text(context, params, on_text, adapter)

    def generate_image(
        self,
        contexts: ImageContexts,
        params: ImageParams,
        on_progress: OnProgress | None = None,
        adapter: str | None = None,
    ):
        if self.fail_images:
            raise ModelFailure("the picture failed on purpose")
        return super().generate_image(contexts, params, on_progress, adapter)


PLAN = "<think>She would show the harbour at dusk.</think><gen>Furina waving at a harbour at dusk, warm light</gen>"


def events(ctx, job_id: int) -> list:
    return [e for _id, e in follow_sync(ctx.redis, ctx.installation, job_id, idle_timeout_s=30)]


def use(ctx, model: EchoModel) -> EchoModel:
    ctx.model = SharedModel(lambda: model)
    return model


def set_policy(ctx, policy: str) -> None:
    with ctx.sessionmaker.begin() as session:
        session.execute(update(Character).values(image_policy=policy))


def reply(ctx, service, sent: list, text: str, **who: str) -> tuple[list, list[Job]]:
    """Send ``text``, run its chat job; the chat job's events and the image jobs it queued."""
    outcome = service.handle(incoming(text, **who))
    assert isinstance(outcome, JobQueued)
    sent.clear()
    execute(ctx, outcome.job_id)  # the context records follow-ups in ``sent``
    stream = events(ctx, outcome.job_id)
    with ctx.sessionmaker() as session:
        pictures = [session.get(Job, job_id) for job_id, kind in sent if kind is JobKind.IMAGE]
        session.expunge_all()
    return stream, pictures


def test_an_ask_under_on_request_queues_a_scene_picture_announced_before_done(ctx, service, sent):
    stream, [picture] = reply(ctx, service, sent, "send me a selfie please")
    assert isinstance(stream[-1], Done) and stream[-2] == ImageFollows(picture.id)
    text = "".join(e.text for e in stream if isinstance(e, TextDelta)).strip()
    p = picture.params
    assert p["scene"] and p["prompt"] == "send me a selfie please" and p["reply"] == text and p["subject"] == "self"
    assert p["seed"] > 0 and p["width"] == p["height"] == 256 and p["num_timesteps"] == 12  # the tiny-model preset
    assert p["chat_id"] and p["reply_message_id"] == stream[-1].message_id

    execute(ctx, picture.id)
    image_stream = events(ctx, picture.id)
    [ready] = [e for e in image_stream if isinstance(e, ImageReady)]
    assert isinstance(image_stream[-1], Done) and image_stream[-1].message_id is None and ready.seed == p["seed"]
    with ctx.sessionmaker() as session:
        job = session.get(Job, picture.id)
        assert job.result["seed"] == p["seed"] and job.result["gpu_s"] >= 0 and job.result["device"]
        assert job.result["params"]["num_timesteps"] == 12
        assert session.get(Message, p["reply_message_id"]).image_keys == [ready.key]  # the picture shows that reply
    [(_kind, contexts)] = [call for call in ctx.model.get().calls if call[0] == "image"]
    prompt = contexts.cond[-1].text
    assert "send me a selfie please" in prompt and text in prompt  # conditioned on the words and the reply


def test_never_and_plain_chat_queue_no_picture(ctx, service, sent):
    _stream, pictures = reply(ctx, service, sent, "hello, how are you today?")
    assert pictures == []
    set_policy(ctx, "never")
    stream, pictures = reply(ctx, service, sent, "send me a selfie please")
    assert pictures == [] and not any(isinstance(e, (ImageFollows, ImageRefused)) for e in stream)


def test_auto_draws_only_when_the_thinking_step_plans_a_picture(ctx, service, sent):
    set_policy(ctx, "auto")
    model = use(ctx, ThinkingModel(plan="<think>Nothing to show here.</think>"))
    _stream, pictures = reply(ctx, service, sent, "tell me about your day")
    assert pictures == [] and any(kind == "thinking" for kind, _ in model.calls)

    model.plan = PLAN
    stream, [picture] = reply(ctx, service, sent, "tell me about the harbour")
    assert ImageFollows(picture.id) in stream
    assert picture.params["why"] == "auto" and "harbour at dusk" in picture.params["instruction"]
    execute(ctx, picture.id)
    [(_kind, contexts)] = [call for call in model.calls if call[0] == "image"]
    assert "Generation Instruction: Furina waving" in contexts.cond[-1].text

    thinking_before = sum(kind == "thinking" for kind, _ in model.calls)
    _stream, pictures = reply(ctx, service, sent, "and then?")  # spacing: too soon after the last picture
    assert pictures == [] and sum(kind == "thinking" for kind, _ in model.calls) == thinking_before


def test_a_failing_thinking_step_costs_the_picture_never_the_reply(ctx, service, sent):
    set_policy(ctx, "auto")
    model = use(ctx, ThinkingModel(plan=PLAN))
    model.generate_text = _thinking_fails(model.generate_text)  # type: ignore[method-assign]
    stream, pictures = reply(ctx, service, sent, "tell me about the harbour")
    assert pictures == [] and isinstance(stream[-1], Done) and any(isinstance(e, TextDelta) for e in stream)


def _thinking_fails(generate_text):
    def generate(context, params, on_text=None, adapter=None):
        if any(isinstance(s, TextSegment) and s.text.startswith(THINK_INSTRUCTION) for s in context):
            raise ModelFailure("thinking failed on purpose")
        return generate_text(context, params, on_text, adapter)

    return generate


def test_a_spent_quota_refuses_the_picture_and_the_reply_still_arrives(ctx, service, sent):
    ctx.settings = ctx.settings.model_copy(update={"image_quota_user_per_day": 1})
    service.settings = ctx.settings
    _stream, [_first] = reply(ctx, service, sent, "send me a selfie please")
    stream, pictures = reply(ctx, service, sent, "send me another pic please")
    assert pictures == []
    [refused] = [e for e in stream if isinstance(e, ImageRefused)]
    assert "used your 1 picture for today" in refused.reason
    assert isinstance(stream[-1], Done) and any(isinstance(e, TextDelta) for e in stream)
    refusal = service.handle(incoming("/imagine a lighthouse"))
    assert isinstance(refusal, Refusal) and "used your 1 picture for today" in refusal.reason


def test_nsfw_and_banned_words_are_refused_with_the_reply(ctx, service, sent):
    ctx.settings = ctx.settings.model_copy(update={"image_banned_words": ["gore"]})
    service.settings = ctx.settings
    stream, pictures = reply(ctx, service, sent, "send me a nude selfie")
    assert pictures == [] and "adult" in next(e for e in stream if isinstance(e, ImageRefused)).reason
    assert isinstance(service.handle(incoming("/imagine gore everywhere")), Refusal)


def test_a_failing_picture_leaves_the_reply_intact(ctx, service, sent):
    use(ctx, ThinkingModel(fail_images=True))
    stream, [picture] = reply(ctx, service, sent, "send me a selfie please")
    execute(ctx, picture.id)
    assert isinstance(events(ctx, picture.id)[-1], Failed)
    with ctx.sessionmaker() as session:
        assert session.get(Job, picture.id).state is JobState.FAILED
        kept = session.get(Message, stream[-1].message_id)
        assert kept.text.startswith("echo:") and kept.image_keys == []


def test_regenerate_keeps_the_scene_with_a_new_seed_for_the_requester_only(ctx, service, sent):
    _stream, [picture] = reply(ctx, service, sent, "send me a selfie please")
    assert isinstance(service.handle(incoming(f"/regenerate {picture.id}", user="someone-else")), Refusal)
    again = service.handle(incoming(f"/regenerate {picture.id}"))
    assert isinstance(again, JobQueued) and again.kind is JobKind.IMAGE
    with ctx.sessionmaker() as session:
        new = session.get(Job, again.job_id).params
    assert new["seed"] != picture.params["seed"]
    assert {k: v for k, v in new.items() if k != "seed"} == {k: v for k, v in picture.params.items() if k != "seed"}


def test_the_chat_quota_counts_every_picture_of_the_chat(ctx, service, sent):
    ctx.settings = ctx.settings.model_copy(update={"image_quota_chat_per_day": 1})
    service.settings = ctx.settings
    assert isinstance(service.handle(incoming("/imagine a boat", user="a", chat="g", is_group=True)), JobQueued)
    refusal = service.handle(incoming("/imagine a cat", user="b", chat="g", is_group=True))
    assert isinstance(refusal, Refusal) and "This chat has used its 1 picture for today" in refusal.reason
    with ctx.sessionmaker() as session:
        assert session.scalar(select(Chat.id).where(Chat.platform_chat_id == "g"))


@pytest.mark.integration
def test_the_stored_seed_reproduces_the_same_picture(ctx, service, tiny_model_dir):
    pytest.importorskip("core.model.runtime")
    from workers.shared_model import load_runtime

    small = {"model_dir": tiny_model_dir, "device": "cpu", "image_width": 64, "image_height": 64, "image_steps": 3}
    ctx.settings = ctx.settings.model_copy(update=small)
    ctx.model = SharedModel(lambda: load_runtime(ctx.settings))
    service.settings = ctx.settings
    first = service.handle(incoming("/imagine a lighthouse"))
    execute(ctx, first.job_id)
    with ctx.sessionmaker.begin() as session:
        job = session.get(Job, first.job_id)
        again = Job(kind=JobKind.IMAGE, user_id=job.user_id, conversation_id=job.conversation_id,
                    request_message_id=job.request_message_id, params=dict(job.params))
        session.add(again)
        session.flush()
        again_id, keys = again.id, job.result["image_keys"]
    execute(ctx, again_id)
    with ctx.sessionmaker() as session:
        assert session.get(Job, again_id).result["image_keys"] == keys  # content-addressed: the same bytes


@pytest.mark.integration
def test_a_scene_picture_with_a_reference_image_from_the_tiny_model(ctx, service, sent, tiny_model_dir):
    pytest.importorskip("core.model.runtime")
    from core.characters import accept_image, add_reference_image
    from tests.factories import image_bytes
    from workers.shared_model import load_runtime

    small = {"model_dir": tiny_model_dir, "device": "cpu", "image_width": 64, "image_height": 64, "image_steps": 3}
    ctx.settings = ctx.settings.model_copy(update=small | {"max_reply_tokens": 8, "context_tokens": 1024})
    ctx.model = SharedModel(lambda: load_runtime(ctx.settings))
    service.settings = ctx.settings
    with ctx.sessionmaker.begin() as session:
        furina = session.scalars(select(Character)).one()
        add_reference_image(session, furina, accept_image(image_bytes(size=(64, 64)), ctx.settings), ctx.store)
    _stream, [picture] = reply(ctx, service, sent, "send me a selfie please")
    execute(ctx, picture.id)
    stream = events(ctx, picture.id)
    assert isinstance(stream[-1], Done), stream[-1]
    with ctx.sessionmaker() as session:
        result = session.get(Job, picture.id).result
    assert result["references"] == 1 and result["params"]["width"] == 64 and result["device"] == "cpu"
