"""End to end: the real bot against the loopback fake Discord, jobs through the worker's code path."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from core.db.models import Character, CharacterSubmission, Job
from core.db.repositories import get_or_create_chat
from tests.bots.discord.conftest import (
    ADMIN_ID,
    OTHER_ID,
    USER_ID,
    png,
    run,
    running_bot,
)
from tests.bots.discord.fake_discord import (
    BARE_CHANNEL_ID,
    BOT_ID,
    CHANNEL_ID,
    NSFW_CHANNEL_ID,
    FakeDiscord,
    Posted,
    user_payload,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

USER = user_payload(USER_ID, "sam")
OTHER = user_payload(OTHER_ID, "kim")
ADMIN = user_payload(ADMIN_ID, "ada")
BOT = user_payload(BOT_ID, "UniChar", bot=True)


def _final_reply(fake: FakeDiscord, channel: int = CHANNEL_ID, via: str = "webhook") -> Any:
    return fake.in_channel(channel, via=via)


def _text_of(posted: Posted) -> str:
    if posted.content:
        return posted.content
    embeds = posted.payload.get("embeds") or []
    return embeds[0].get("description") or "" if embeds else ""


async def _wait_text(fake: FakeDiscord, startswith: str, channel: int = CHANNEL_ID, via: str | None = None) -> Posted:
    def found() -> Posted | None:
        return next((m for m in fake.in_channel(channel, via=via) if _text_of(m).startswith(startswith)), None)

    return await fake.wait_until(found)


def test_mention_gets_a_streamed_webhook_reply(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            event = fake.message_event(f"<@{BOT_ID}> hello there @everyone", author=USER, mentions=[BOT])
            await fake.dispatch("MESSAGE_CREATE", event)
            reply = await _wait_text(fake, "echo:", via="webhook")
            await bot.deliveries.wait_all()
            assert reply.username == "Alice"
            assert "hello there" in reply.content
            assert reply.payload["allowed_mentions"] == {"parse": []}  # generated text pings nobody
            assert len(fake.calls("POST", r"/channels/\d+/webhooks")) == 1
            assert CHANNEL_ID in fake.typing
            # a second message reuses the channel's webhook
            await fake.dispatch("MESSAGE_CREATE", fake.message_event(f"<@{BOT_ID}> again", author=USER, mentions=[BOT]))
            await fake.wait_until(lambda: len(fake.in_channel(CHANNEL_ID, via="webhook")) >= 2)
            await bot.deliveries.wait_all()
            assert len(fake.calls("POST", r"/channels/\d+/webhooks")) == 1
        with stack.sessions() as session:
            jobs = session.scalars(select(Job)).all()
            assert jobs and all(job.delivered_at is not None for job in jobs)

    run(body())


def _command(name: str, *options: dict[str, Any], sub: str | None = None) -> dict[str, Any]:
    """The data of a slash-command interaction."""
    opts = list(options)
    if sub is not None:
        opts = [{"name": sub, "type": 1, "options": opts}]
    return {"id": "1", "name": name, "type": 1, "options": opts}


def _opt(name: str, value: Any, kind: int = 3) -> dict[str, Any]:
    return {"name": name, "type": kind, "value": value}


async def _imagine(fake: FakeDiscord, bot: Any, prompt: str = "a boat at dusk") -> Posted:
    """Run /imagine as USER and return the posted image message once delivered."""
    event = fake.interaction_event(user=USER, data=_command("imagine", _opt("prompt", prompt)))
    await fake.dispatch("INTERACTION_CREATE", event)
    image = await fake.wait_until(lambda: next((m for m in fake.in_channel(CHANNEL_ID) if m.files), None))
    await bot.deliveries.wait_all()
    assert fake.callbacks[event["token"]]["type"] == 5  # deferred first
    return image


def test_imagine_delivers_an_image_with_buttons_only_the_requester_can_press(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            image = await _imagine(fake, bot)
            assert image.via == "webhook" and image.username == "Alice"
            data = next(iter(image.files.values()))
            assert data.startswith(b"\x89PNG")
            buttons = [c["custom_id"] for row in image.payload["components"] for c in row["components"]]
            assert [b.split(":")[2] for b in buttons] == ["regen", "accept", "delete"]
            assert all(b.endswith(f":{USER_ID}") for b in buttons)
            # the status message (queue position / progress) is gone once the image is there
            assert [m for m in fake.in_channel(CHANNEL_ID) if not m.files] == []

            accept = buttons[1]
            press = fake.interaction_event(
                user=OTHER, kind=3, data={"custom_id": accept, "component_type": 2}, message=image
            )
            await fake.dispatch("INTERACTION_CREATE", press)
            refusal = await fake.wait_until(lambda: fake.callbacks.get(press["token"]))
            assert refusal["type"] == 4 and refusal["data"]["flags"] & 64  # private
            assert "Only the person" in refusal["data"]["content"]
            assert image.payload["components"]  # untouched

            press = fake.interaction_event(
                user=USER, kind=3, data={"custom_id": accept, "component_type": 2}, message=image
            )
            await fake.dispatch("INTERACTION_CREATE", press)
            answer = await fake.wait_until(lambda: fake.callbacks.get(press["token"]))
            assert answer["type"] == 7 and image.payload["components"] == []
        with stack.sessions() as session:
            job = session.scalars(select(Job).where(Job.kind == "image")).one()
            assert job.delivery["accepted_by"] == str(USER_ID) and job.delivered_at is not None

    run(body())


def _newcharacter(fake: FakeDiscord, images: list[bytes], name: str = "Mira") -> dict[str, Any]:
    """A /newcharacter interaction with ``images`` as its attachment options."""
    options = [
        _opt("name", name),
        _opt("description", "A lighthouse keeper who speaks in short, salty sentences."),
        _opt("greeting", "Mind the rocks."),
        _opt("consent", True, kind=5),
    ]
    resolved: dict[str, Any] = {}
    for number, data in enumerate(images, start=1):
        attachment = fake.add_attachment(f"mira{number}.png", data, "image/png")
        resolved[attachment["id"]] = attachment
        options.append(_opt(f"image{number}", attachment["id"], kind=11))
    command = _command("newcharacter", *options)
    command["resolved"] = {"attachments": resolved}
    return fake.interaction_event(user=USER, data=command)


async def _followup(fake: FakeDiscord, event: dict[str, Any]) -> str:
    posted = await fake.wait_until(
        lambda: [m for m in fake.interaction_messages(event["token"]) if not m.payload.get("_deferred")]
    )
    return posted[-1].content


def test_newcharacter_accepts_ten_images_and_refuses_nine(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, _bot):
            nine = _newcharacter(fake, [png(seed=n) for n in range(9)])
            await fake.dispatch("INTERACTION_CREATE", nine)
            answer = await _followup(fake, nine)
            assert "Nothing was submitted" in answer and "10 images (it has 9)" in answer
            with stack.sessions() as session:
                assert session.scalars(select(CharacterSubmission)).all() == []  # nothing kept

            ten = _newcharacter(fake, [png(seed=n) for n in range(10)])
            await fake.dispatch("INTERACTION_CREATE", ten)
            answer = await _followup(fake, ten)
            assert "is submitted" in answer
            assert fake.callbacks[ten["token"]]["data"]["flags"] & 64  # private to the submitter
        with stack.sessions() as session:
            submission = session.scalars(select(CharacterSubmission)).one()
            assert (submission.name, submission.state, len(submission.images)) == ("Mira", "pending", 10)
            assert submission.consent_attested

    run(body())


def test_newcharacter_refuses_a_gif_whatever_its_name_and_keeps_nothing(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, _bot):
            gif = io.BytesIO()
            Image.open(io.BytesIO(png(seed=9))).save(gif, format="GIF")
            event = _newcharacter(fake, [png(seed=n) for n in range(9)] + [gif.getvalue()])  # sent as mira10.png
            await fake.dispatch("INTERACTION_CREATE", event)
            answer = await _followup(fake, event)
            assert answer == "Nothing was submitted:\n⚠️ mira10.png: A GIF image can't be used here: send a PNG, JPEG or WebP."
        with stack.sessions() as session:
            assert session.scalars(select(CharacterSubmission)).all() == []

    run(body())


def _mention(fake: FakeDiscord, text: str = "hi", **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("author", USER)
    return fake.message_event(f"<@{BOT_ID}> {text}", mentions=[BOT], **kwargs)


def _bot_replies(fake: FakeDiscord, channel: int = CHANNEL_ID) -> list[Posted]:
    return [m for m in fake.in_channel(channel, via="bot") if m.content]


def _jobs(sessions: Any) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def test_bad_attachments_get_a_clear_answer_and_nothing_is_stored(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            attachments = [
                fake.add_attachment("notes.txt", b"just text", "text/plain"),
                fake.add_attachment("huge.png", png((400, 400), seed=3) + b"\0" * 70_000, "image/png"),
                fake.add_attachment("broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 50, "image/png"),
            ]
            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "", attachments=attachments))
            notice = await fake.wait_until(lambda: _bot_replies(fake))
            text = notice[0].content
            assert "notes.txt is not an image" in text
            assert "huge.png is too large" in text
            assert "broken.png" in text and text.count("⚠️") == 3
            assert _jobs(stack.sessions) == []  # nothing usable: nothing stored, no job
            assert len(fake.cdn) == 3 and not fake.calls("GET", r".*huge.*")  # the oversized file was not fetched

            good = [fake.add_attachment("boat.png", png(seed=5), "image/png")]
            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "what is this?", attachments=good))
            reply = await _wait_text(fake, "echo:", via="webhook")
            await bot.deliveries.wait_all()
            assert "1 image" in reply.content
        assert [job.state.value for job in _jobs(stack.sessions)] == ["done"]

    run(body())


def test_dm_and_missing_manage_webhooks_fall_back_to_the_embed_author(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            dm_channel = 960000000000000001
            await fake.dispatch(
                "MESSAGE_CREATE", fake.message_event("hello", author=USER, channel_id=dm_channel, guild=False)
            )
            dm = await _wait_text(fake, "echo:", channel=dm_channel)
            assert dm.via == "bot" and dm.payload["embeds"][0]["author"]["name"] == "Alice"

            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "here?", channel_id=BARE_CHANNEL_ID))
            bare = await _wait_text(fake, "echo:", channel=BARE_CHANNEL_ID)
            await bot.deliveries.wait_all()
            assert bare.via == "bot" and bare.payload["embeds"][0]["author"]["name"] == "Alice"
            assert bare.payload["allowed_mentions"] == {"parse": []}
            assert not fake.calls("POST", r"/channels/\d+/webhooks")

    run(body())


def test_only_addressed_messages_are_answered_and_replies_to_a_character_are(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "first"))
            first = await _wait_text(fake, "echo:", via="webhook")
            await bot.deliveries.wait_all()
            await fake.dispatch("MESSAGE_CREATE", fake.message_event("people chatting", author=OTHER))
            await fake.dispatch("MESSAGE_CREATE", fake.message_event("a bot talking", author=BOT))
            await fake.dispatch("MESSAGE_CREATE", fake.message_event("to the character", author=USER, reference=first))
            await fake.wait_until(lambda: len(fake.in_channel(CHANNEL_ID, via="webhook")) == 2)
            await bot.deliveries.wait_all()
            replies = [m.content for m in fake.in_channel(CHANNEL_ID, via="webhook")]
            assert "to the character" in replies[1]
        assert len(_jobs(stack.sessions)) == 2

    run(body())


def test_a_deleted_channel_and_a_rate_limit_are_handled(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            fake.fail_next("POST", r"/webhooks/\d+/[^/]+", 429)  # discord.py waits retry_after and sends again
            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "one"))
            await _wait_text(fake, "echo:", via="webhook")
            await bot.deliveries.wait_all()
            assert len(fake.in_channel(CHANNEL_ID, via="webhook")) == 1
            assert len(fake.calls("POST", r"/webhooks/\d+/[^/]+")) == 2

            gone = {"message": "Unknown Channel", "code": 10003}
            fake.fail_next("POST", r"/webhooks/\d+/[^/]+", 404, gone)  # the channel vanished mid-way
            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "two"))
            await fake.wait_until(lambda: len(_jobs(stack.sessions)) == 2 and _jobs(stack.sessions)[1].delivered_at)
            await bot.deliveries.wait_all()
        jobs = _jobs(stack.sessions)
        assert jobs[1].delivery.get("skipped") == "recipient gone"
        assert len(fake.in_channel(CHANNEL_ID, via="webhook")) == 1

    run(body())


def test_a_restart_resumes_without_posting_twice(stack) -> None:
    async def body() -> None:
        fake = FakeDiscord()
        await fake.start()
        try:
            async with running_bot(stack, fake) as (_fake, bot):
                await fake.dispatch("MESSAGE_CREATE", _mention(fake, "remember me"))
                await _wait_text(fake, "echo:", via="webhook")
                await bot.deliveries.wait_all()
            with stack.sessions.begin() as session:  # as if the bot died before recording the end of the delivery
                job = session.scalars(select(Job)).one()
                job.delivered_at = None
            posted_before = len(fake.calls("POST", r"/webhooks/\d+/[^/]+"))
            fake.identified.clear()
            async with running_bot(stack, fake) as (_fake, bot):
                await fake.wait_until(lambda: _jobs(stack.sessions)[0].delivered_at is not None)
                await bot.deliveries.wait_all()
            assert len(fake.calls("POST", r"/webhooks/\d+/[^/]+")) == posted_before  # edited, never re-posted
            assert len(fake.calls("POST", r"/channels/\d+/webhooks")) == 1  # the existing webhook was found again
            assert len(fake.in_channel(CHANNEL_ID, via="webhook")) == 1
        finally:
            await fake.close()

    run(body())


def test_adult_characters_speak_only_in_age_restricted_channels(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            use = fake.interaction_event(user=USER, data=_command("character", _opt("name", "Vex"), sub="use"))
            await fake.dispatch("INTERACTION_CREATE", use)
            answer = await fake.wait_until(lambda: fake.callbacks.get(use["token"]))
            assert "age-restricted" in answer["data"]["content"]

            use = fake.interaction_event(
                user=USER, channel_id=NSFW_CHANNEL_ID, data=_command("character", _opt("name", "Vex"), sub="use")
            )
            await fake.dispatch("INTERACTION_CREATE", use)
            await fake.wait_until(lambda: fake.callbacks.get(use["token"]))
            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "hello Vex", channel_id=NSFW_CHANNEL_ID))
            reply = await _wait_text(fake, "echo:", channel=NSFW_CHANNEL_ID)
            await bot.deliveries.wait_all()
            assert reply.username == "Vex"

            with stack.sessions.begin() as session:  # Vex was made this channel's character behind our back
                general = get_or_create_chat(session, "discord", str(CHANNEL_ID), is_group=True)
                general.active_character_id = session.scalars(select(Character).where(Character.name == "Vex")).one().id
            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "hello Vex"))
            refusal = await fake.wait_until(lambda: _bot_replies(fake))
            assert "adults-only" in refusal[0].content
        assert len(_jobs(stack.sessions)) == 1

    run(body())


def test_server_settings_choose_where_characters_speak(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            channel = {"name": "channel", "type": 7, "value": str(NSFW_CHANNEL_ID)}
            resolved = {"channels": {str(NSFW_CHANNEL_ID): {**fake.channels[NSFW_CHANNEL_ID], "permissions": "0"}}}
            refused = fake.interaction_event(user=OTHER, permissions=0, data=_command("settings", channel, sub="allow"))
            refused["data"]["resolved"] = resolved
            await fake.dispatch("INTERACTION_CREATE", refused)
            answer = await fake.wait_until(lambda: fake.callbacks.get(refused["token"]))
            assert "Only a bot admin" in answer["data"]["content"]

            allow = fake.interaction_event(user=ADMIN, permissions=0, data=_command("settings", channel, sub="allow"))
            allow["data"]["resolved"] = resolved
            await fake.dispatch("INTERACTION_CREATE", allow)
            answer = await fake.wait_until(lambda: fake.callbacks.get(allow["token"]))
            assert str(NSFW_CHANNEL_ID) in answer["data"]["content"]

            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "anyone?"))
            notice = await fake.wait_until(lambda: _bot_replies(fake))
            assert "don't speak in this channel" in notice[0].content

            listen = fake.interaction_event(
                user=ADMIN, data=_command("settings", channel, _opt("character", "Alice"), sub="listen")
            )
            listen["data"]["resolved"] = allow["data"]["resolved"]
            await fake.dispatch("INTERACTION_CREATE", listen)
            await fake.wait_until(lambda: fake.callbacks.get(listen["token"]))
            await fake.dispatch(
                "MESSAGE_CREATE", fake.message_event("no mention", author=USER, channel_id=NSFW_CHANNEL_ID)
            )
            reply = await _wait_text(fake, "echo:", channel=NSFW_CHANNEL_ID)
            await bot.deliveries.wait_all()
            assert "no mention" in reply.content
        assert len(_jobs(stack.sessions)) == 1

    run(body())


def test_admins_review_submissions_and_submitters_hear_by_dm(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, _bot):
            ten = _newcharacter(fake, [png(seed=n) for n in range(10)])
            await fake.dispatch("INTERACTION_CREATE", ten)
            assert "is submitted" in await _followup(fake, ten)

            queue = fake.interaction_event(user=USER, data=_command("queue"))
            await fake.dispatch("INTERACTION_CREATE", queue)
            answer = await fake.wait_until(lambda: fake.callbacks.get(queue["token"]))
            assert "Only a bot admin" in answer["data"]["content"]

            queue = fake.interaction_event(user=ADMIN, data=_command("queue"))
            await fake.dispatch("INTERACTION_CREATE", queue)
            answer = await fake.wait_until(lambda: fake.callbacks.get(queue["token"]))
            assert "'Mira'" in answer["data"]["content"] and "pending" in answer["data"]["content"]

            reject = fake.interaction_event(
                user=ADMIN, data=_command("reject", _opt("submission", 1, kind=4), _opt("reason", "too blurry"))
            )
            await fake.dispatch("INTERACTION_CREATE", reject)
            answer = await fake.wait_until(lambda: fake.callbacks.get(reject["token"]))
            assert "rejected" in answer["data"]["content"]
            dm = await fake.wait_until(
                lambda: [m for m in fake.messages.values() if "too blurry" in m.content and m.via == "bot"]
            )
            assert dm[0].channel_id == USER_ID + 1  # the fake's DM channel with the submitter
        with stack.sessions() as session:
            assert session.scalars(select(CharacterSubmission)).one().state == "rejected"

    run(body())


def test_with_the_tiny_model_a_mention_streams_a_reply_and_imagine_draws(tiny_stack) -> None:
    async def body() -> None:
        async with running_bot(tiny_stack) as (fake, bot):
            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "tell me a story"))
            await fake.wait_until(
                lambda: _jobs(tiny_stack.sessions) and _jobs(tiny_stack.sessions)[0].delivered_at, 120
            )
            reply = fake.in_channel(CHANNEL_ID, via="webhook")
            assert reply and reply[0].username == "Alice" and reply[0].content
            assert all(m.payload["allowed_mentions"] == {"parse": []} for m in reply)
            image = await _imagine(fake, bot, "a lighthouse")
            assert image.files and next(iter(image.files.values())).startswith(b"\x89PNG")
        jobs = _jobs(tiny_stack.sessions)
        assert all(job.delivered_at is not None for job in jobs)
        assert jobs[1].state.value == "done"
        # The random tiny model can decode a NUL character, which PostgreSQL refuses to store: the streamed text
        # was shown, and the failure follows it. The worker strips NULs once FOUNDATION fixes it; until then
        # the chat job's state is not asserted.

    run(body())


def test_regenerate_draws_again_and_delete_removes_the_picture(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            image = await _imagine(fake, bot, "a red kite")
            ids = [c["custom_id"] for row in image.payload["components"] for c in row["components"]]
            press = fake.interaction_event(
                user=USER, kind=3, data={"custom_id": ids[0], "component_type": 2}, message=image
            )
            await fake.dispatch("INTERACTION_CREATE", press)
            await fake.wait_until(lambda: len([m for m in fake.in_channel(CHANNEL_ID) if m.files]) == 2)
            await bot.deliveries.wait_all()
            press = fake.interaction_event(
                user=USER, kind=3, data={"custom_id": ids[2], "component_type": 2}, message=image
            )
            await fake.dispatch("INTERACTION_CREATE", press)
            await fake.wait_until(lambda: image.deleted)
        jobs = _jobs(stack.sessions)
        assert [job.params.get("prompt") for job in jobs] == ["a red kite", "a red kite"]

    run(body())


def test_memory_commands_pin_show_and_forget(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, _bot):

            async def command(sub: str, *options: dict[str, Any]) -> str:
                event = fake.interaction_event(user=USER, data=_command("memory", *options, sub=sub))
                await fake.dispatch("INTERACTION_CREATE", event)
                return (await fake.wait_until(lambda: fake.callbacks.get(event["token"])))["data"]["content"]

            assert "I will remember: I hate rain" in await command("remember", _opt("fact", "I hate rain"))
            shown = await command("show")
            assert "Alice remembers" in shown and "1. I hate rain" in shown
            assert "Forgotten: I hate rain" in await command("forget", _opt("what", "1"))

    run(body())


def test_sync_uploads_the_commands_to_one_guild(stack) -> None:
    from bots.discord.cli import sync_commands
    from tests.bots.discord.conftest import pointed_at
    from tests.bots.discord.fake_discord import GUILD_ID

    async def body() -> None:
        fake = FakeDiscord()
        await fake.start()
        try:
            with pointed_at(fake):
                names = await sync_commands("fake-token", GUILD_ID)
            (upload,) = fake.calls("PUT", rf"/applications/\d+/guilds/{GUILD_ID}/commands")
            assert sorted(c["name"] for c in upload.json) == names
            assert {"character", "imagine", "newcharacter", "memory", "approve", "settings"} <= set(names)
            assert not fake.identified.is_set()  # no gateway connection for a sync
        finally:
            await fake.close()

    run(body())


def test_a_long_reply_is_split_at_2000_characters_and_threads_use_the_parents_webhook(stack) -> None:
    from tests.bots.discord.fake_discord import THREAD_ID

    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            words = " ".join(f"word{n}" for n in range(500))  # about 4,400 characters echoed back
            await fake.dispatch("MESSAGE_CREATE", _mention(fake, words[:3900], channel_id=THREAD_ID))
            await fake.wait_until(lambda: _jobs(stack.sessions) and _jobs(stack.sessions)[0].delivered_at)
            await bot.deliveries.wait_all()
            parts = fake.in_channel(THREAD_ID, via="webhook")
            assert len(parts) == 2 and all(len(p.content) <= 2000 for p in parts)
            assert "".join(p.content for p in parts).replace(" ", "") == ("echo: " + words[:3900]).replace(" ", "")
            hook_posts = fake.calls("POST", r"/webhooks/\d+/[^/]+")
            assert all(call.query.get("thread_id") == str(THREAD_ID) for call in hook_posts)
            assert fake.calls("GET", rf"/channels/{CHANNEL_ID}/webhooks")  # the thread's parent owns the webhook

    run(body())


def test_a_channel_full_of_other_webhooks_falls_back_to_the_embed(stack) -> None:
    async def body() -> None:
        fake = FakeDiscord()
        await fake.start()
        for n in range(15):
            hook = fake._create_webhook(str(CHANNEL_ID), f"someone else's {n}")
            hook["user"] = user_payload(OTHER_ID, "kim")
        try:
            async with running_bot(stack, fake) as (_fake, bot):
                await fake.dispatch("MESSAGE_CREATE", _mention(fake, "crowded"))
                reply = await _wait_text(fake, "echo:")
                await bot.deliveries.wait_all()
                assert reply.via == "bot" and reply.payload["embeds"][0]["author"]["name"] == "Alice"
                assert not fake.calls("POST", r"/channels/\d+/webhooks")
        finally:
            await fake.close()

    run(body())


def test_character_list_info_autocomplete_and_status(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, _bot):

            async def answer(data: dict[str, Any], kind: int = 2) -> dict[str, Any]:
                event = fake.interaction_event(user=USER, data=data, kind=kind)
                await fake.dispatch("INTERACTION_CREATE", event)
                return await fake.wait_until(lambda: fake.callbacks.get(event["token"]))

            listing = await answer(_command("character", sub="list"))
            assert "Alice" in listing["data"]["content"] and "Vex" in listing["data"]["content"]
            info = await answer(_command("character", _opt("name", "alice"), sub="info"))
            assert info["data"]["embeds"][0]["title"] == "Alice"
            missing = await answer(_command("character", _opt("name", "Nobody"), sub="info"))
            assert "no character called 'Nobody'" in missing["data"]["content"]
            focused = {"name": "name", "type": 3, "value": "al", "focused": True}
            choices = await answer(_command("character", focused, sub="use"), kind=4)
            assert choices["type"] == 8 and [c["name"] for c in choices["data"]["choices"]] == ["Alice"]
            status = await answer(_command("status"))
            assert "no requests in progress" in status["data"]["content"]

    run(body())


def test_missing_send_permission_is_a_safe_skip(stack) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            missing = {"message": "Missing Permissions", "code": 50013}
            fake.fail_next("POST", rf"/channels/{CHANNEL_ID}/typing", 403, missing)
            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "can you hear me?"))
            await fake.wait_until(lambda: fake.calls("POST", rf"/channels/{CHANNEL_ID}/typing"))
            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "and now?"))  # the bot is still alive
            reply = await _wait_text(fake, "echo:", via="webhook")
            await bot.deliveries.wait_all()
            assert "and now?" in reply.content
        assert len(_jobs(stack.sessions)) == 1  # the first message stored nothing

    run(body())


def test_image_buttons_work_after_a_restart(stack) -> None:
    async def body() -> None:
        fake = FakeDiscord()
        await fake.start()
        try:
            async with running_bot(stack, fake) as (_fake, bot):
                image = await _imagine(fake, bot, "a quiet harbour")
            fake.identified.clear()
            async with running_bot(stack, fake) as (_fake, _bot):  # a new process: nothing in memory
                accept = image.payload["components"][0]["components"][1]["custom_id"]
                press = fake.interaction_event(
                    user=USER, kind=3, data={"custom_id": accept, "component_type": 2}, message=image
                )
                await fake.dispatch("INTERACTION_CREATE", press)
                answer = await fake.wait_until(lambda: fake.callbacks.get(press["token"]))
                assert answer["type"] == 7 and image.payload["components"] == []
        finally:
            await fake.close()

    run(body())


class _HeldEcho:
    """An echo model that stops after its first piece of text until the test lets it go on."""

    def __init__(self) -> None:
        import threading

        from tests.doubles import EchoModel

        self.echo = EchoModel()
        self.go_on = threading.Event()

    def generate_text(self, context: Any, params: Any, on_text: Any = None, adapter: Any = None) -> str:
        reply = self.echo.reply_to(context)
        if on_text is not None:
            on_text(reply[:8])
            self.go_on.wait(timeout=60)
            on_text(reply[8:])
        return reply

    def generate_image(self, contexts: Any, params: Any, on_progress: Any = None, adapter: Any = None) -> Any:
        return self.echo.generate_image(contexts, params, on_progress, adapter)

    def count_tokens(self, text: str) -> int:
        return self.echo.count_tokens(text)


def test_a_reply_streams_into_one_message_by_edits(stack) -> None:
    model = _HeldEcho()
    stack.live.use_model(model)

    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            await fake.dispatch("MESSAGE_CREATE", _mention(fake, "stream this please"))
            first = await _wait_text(fake, "echo:", via="webhook")
            assert first.content == "echo: st" and first.edits == 0  # the first piece is shown at once
            model.go_on.set()
            await fake.wait_until(lambda: "please" in first.content)
            await bot.deliveries.wait_all()
            assert first.edits >= 1 and first.content == "echo: stream this please"
            assert len(fake.in_channel(CHANNEL_ID, via="webhook")) == 1

    run(body())
