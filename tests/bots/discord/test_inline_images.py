"""Scene pictures in Discord (issue 8): each policy through the real bot, the fake Discord and the worker path."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update

from core.db.models import Character, Job
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
