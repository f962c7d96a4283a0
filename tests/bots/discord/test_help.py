"""Discord's /help names exactly the slash commands the bot registers (what ``unichar discord sync`` uploads),
and /regenerate, which it lists, redraws the user's last picture in the channel."""

from __future__ import annotations

import re
from typing import Any

import pytest
from discord import app_commands
from sqlalchemy import select

from bots.discord.commands import ADMIN_COMMANDS, MANAGER_COMMANDS
from core.db.models import Job
from tests.bots.discord.conftest import ADMIN_ID, USER_ID, run, running_bot
from tests.bots.discord.fake_discord import FakeDiscord, user_payload
from tests.bots.discord.test_e2e import _command, _imagine

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


async def _help(fake: FakeDiscord, user_id: int, permissions: int) -> str:
    """The whole /help answer (split over follow-ups when long)."""
    event = fake.interaction_event(user=user_payload(user_id, "x"), data=_command("help"), permissions=permissions)
    await fake.dispatch("INTERACTION_CREATE", event)
    await fake.wait_until(lambda: fake.callbacks.get(event["token"]))
    return "\n".join(m.content for m in fake.interaction_messages(event["token"]))


def _typed(commands: Any) -> set[str]:
    """The commands a user types: a group's subcommands, not the group."""
    leaves = [c for top in commands for c in (top.walk_commands() if isinstance(top, app_commands.Group) else [top])]
    return {c.qualified_name for c in leaves if isinstance(c, app_commands.Command)}


def test_help_lists_every_registered_command_and_how_replies_work(stack: Any) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            registered = _typed(bot.tree.get_commands())
            assert {"help", "regenerate", "character use", "settings listen"} <= registered
            full = await _help(fake, ADMIN_ID, permissions=1 << 5)  # a bot admin who manages the server
            assert set(re.findall(r"^/(.+?) — ", full, re.MULTILINE)) == registered
            assert "Replying to a character's message talks to that character" in full
            assert "thread follows its channel's character" in full

            plain = await _help(fake, USER_ID, permissions=0)
            hidden = _typed(ADMIN_COMMANDS + MANAGER_COMMANDS)  # shown to bot admins and server managers only
            assert set(re.findall(r"^/(.+?) — ", plain, re.MULTILINE)) == registered - hidden

    run(body())


def test_regenerate_without_a_number_redraws_the_last_picture_here(stack: Any) -> None:
    async def body() -> None:
        async with running_bot(stack) as (fake, bot):
            event = fake.interaction_event(user=user_payload(USER_ID, "sam"), data=_command("regenerate"))
            await fake.dispatch("INTERACTION_CREATE", event)
            await fake.wait_until(lambda: len(fake.interaction_messages(event["token"])) >= 2)
            assert "no picture here" in fake.interaction_messages(event["token"])[-1].content

            first = await _imagine(fake, bot, "a windmill")
            event = fake.interaction_event(user=user_payload(USER_ID, "sam"), data=_command("regenerate"))
            await fake.dispatch("INTERACTION_CREATE", event)
            await fake.wait_until(lambda: len([m for m in fake.in_channel(first.channel_id) if m.files]) == 2)
            await bot.deliveries.wait_all()
        with stack.sessions() as session:
            first_job, again = session.scalars(select(Job).order_by(Job.id)).all()
        assert again.params["prompt"] == first_job.params["prompt"] == "a windmill"
        assert again.params["seed"] != first_job.params["seed"]

    run(body())
