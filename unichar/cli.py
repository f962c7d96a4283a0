"""The ``unichar`` command: one entry point for the main job, the workers, the frontends and the admin tools.

Every sub-command reads the one ``Settings`` object; a bad setting is reported as one readable message and exit
code 2 (like a bad argument), before anything starts. Logging is configured once, here: httpx is quieted (it logs
request URLs, and Telegram's carry the bot token) and a filter masks every configured secret in every record.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Final
from urllib.parse import urlsplit

from pydantic import ValidationError

from core.config import Settings
from core.db.installation import SchemaNotReady
from core.jobs import QUEUE_OF_KIND
from unichar.arguments import at_least

__all__ = ["main", "build_parser", "configure_logging", "describe_settings_error", "QUEUES"]

QUEUES: Final = tuple(dict.fromkeys(QUEUE_OF_KIND.values()))  # chat, image, train
_QUIET: Final = (
    "httpx",
    "httpcore",
    "telegram.ext.ExtBot",
    "discord.gateway",
    "discord.http",
    "alembic",  # core.db.migrate logs what a migration changed
)


class CliError(Exception):
    """A problem the user can fix, reported as one line and exit code 2."""


class _RedactSecrets(logging.Filter):
    """Replaces every configured secret in a log record's message with ``***``."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


def configure_logging(settings: Settings) -> None:
    """Root logging at ``settings.log_level``, noisy HTTP loggers quieted, secrets masked."""
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        raise CliError(
            f"UNICHAR_LOG_LEVEL: {settings.log_level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)"
        )
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    secrets = [s.get_secret_value() for s in (settings.telegram_token, settings.discord_token) if s is not None]
    secrets += [urlsplit(url).password or "" for url in (settings.database_url, settings.redis_url)]
    handler.addFilter(_RedactSecrets(secrets))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def describe_settings_error(error: ValidationError) -> str:
    """A pydantic validation error of ``Settings`` as one message naming each variable; secrets not echoed."""
    secret_fields = {name for name, field in Settings.model_fields.items() if "SecretStr" in repr(field.annotation)}
    lines = ["invalid configuration:"]
    for item in error.errors(include_url=False):
        name = str(item["loc"][0]) if item["loc"] else ""
        shown = "" if name in secret_fields or "input" not in item else f" (got {item['input']!r})"
        lines.append(f"  UNICHAR_{name.upper()}: {item['msg']}{shown}")
    return "\n".join(lines)


def _queues(text: str) -> list[str]:
    """``chat,image`` -> ['chat', 'image']; argparse reports a bad queue name."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"queues must be a comma-separated subset of {','.join(QUEUES)}")
    return list(dict.fromkeys(names))


# --- handlers -------------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace, settings: Settings) -> int:
    """The main job: stores, model, Redis, workers, sweeper and frontends."""
    from unichar.run import StartError, run_main

    try:
        return run_main(settings)
    except StartError as error:
        raise CliError(str(error)) from None


def _chat(args: argparse.Namespace, settings: Settings) -> int:
    """The terminal frontend, through Redis and a worker like any bot."""
    from bots.console import run_console
    from core.db.migrate import current, head
    from unichar.run import redis_answers

    if not redis_answers(settings.redis_url):
        raise CliError("Redis does not answer at UNICHAR_REDIS_URL: start `unichar run` (it starts one) or set the URL")
    at, latest = current(settings.sql_url), head()
    if at is None:
        raise CliError("the SQL store has no schema yet: run `unichar db upgrade` (or `unichar run`) first")
    if at != latest:
        raise CliError(f"the SQL store's schema is at {at}, not {latest}: run `unichar db upgrade` (or `unichar run`)")
    return run_console(settings, user=args.user)


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    """A Celery worker on the given queues, its thread pool sharing one model engine."""
    from workers.celery_app import ModelUnavailable, start_worker
    from workers.cpus import CoresUnavailable

    if args.threads:
        settings = settings.model_copy(update={"worker_threads": args.threads})
    try:
        start_worker(settings, args.queues, hostname=f"{'+'.join(args.queues)}@%h")
    except (CoresUnavailable, ModelUnavailable) as error:
        raise CliError(str(error)) from error
    return 0


def _sweeper(args: argparse.Namespace, settings: Settings) -> int:
    """Re-send jobs left queued past settings.sweep_after_s, every settings.sweep_interval_s, until SIGTERM."""
    from core.db.installation import installation_token
    from core.db.session import make_engine, make_sessionmaker
    from workers.sweeper import run_sweeper
    from workers.tasks import dispatcher

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    engine = make_engine(settings.sql_url)
    try:
        sessions = make_sessionmaker(engine)
        run_sweeper(stop, sessions, settings, dispatcher(installation_token(sessions)))
    finally:
        engine.dispose()
    return 0


def _db(args: argparse.Namespace, settings: Settings) -> int:
    """Alembic upgrade or downgrade of the SQL store."""
    from alembic.util import CommandError

    from core.db import migrate

    try:
        if args.action == "upgrade":
            migrate.upgrade(settings.sql_url, args.revision)
        else:
            migrate.downgrade(settings.sql_url, args.revision)
    except CommandError as error:  # an unknown or unreachable revision: nothing was changed
        raise CliError(f"db {args.action}: {error}") from None
    return 0


def _bot(args: argparse.Namespace, settings: Settings) -> int:
    """One platform frontend in the foreground (what a compose service runs)."""
    from unichar.run import FRONTENDS, configured_frontends

    if args.platform not in configured_frontends(settings):
        raise CliError(f"UNICHAR_{args.platform.upper()}_TOKEN is not set")
    return FRONTENDS[args.platform](settings)


# --- parser ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; each leaf sets ``handler``."""
    parser = argparse.ArgumentParser(prog="unichar", description="UniCharacter role-play bots.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", help="start the main job on the configured (or embedded) defaults").set_defaults(handler=_run)

    chat = sub.add_parser("chat", help="chat in the terminal, through the same path as the bots")
    chat.add_argument("--user", default="local", help="your user id on the console platform (default: local)")
    chat.set_defaults(handler=_chat)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", type=_queues, required=True, help="comma-separated: chat,image,train")
    worker.add_argument(
        "--threads", type=at_least(1), help="threads sharing the model (default: UNICHAR_WORKER_THREADS)"
    )
    worker.set_defaults(handler=_worker)

    sub.add_parser("sweeper", help="re-send jobs that were lost on their way to a worker").set_defaults(
        handler=_sweeper
    )

    db = sub.add_parser("db", help="SQL schema migrations")
    db_actions = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    db_actions.add_parser("upgrade", help="migrate to a newer revision").add_argument(
        "revision", nargs="?", default="head", help="target revision (default: head)"
    )
    db_actions.add_parser("downgrade", help="migrate to an older revision").add_argument(
        "revision", help="target revision, e.g. -1 or base"
    )
    db.set_defaults(handler=_db)

    bot = sub.add_parser("bot", help="run one platform frontend in the foreground")
    bot.add_argument("platform", choices=("telegram", "discord"))
    bot.set_defaults(handler=_bot)

    for hook in _hooks():
        hook(sub)
    return parser


def _hooks() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    """The sub-command groups other modules own: model, character, admin, memory, discord."""
    from bots.discord import cli as discord_cli
    from unichar import admin_cli, character_cli, memory_cli, model_cli

    return [
        model_cli.add_subparsers,
        character_cli.add_subparsers,
        admin_cli.add_subparsers,
        memory_cli.add_subparsers,
        discord_cli.add_subparsers,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate the configuration, set up logging, run the sub-command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage and the error
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"unichar: {describe_settings_error(error)}", file=sys.stderr)
        return 2
    try:
        configure_logging(settings)
        return args.handler(args, settings)
    except (CliError, SchemaNotReady) as error:
        print(f"unichar: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
