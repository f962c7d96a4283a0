"""/help names every command a user can type, on Telegram and in the console, so the two can't drift apart.

The registered commands are read from what the frontends really register: the Telegram Application's handlers
(with the /newcharacter dialog's), and the chat service's command table that the console talks to.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from telegram.ext import CommandHandler, ConversationHandler

from bots.console import QUIT, ConsoleFrontend
from bots.telegram.app import build_application
from bots.telegram.handlers import ADMIN_COMMANDS, help_text
from core.chat import COMMANDS, ChatService
from core.db.session import make_engine, make_sessionmaker
from core.jobs import IncomingMessage
from core.media import FileStore
from tests.conftest import make_settings

ALIASES = {"start": "help"}  # the chat service answers Telegram's first-contact command like /help


def _named(text: str) -> set[str]:
    """The commands a help text lists, one per line."""
    return set(re.findall(r"^/(\w+)", text, re.MULTILINE))


def _service(tmp_path: Path) -> ChatService:
    settings = make_settings(tmp_path)
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'help.db'}"))
    return ChatService(sessions, settings, lambda _job, _kind: None, FileStore(tmp_path / "files"))


def _telegram_commands(tmp_path: Path) -> set[str]:
    settings = make_settings(tmp_path, telegram_token="123:fake")
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'tg.db'}"))
    no_redis: Any = None  # building the handlers talks to nothing
    application = build_application(
        settings, sessions=sessions, installation="", dispatch=lambda _job, _kind: None, redis=no_redis
    )
    handlers: list[Any] = [h for group in application.handlers.values() for h in group]
    for handler in list(handlers):
        if isinstance(handler, ConversationHandler):
            steps = [h for step in handler.states.values() for h in step]
            handlers += [*handler.entry_points, *steps, *handler.fallbacks]
    return {name for handler in handlers if isinstance(handler, CommandHandler) for name in handler.commands}


def test_telegram_help_lists_exactly_the_registered_commands(tmp_path: Path) -> None:
    registered = _telegram_commands(tmp_path)
    assert {"regenerate", "newcharacter", "cancel", "start", "help"} <= registered
    assert _named(help_text(is_admin=True)) == registered
    assert _named(help_text(is_admin=False)) == registered - set(ADMIN_COMMANDS)  # admins' commands for admins


def test_the_chat_services_help_lists_every_command_it_answers(tmp_path: Path) -> None:
    service = _service(tmp_path)
    assert "regenerate" in service._commands and set(COMMANDS) == set(service._commands) - set(ALIASES)
    for alias, same in ALIASES.items():
        ask = [IncomingMessage("console", "me", "me", str(n), f"/{name}") for n, name in enumerate((alias, same))]
        assert service.handle(ask[0]) == service.handle(ask[1])


def test_the_console_help_adds_its_own_commands(tmp_path: Path) -> None:
    service = _service(tmp_path)
    out = io.StringIO()
    no_redis: Any = None  # /help is answered without a job to follow
    console = ConsoleFrontend(
        service, redis=no_redis, installation="", store=service.store, image_dir=tmp_path, out=out
    )
    console.send("/help")
    listed = _named(out.getvalue())
    assert listed == (set(service._commands) - set(ALIASES)) | {"quit"}
    assert all(word in out.getvalue() for word in QUIT)
