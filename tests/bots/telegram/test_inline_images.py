"""Scene pictures in Telegram (issue 8): each policy through the real bot, the fake Bot API and the worker path."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from core.db.models import Character
from core.jobs import JobKind
from tests.bots.telegram.conftest import ANN, BOB, fake_api, jobs, run, running_bot
from tests.conftest import Live
from tests.workers.test_inline_images import PLAN, ThinkingModel

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def all_delivered(live: Live):
    def check() -> bool:
        rows = jobs(live)
        return bool(rows) and all(job.delivered_at is not None for job in rows)

    return check


def with_policy(live: Live, policy: str, plan: str = "") -> None:
    live.use_model(ThinkingModel(plan=plan))
    with live.sessionmaker.begin() as session:
        session.execute(update(Character).values(image_policy=policy))


@pytest.mark.parametrize(
    ("policy", "text", "plan", "pictures"),
    [
        ("never", "send me a selfie please", PLAN, 0),
        ("on_request", "send me a selfie please", "", 1),
        ("on_request", "how was the tournament?", PLAN, 0),
        ("auto", "how was the tournament?", PLAN, 1),
        ("auto", "how was the tournament?", "<think>words are enough</think>", 0),
    ],
)
def test_each_policy_in_telegram(tg: Live, policy: str, text: str, plan: str, pictures: int) -> None:
    with_policy(tg, policy, plan)

    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            asked = await fake.send(ANN, ANN, text)
            await fake.wait_for(lambda: len(jobs(tg)) == 1 + pictures and all_delivered(tg)())
            shown = fake.bot_messages(ANN)
            photos = [m for m in shown if m.photo]
            assert len(photos) == pictures
            if pictures:  # the short reply is the photo's caption: one message, with the picture's buttons
                [photo] = photos
                assert shown == [photo] and photo.caption.startswith("echo: ") and photo.reply_to == asked
                picture = jobs(tg)[1]
                assert picture.kind is JobKind.IMAGE and photo.buttons[0][1] == f"img:again:{picture.id}"
            else:
                assert shown[0].text.startswith("echo: ")

    run(body)


def test_a_refused_picture_is_explained_and_regenerate_redraws_a_scene(tg: Live) -> None:
    with_policy(tg, "on_request")

    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fake.send(ANN, ANN, "send me a naked selfie")
            await fake.wait_for(all_delivered(tg))
            texts = [m.text for m in fake.bot_messages(ANN)]
            assert texts[0].startswith("echo: ") and "adult images" in texts[-1] and len(jobs(tg)) == 1

            await fake.send(ANN, ANN, "show me your outfit")
            photo = await fake.wait_for(lambda: next((m for m in fake.bot_messages(ANN) if m.photo), None))
            await fake.wait_for(all_delivered(tg))
            regenerate = photo.buttons[0][1]
            await fake.press(ANN, BOB, photo.message_id, regenerate)
            await fake.wait_for(lambda: [c for c in fake.called("answerCallbackQuery") if c.get("show_alert")])
            await fake.press(ANN, ANN, photo.message_id, regenerate)
            await fake.wait_for(lambda: len([m for m in fake.bot_messages(ANN) if m.photo]) == 2)
            await fake.wait_for(all_delivered(tg))
            first, again = [job for job in jobs(tg) if job.kind is JobKind.IMAGE]
            assert again.params["scene"] and again.params["reply"] == first.params["reply"]
            assert again.params["seed"] != first.params["seed"]

    run(body)
