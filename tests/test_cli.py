"""The ``unichar`` command: clear errors for bad arguments and configuration, logging set up once, migrations."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from core.config import Settings
from core.db.migrate import head
from unichar import cli


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No UNICHAR_ variable of the caller's leaks in; the data folder is the test's own."""
    import os

    for name in list(os.environ):
        if name.startswith("UNICHAR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("UNICHAR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.chdir(tmp_path)  # no stray .env is read


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "worker" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["nonsense"], "invalid choice"),
        (["worker"], "--queues"),
        (["worker", "--queues", "chat,gpu"], "subset of chat,image,train"),
        (["worker", "--queues", ","], "subset of chat,image,train"),
        (["worker", "--queues", "chat", "--threads", "0"], "at least 1"),
        (["worker", "--queues", "chat", "--threads", "two"], "at least 1"),
        (["db"], "required"),
        (["db", "downgrade"], "revision"),
        (["bot", "irc"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_settings_are_one_readable_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("UNICHAR_MAX_ATTEMPTS", "many")
    monkeypatch.setenv("UNICHAR_ADMIN_IDS", "telegram:1,nobody")
    assert cli.main(["db", "upgrade"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unichar: invalid configuration:")
    assert "UNICHAR_MAX_ATTEMPTS" in err and "'many'" in err
    assert "UNICHAR_ADMIN_IDS" in err and "platform:user_id" in err
    assert "Traceback" not in err


def test_bad_log_level_is_reported(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("UNICHAR_LOG_LEVEL", "loud")
    assert cli.main(["db", "upgrade"]) == 2
    assert "UNICHAR_LOG_LEVEL" in capsys.readouterr().err


def test_a_bot_without_its_token_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("UNICHAR_TELEGRAM_TOKEN", "")
    assert cli.main(["bot", "telegram"]) == 2
    assert "UNICHAR_TELEGRAM_TOKEN is not set" in capsys.readouterr().err


def test_db_upgrade_then_downgrade_on_a_fresh_sqlite_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = tmp_path / "var" / "unichar.db"
    assert cli.main(["db", "upgrade"]) == 0
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("select name from sqlite_master where type='table'")}
    assert {"users", "jobs", "messages"} <= tables
    assert cli.main(["db", "downgrade", "base"]) == 0
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("select name from sqlite_master where type='table'")}
    assert "jobs" not in tables
    for action in ("upgrade", "downgrade"):
        assert cli.main(["db", action, "nonsense"]) == 2
        assert "Can't locate revision identified by 'nonsense'" in capsys.readouterr().err


def test_tokens_never_reach_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    token = "123456:very-secret-token"
    cli.configure_logging(Settings(telegram_token=token, log_level="DEBUG"))
    logging.getLogger("unichar.test").info("GET https://api.telegram.org/bot%s/getMe", token)
    logging.getLogger("unichar.test").info("plain %s line", "formatted")
    err = capsys.readouterr().err
    assert token not in err
    assert "bot***/getMe" in err and "plain formatted line" in err
    assert logging.getLogger("httpx").level == logging.WARNING
    assert logging.getLogger().level == logging.DEBUG


def test_settings_error_hides_secret_input() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        Settings(discord_token=["not", "a", "string"], max_attempts=0)  # type: ignore[arg-type]
    message = cli.describe_settings_error(caught.value)
    assert "UNICHAR_DISCORD_TOKEN" in message and "UNICHAR_MAX_ATTEMPTS" in message
    assert "not" not in message.split("UNICHAR_DISCORD_TOKEN", 1)[1].split("\n", 1)[0]


def test_chat_without_redis_or_schema_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    monkeypatch.setenv("UNICHAR_REDIS_URL", dead)
    assert cli.main(["chat"]) == 2
    assert "Redis does not answer" in capsys.readouterr().err

    from unichar.run import redis_answers

    if not redis_answers("redis://127.0.0.1:6379/0"):
        pytest.skip("no Redis on 127.0.0.1:6379")
    monkeypatch.setenv("UNICHAR_REDIS_URL", "redis://127.0.0.1:6379/0")
    assert cli.main(["chat"]) == 2
    assert "no schema yet: run `unichar db upgrade`" in capsys.readouterr().err
    assert cli.main(["db", "upgrade", "0001"]) == 0  # a database of an earlier release
    capsys.readouterr()
    assert cli.main(["chat"]) == 2
    assert f"schema is at 0001, not {head()}: run `unichar db upgrade`" in capsys.readouterr().err
    assert cli.main(["admin", "queue", "list"]) == 2  # a command that reads the database's token
    assert "no installation row: run `unichar db upgrade`" in capsys.readouterr().err


def test_database_and_redis_passwords_are_masked_too(capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(
        database_url="postgresql+psycopg://app:pg-secret@db/app", redis_url="redis://:r-secret@r:6379/0"
    )
    cli.configure_logging(settings)
    logging.getLogger("unichar.test").warning("cannot reach %s or %s", settings.database_url, settings.redis_url)
    err = capsys.readouterr().err
    assert "pg-secret" not in err and "r-secret" not in err and "app:***@db" in err


def test_run_without_redis_and_private_redis_off_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("UNICHAR_REDIS_URL", f"redis://:hunter2@127.0.0.1:{probe.getsockname()[1]}/0")
    monkeypatch.setenv("UNICHAR_PRIVATE_REDIS", "false")
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "Redis does not answer at UNICHAR_REDIS_URL and UNICHAR_PRIVATE_REDIS is off" in err
    assert "hunter2" not in err


def test_memory_export_and_forget_a_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from core.db.migrate import upgrade
    from core.db.models import User
    from core.db.session import make_engine, make_sessionmaker

    settings = Settings()
    upgrade(settings.sql_url)
    db = make_sessionmaker(make_engine(settings.sql_url))
    with db.begin() as session:
        session.add(User(platform="telegram", platform_user_id="42", persona="a sailor who loves tea"))
    assert cli.main(["memory", "export", "telegram:42", "--out", str(tmp_path / "me.json")]) == 0
    assert "a sailor who loves tea" in (tmp_path / "me.json").read_text()
    assert cli.main(["memory", "forget", "telegram:99"]) == 2  # unknown: nothing changes
    assert "no user 'telegram:99'" in capsys.readouterr().err
    assert cli.main(["memory", "forget", "telegram:42"]) == 0
    assert "1 users" in capsys.readouterr().out
    with db() as session:
        assert session.query(User).count() == 0


def test_every_default_path_follows_the_data_dir(tmp_path: Path) -> None:
    """Moving data_dir moves the SQLite file, the file store, the tiny model and the terminal chat's pictures."""
    settings = Settings(data_dir=tmp_path)
    paths = [Path(settings.sql_url.removeprefix("sqlite:///")), settings.files_dir, settings.resolved_model_dir,
             settings.resolved_console_image_dir]
    assert all(path.is_relative_to(tmp_path) for path in paths), paths
    assert Settings(data_dir=tmp_path, console_image_dir=tmp_path / "x").resolved_console_image_dir == tmp_path / "x"


@pytest.mark.parametrize(("value", "cores"), [("", []), ("3", [3]), ("2-3", [2, 3]), ("1, 3,0-1", [0, 1, 3])])
def test_worker_cpus_take_cores_and_ranges(value: str, cores: list[int]) -> None:
    assert Settings(worker_cpus=value).worker_cpus == cores  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["one", "3-1", "-2", "1-", "1.5"])
def test_bad_worker_cpus_are_one_readable_message(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("UNICHAR_WORKER_CPUS", value)
    assert cli.main(["db", "upgrade"]) == 2
    err = capsys.readouterr().err
    assert "UNICHAR_WORKER_CPUS" in err and "core" in err and "Traceback" not in err


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="needs Linux")
def test_a_worker_refuses_cores_it_may_not_use(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    before = os.sched_getaffinity(0)
    monkeypatch.setenv("UNICHAR_WORKER_CPUS", str(max(before) + 1000))
    assert cli.main(["worker", "--queues", "chat"]) == 2
    err = capsys.readouterr().err
    assert f"cores [{max(before) + 1000}]" in err and "may not use" in err
    assert os.sched_getaffinity(0) == before  # nothing was pinned
