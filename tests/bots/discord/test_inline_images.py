"""Scene pictures in Discord (issue 8): each policy through the real bot, the fake Discord and the worker path.

A reply's picture is attached to the reply's own webhook message by editing it (the progress shows under the words
meanwhile): the same message id carries the words, the picture and its buttons, and no second message is posted.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select, update

from core.db.models import Character, Job, Message
from core.jobs import JobKind
from tests.bots.discord.conftest import USER_ID, run, running_bot
from tests.bots.discord.fake_discord import BOT_ID, CHANNEL_ID, user_payload
from tests.workers.test_inline_images import PLAN, ThinkingModel

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

USER = user_payload(USER_ID, "sam")
BOT = user_payload(BOT_ID, "UniChar", bot=True)


def jobs(stack: Any) -> list[Job]:
    with stack.sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


@pytest.mark.parametrize(
    ("policy", "text", "plan", "pictures"),
    [
        ("never", "send me a selfie please", PLAN, 0),
        ("on_request", "send me a selfie please", "", 1),
        ("on_request", "how is the sea today?", PLAN, 0),
        ("auto", "how is the sea today?", PLAN, 1),
        ("auto", "how is the sea today?", "<think>words are enough</think>", 0),
    ],
)
def test_each_policy_in_discord(stack: Any, policy: str, text: str, plan: str, pictures: int) -> None:
    stack.live.use_model(ThinkingModel(plan=plan))
    with stack.sessions.begin() as session:
        session.execute(update(Character).values(image_policy=policy))

    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            event = fake.message_event(f"<@{BOT_ID}> {text}", author=USER, mentions=[BOT])
            await fake.dispatch("MESSAGE_CREATE", event)
            await fake.wait_until(lambda: len(jobs(stack)) == 1 + pictures and all(j.finished_at for j in jobs(stack)))
            await fake.wait_until(lambda: all(j.delivered_at for j in jobs(stack)))
            await bot.deliveries.wait_all()
            shown = fake.in_channel(CHANNEL_ID, via="webhook")
            if pictures:  # one webhook message as the character: the reply's words with the picture attached
                [message] = shown
                assert message.username == "Alice" and message.content.startswith("echo: ") and message.files
                picture = jobs(stack)[1]
                assert picture.kind is JobKind.IMAGE
                buttons = [c["custom_id"] for row in message.payload["components"] for c in row["components"]]
                assert [b.split(":")[2:4] for b in buttons] == [[a, str(picture.id)] for a in ("regen", "accept", "delete")]
            else:
                assert shown[0].content.startswith("echo: ") and not any(m.files for m in shown)

    run(body())


class HeldPicture(ThinkingModel):
    """A ThinkingModel whose picture stops after its first step until the test lets it go on."""

    def __init__(self) -> None:
        super().__init__()
        self.go_on = threading.Event()

    def generate_image(self, contexts: Any, params: Any, on_progress: Any = None, adapter: Any = None) -> Any:
        def progress(step: int, total: int) -> None:
            if on_progress is not None:
                on_progress(step, total)
            if step == 1:
                self.go_on.wait(timeout=60)

        return super().generate_image(contexts, params, progress, adapter)


def _hook_posts(fake: Any) -> list[Any]:
    return fake.calls("POST", r"/webhooks/\d+/[^/]+")


async def _ask_for_a_picture(fake: Any, model: HeldPicture) -> Any:
    """A selfie request; returns the reply's webhook message once it shows the picture's progress under the words."""
    asked = fake.message_event(f"<@{BOT_ID}> send me a selfie", author=USER, mentions=[BOT])
    await fake.dispatch("MESSAGE_CREATE", asked)
    return await fake.wait_until(
        lambda: next((m for m in fake.in_channel(CHANNEL_ID, via="webhook") if "\n\n🎨 " in m.content), None)
    )


def _png_of(message: Any) -> Image.Image:
    [data] = message.files.values()
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def test_the_scene_picture_is_attached_to_the_reply_by_editing_it(stack: Any) -> None:
    model = HeldPicture()
    stack.live.use_model(model)

    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            reply = await _ask_for_a_picture(fake, model)
            assert reply.content.startswith("echo: send me a selfie\n\n🎨 ") and not reply.files  # progress shown
            model.go_on.set()
            await fake.wait_until(lambda: reply.files and all(j.delivered_at for j in jobs(stack)))
            await bot.deliveries.wait_all()

            assert len(_hook_posts(fake)) == 1 and fake.in_channel(CHANNEL_ID, via="webhook") == [reply]
            chat, picture = jobs(stack)
            assert reply.content == "echo: send me a selfie" and _png_of(reply).width > 0
            [(_name, data)] = reply.files.items()
            assert data == stack.live.ctx.store.read(picture.result["image_keys"][0])  # the picture the worker made
            [edit] = [c for c in fake.calls("PATCH", rf"/webhooks/\d+/[^/]+/messages/{reply.id}") if c.files]
            assert edit.json["attachments"] and edit.json["allowed_mentions"] == {"parse": []}
            buttons = [c["custom_id"] for row in reply.payload["components"] for c in row["components"]]
            assert buttons == [f"uc:img:{a}:{picture.id}:{USER_ID}" for a in ("regen", "accept", "delete")]
            shown = [f"w:{reply.id}"]  # one id, recorded alike for the words and the picture
            assert chat.delivery["messages"] == shown == chat.delivery["photos"]
            assert picture.delivery == {"parent": chat.id, "photos": shown}
            with stack.sessions() as session:
                assert session.get(Message, chat.reply_message_id).platform_reply_ids == shown

            press = fake.interaction_event(  # Delete takes the picture away and leaves the words
                user=USER, kind=3, data={"custom_id": buttons[2], "component_type": 2}, message=reply
            )
            await fake.dispatch("INTERACTION_CREATE", press)
            await fake.wait_until(lambda: not reply.files)
            assert not reply.deleted and reply.content == "echo: send me a selfie"
            assert reply.payload["components"] == []

    run(body())


def test_a_reply_deleted_while_its_picture_renders_gets_the_picture_on_a_new_message(stack: Any) -> None:
    model = HeldPicture()
    stack.live.use_model(model)

    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            reply = await _ask_for_a_picture(fake, model)
            reply.deleted = True  # a moderator removed it
            model.go_on.set()
            await fake.wait_until(lambda: all(j.delivered_at for j in jobs(stack)))
            await bot.deliveries.wait_all()
            [again] = fake.in_channel(CHANNEL_ID, via="webhook")
            assert again.id != reply.id and len(_hook_posts(fake)) == 2
            assert again.content == "echo: send me a selfie" and _png_of(again).mode == "RGB"
            assert again.payload["components"]  # the picture's buttons came along
            chat = jobs(stack)[0]
            assert chat.delivery["messages"] == [f"w:{again.id}"] == chat.delivery["photos"]

    run(body())
