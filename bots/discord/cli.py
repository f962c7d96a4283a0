"""``unichar discord sync [--guild ID]``: upload the slash commands, explicitly, when they change.

Discord rate-limits command uploads and global commands take a while to spread, so the bot never syncs on start.
``--guild`` copies the commands to one (test) guild, where they appear at once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from bots.discord.commands import add_commands

if TYPE_CHECKING:
    from core.config import Settings

__all__ = ["add_subparsers", "sync_commands"]


async def sync_commands(token: str, guild_id: int | None = None) -> list[str]:
    """Upload the command tree (globally, or to one guild); returns the names Discord now has."""
    client = discord.Client(intents=discord.Intents.none())
    tree: app_commands.CommandTree[discord.Client] = app_commands.CommandTree(client)
    add_commands(tree)
    async with client:
        await client.login(token)
        if guild_id is None:
            synced = await tree.sync()
        else:
            guild = discord.Object(guild_id)
            tree.copy_global_to(guild=guild)
            synced = await tree.sync(guild=guild)
    return sorted(command.name for command in synced)


def _sync(args: argparse.Namespace, settings: Settings) -> int:
    token = settings.discord_token.get_secret_value() if settings.discord_token is not None else ""
    if not token:
        print("unichar discord sync: set UNICHAR_DISCORD_TOKEN first", file=sys.stderr)
        return 2
    try:
        names = asyncio.run(sync_commands(token, args.guild))
    except discord.LoginFailure:
        print("unichar discord sync: Discord refused the token", file=sys.stderr)
        return 2
    except discord.HTTPException as exc:
        print(f"unichar discord sync: Discord refused the upload ({exc.status}: {exc.text})", file=sys.stderr)
        return 1
    where = f"guild {args.guild}" if args.guild else "every guild (global; may take a while to appear)"
    print(f"synced {len(names)} commands to {where}: {', '.join(names)}")
    return 0


def add_subparsers(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``unichar discord ...`` to the ``unichar`` command."""
    group = subparsers.add_parser("discord", help="Discord bot tools")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    sync = actions.add_parser("sync", help="upload the slash commands to Discord")
    sync.add_argument("--guild", type=int, default=None, help="only this guild (instant; for testing)")
    sync.set_defaults(handler=_sync)
