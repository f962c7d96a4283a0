"""End to end: users chat with the real bot (python-telegram-bot against the fake Bot API) through the worker path."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from core.db.models import Job, Message, User
from core.jobs import JobState
from tests.bots.telegram.conftest import (
    ANN,
    BOB,
    GROUP,
    fake_api,
    jobs,
    png,
    run,
    running_bot,
)
from tests.bots.telegram.fake_bot_api import BOT_USERNAME, FakeBotApi
from tests.conftest import Live
from tests.doubles import EchoModel

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def delivered(live: Live, count: int = 1):
    """A predicate: ``count`` jobs exist and all are delivered."""

    def check() -> bool:
        rows = jobs(live)
        return len(rows) >= count and all(job.delivered_at is not None for job in rows)

    return check


def reply_texts(fake: FakeBotApi, chat_id: int) -> list[str]:
    return [m.text for m in fake.bot_messages(chat_id) if m.photo is None]


def test_private_message_gets_a_streamed_reply(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            asked = await fake.send(ANN, ANN, "Hello there, how are you?")
            await fake.wait_for(delivered(tg))
            replies = fake.bot_messages(ANN)
            assert [m.text for m in replies] == ["echo: Hello there, how are you?"]
            assert replies[0].reply_to == asked
            assert any(call["action"] == "typing" for call in fake.called("sendChatAction"))
            job = jobs(tg)[0]
            assert job.state is JobState.DONE
            assert job.delivery["messages"] == [str(replies[0].message_id)]

    run(body)


def test_long_reply_is_split_at_4096_utf16_units(tg: Live) -> None:
    long_text = " ".join(["🎉word"] * 1500)  # about 10,500 UTF-16 units once echoed

    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake, max_message_chars=20000):
            await fake.send(ANN, ANN, long_text)
            await fake.wait_for(delivered(tg))
            texts = reply_texts(fake, ANN)
            assert len(texts) == 3
            assert " ".join(texts).split() == f"echo: {long_text}".split()

    run(body)


def test_flood_wait_is_honoured_and_nothing_is_posted_twice(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            fake.fail_next("sendMessage", 429, retry_after=1)
            fake.fail_next("editMessageText", 429, retry_after=1)
            await fake.send(ANN, ANN, "Are you there?")
            await fake.wait_for(delivered(tg))
            assert reply_texts(fake, ANN) == ["echo: Are you there?"]
            assert len(fake.called("sendMessage")) == 2  # refused once with retry_after, then sent once

    run(body)


def test_photo_with_a_caption_is_answered_about_the_picture(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fake.send(ANN, ANN, photo=png(), caption="What do you see?")
            await fake.wait_for(delivered(tg))
            assert reply_texts(fake, ANN) == ["echo: What do you see? (I see 1 image)"]
            with tg.sessionmaker() as session:
                request = session.get(Job, jobs(tg)[0].id)
                assert request is not None

    run(body)


def test_album_is_one_question_about_all_its_pictures(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            for seed in range(3):
                await fake.send(ANN, ANN, photo=png(seed=seed), caption="Which is best?" if seed == 0 else None,
                                media_group_id="album1")
            await fake.wait_for(delivered(tg))
            assert reply_texts(fake, ANN) == ["echo: Which is best? (I see 3 images)"]
            assert len(jobs(tg)) == 1

    run(body)


def test_imagine_delivers_a_photo_with_buttons_only_the_requester_can_press(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fake.send(GROUP, ANN, f"/imagine@{BOT_USERNAME} us at the harbour at dusk")
            photo = await fake.wait_for(lambda: next((m for m in fake.bot_messages(GROUP) if m.photo), None))
            assert [label for label, _ in photo.buttons] == ["🔁 Regenerate", "✅ Accept"]
            await fake.wait_for(delivered(tg))
            assert fake.bot_messages(GROUP) == [photo]  # the progress line is gone
            assert any(call["action"] == "upload_photo" for call in fake.called("sendChatAction"))
            regenerate, accept = (data for _, data in photo.buttons)

            await fake.press(GROUP, BOB, photo.message_id, regenerate)
            refusal = await fake.wait_for(lambda: [c for c in fake.called("answerCallbackQuery") if c.get("show_alert")])
            assert "Only the person" in refusal[0]["text"]
            assert len(jobs(tg)) == 1

            await fake.press(GROUP, ANN, photo.message_id, regenerate)
            await fake.wait_for(delivered(tg, 2))
            await fake.wait_for(lambda: len([m for m in fake.bot_messages(GROUP) if m.photo]) == 2)
            assert jobs(tg)[1].params["prompt"] == "us at the harbour at dusk"

            await fake.press(GROUP, ANN, photo.message_id, accept)
            await fake.wait_for(lambda: fake.find(GROUP, photo.message_id).reply_markup is None)
            assert jobs(tg)[0].delivery["accepted_by"] == str(ANN)

    run(body)


def test_typed_regenerate_redraws_the_last_picture_here(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fake.send(ANN, ANN, "/regenerate")
            await fake.wait_for(lambda: any("no picture here" in text for text in reply_texts(fake, ANN)))
            await fake.send(ANN, ANN, "/imagine a lighthouse in fog")
            await fake.wait_for(delivered(tg))
            await fake.send(ANN, ANN, "/regenerate")
            await fake.wait_for(delivered(tg, 2))
            await fake.wait_for(lambda: len([m for m in fake.bot_messages(ANN) if m.photo]) == 2)
        first, again = jobs(tg)
        assert again.params["prompt"] == first.params["prompt"] == "a lighthouse in fog"
        assert again.params["seed"] != first.params["seed"]

    run(body)


class PausingPainter(EchoModel):
    """Draws like EchoModel but stops halfway through its steps until ``resume`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = threading.Event()
        self.halfway = threading.Event()

    def generate_image(self, contexts, params, on_progress=None, adapter=None):  # type: ignore[no-untyped-def]
        def report(step: int, total: int) -> None:
            if on_progress is not None:
                on_progress(step, total)
            if step == total // 2:
                self.halfway.set()
                self.resume.wait(timeout=60)

        return super().generate_image(contexts, params, report, adapter)


def test_queue_position_and_percent_are_shown_while_pictures_render(tg: Live) -> None:
    painter = PausingPainter()
    tg.use_model(painter)
    users = [8001 + i for i in range(6)]  # the worker draws 3 at once (its 4th thread is kept for replies)

    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            for user in users:
                await fake.send(user, user, "/imagine a lantern festival")
            last = users[-1]
            await fake.wait_for(lambda: any("2 jobs ahead" in m.text for m in fake.bot_messages(last)))
            first = users[0]
            await fake.wait_for(lambda: any("50%" in m.text for m in fake.bot_messages(first)))
            painter.resume.set()
            await fake.wait_for(delivered(tg, len(users)), timeout=120)
            for user in users:
                shown = fake.bot_messages(user)
                assert len(shown) == 1 and shown[0].photo is not None  # status lines replaced by the photo

    run(body)


def test_group_answers_only_mentions_replies_and_the_trigger_word(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake, telegram_trigger_word="Ichi"):
            await fake.send(GROUP, ANN, "just people talking")
            await fake.send(GROUP, ANN, photo=png(), caption="look at my cat")
            await fake.send(GROUP, ANN, sticker=True)
            await fake.send(GROUP, ANN, "/newcharacter")
            await fake.wait_for(lambda: any("private chat" in t for t in reply_texts(fake, GROUP)))
            await fake.send(GROUP, BOB, f"@{BOT_USERNAME} hi there")
            await fake.wait_for(delivered(tg, 1))
            first = fake.bot_messages(GROUP)[1]
            assert first.text == "echo: hi there"
            await fake.send(GROUP, ANN, "and you?", reply_to=first.message_id)
            await fake.wait_for(delivered(tg, 2))
            await fake.send(GROUP, ANN, "hey ichi, play with us")
            await fake.wait_for(delivered(tg, 3))
            assert reply_texts(fake, GROUP)[1:] == ["echo: hi there", "echo: and you?", "echo: hey ichi, play with us"]
            assert len(jobs(tg)) == 3  # the chatter, the cat picture and the sticker were not for the bot

    run(body)


def test_start_offers_characters_and_a_button_switches(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fake.send(ANN, ANN, "/start")
            picker = await fake.wait_for(lambda: next((m for m in fake.bot_messages(ANN) if m.buttons), None))
            labels = dict(picker.buttons)
            assert set(labels) == {"Ichihime", "Pikachu"}
            await fake.press(ANN, ANN, picker.message_id, labels["Pikachu"])
            await fake.wait_for(lambda: "Pikachu" in fake.find(ANN, picker.message_id).text)
            with tg.sessionmaker() as session:
                user = session.scalars(select(User).filter_by(platform_user_id=str(ANN))).one()
                assert user.active_character_id is not None

    run(body)


def test_reset_asks_first_and_only_the_asker_can_confirm(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fake.send(GROUP, ANN, "/reset")
            question = await fake.wait_for(lambda: next((m for m in fake.bot_messages(GROUP) if m.buttons), None))
            yes = dict(question.buttons)["Yes, start over"]
            await fake.press(GROUP, BOB, question.message_id, yes)
            await fake.wait_for(lambda: [c for c in fake.called("answerCallbackQuery") if c.get("show_alert")])
            await fake.press(GROUP, ANN, question.message_id, yes)
            await fake.wait_for(lambda: "starts over" in fake.find(GROUP, question.message_id).text)

    run(body)


def test_memory_shows_remembered_facts_and_forgets_them(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fake.send(ANN, ANN, "/remember I love green tea")
            await fake.wait_for(lambda: any("I will remember" in t for t in reply_texts(fake, ANN)))
            await fake.send(ANN, ANN, "/memory")
            shown = await fake.wait_for(lambda: next((m for m in fake.bot_messages(ANN) if m.buttons), None))
            assert "green tea" in shown.text
            await fake.press(ANN, ANN, shown.message_id, shown.buttons[0][1])
            await fake.wait_for(lambda: "Forgotten" in fake.find(ANN, shown.message_id).text)

    run(body)


def test_status_and_help(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fake.send(ANN, ANN, "/help")
            await fake.wait_for(lambda: any("/newcharacter" in t for t in reply_texts(fake, ANN)))
            assert not any("/approve" in t for t in reply_texts(fake, ANN))  # admin commands only for admins
            await fake.send(ANN, ANN, "/status")
            await fake.wait_for(lambda: any("no requests" in t for t in reply_texts(fake, ANN)))
            assert fake.called("setMyCommands")

    run(body)


def test_tiny_model_answers_a_photo_and_draws_with_imagine(tg: Live, tiny_model_dir) -> None:
    """The real runtime behind the worker: a question about an uploaded photo, then /imagine's photo."""
    import io

    from PIL import Image

    from core.model.runtime import UniCharacterRuntime

    tg.use_model(UniCharacterRuntime.load(tiny_model_dir, device="cpu"))

    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fake.send(ANN, ANN, photo=png(), caption="What do you see?")
            await fake.wait_for(delivered(tg), timeout=300)
            await fake.send(ANN, ANN, "/imagine a lighthouse in a storm")
            photo = await fake.wait_for(lambda: next((m for m in fake.bot_messages(ANN) if m.photo), None), timeout=300)
            await fake.wait_for(delivered(tg, 2), timeout=300)
            question, picture = jobs(tg)
            assert question.state is JobState.DONE and picture.state is JobState.DONE, (question.error, picture.error)
            with tg.sessionmaker() as session:
                request = session.get(Message, question.request_message_id)
                assert request is not None and len(request.image_keys) == 1  # the photo reached the model's context
            with Image.open(io.BytesIO(photo.photo)) as image:
                assert image.size == (picture.result["params"]["width"], picture.result["params"]["height"])

    run(body)


def test_tiny_model_reply_streams_through_the_worker(tg: Live, tiny_model_dir) -> None:
    from core.model.runtime import (
        UniCharacterRuntime,  # imported here: only this test needs the runtime
    )

    tg.use_model(UniCharacterRuntime.load(tiny_model_dir, device="cpu"))

    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fake.send(ANN, ANN, "Hello Ichihime!")
            await fake.wait_for(lambda: jobs(tg) and jobs(tg)[0].delivered_at is not None, timeout=300)
            job = jobs(tg)[0]
            assert job.state is JobState.DONE, job.error
            with tg.sessionmaker() as session:
                reply = session.get(Message, job.reply_message_id)
                stored = reply.text if reply is not None else ""
            shown = " ".join(m.text for m in fake.bot_messages(ANN))
            assert shown.split() == stored.split() or (not stored.strip() and "empty" in shown)

    run(body)
