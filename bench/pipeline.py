"""What the job path adds around the model: incoming message -> reply stored and streamed back.

A benchmark, not a test. Real Redis (a private redis-server, as ``unichar run`` starts one), a real Celery worker
in its own process (thread pool, as in production), SQL on SQLite and/or PostgreSQL, and a zero-cost model double
(``tests.doubles.EchoModel``: the reply is the echo of the input, streamed in one piece). Measured from just before
``ChatService.handle`` to the ``Done`` event read back from the job's stream, the reply row already committed.
CPU time per message by process (frontend, worker, redis-server and, with PostgreSQL, its backends on the bench's
database) for the sequential run and for the throughput run.

    python -m bench.pipeline [--db sqlite,postgresql] [--messages 1000] [--users 50] [--per-user 20]
                             [--worker-cpus all 1] [--history-jobs 200000] [--no-analyze]

Each database is measured once per ``--worker-cpus`` entry: the worker on every core (``all``), then kept to the
listed cores (``UNICHAR_WORKER_CPUS``, as a GPU worker is deployed; by default the machine's last core).
``--history-jobs N`` starts from a database that already holds N finished jobs: a message's cost must not grow with
the service's age. After the warm-up, :class:`Autovacuum` maintains PostgreSQL's tables as a deployment's server
does by itself; this machine's server runs with autovacuum off. ``--no-analyze`` leaves them unmaintained: no
statistics, and every row version a job's state changes leave behind.

Goal (issue 2): p50 under 10 ms, at least 200 messages/s with 50 concurrent users, on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from redis import Redis
from sqlalchemy import Engine, insert, text
from sqlalchemy.orm import Session

from core.chat import ChatService, JobQueued
from core.config import Settings
from core.db.installation import installation_token
from core.db.migrate import upgrade
from core.db.models import Character, Job, User
from core.db.session import make_engine, make_sessionmaker
from core.jobs import Done, Failed, IncomingMessage, JobKind, JobState
from core.streams import follow_sync
from unichar.arguments import at_least
from unichar.run import private_redis

PG_ADMIN = os.environ.get("UNICHAR_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True, slots=True)
class Result:
    """One database's figures; ``cpu_ms`` is CPU time per sequential message by process (load-independent)."""

    database: str
    worker_cpus: str  # "all", or the cores the worker kept to
    p50_ms: float
    p99_ms: float
    mean_ms: float
    messages: int
    throughput: float
    users: int
    concurrent_messages: int
    cpu_ms: dict[str, float]
    concurrent_cpu_ms: dict[str, float]  # the same, per message of the throughput run (contention included)


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far; this process's own when ``pid`` is None."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    """CPU time per message by process since the last reading; with PostgreSQL, also its backends on the bench's
    database (those alive at the reading: a connection closed meanwhile is missed, so that figure is a floor)."""

    def __init__(self, pids: dict[str, int | None], engine: Engine) -> None:
        self.pids, self.engine = pids, engine
        self.before = self._read()

    def _backends(self) -> list[int]:
        if self.engine.dialect.name != "postgresql":
            return []
        with self.engine.connect() as connection:
            query = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"  # this one's too: pooled
            return list(connection.execute(text(query)).scalars())

    def _read(self) -> dict[str, float]:
        seconds = {name: _cpu_s(pid) for name, pid in self.pids.items()}
        for pid in self._backends():
            with contextlib.suppress(OSError):  # it may have ended since
                seconds[f"pg{pid}"] = _cpu_s(pid)
        return seconds

    def per_message(self, messages: int) -> dict[str, float]:
        """Milliseconds per message since the last reading, by process (``postgres``: the backends together)."""
        now = self._read()
        spent = {name: 1000 * (value - self.before.get(name, 0.0)) / messages for name, value in now.items()}
        self.before = now
        out = {name: ms for name, ms in spent.items() if not name.startswith("pg")}
        if self.engine.dialect.name == "postgresql":
            out["postgres"] = sum(ms for name, ms in spent.items() if name.startswith("pg"))
        return out


def _settings(data_dir: Path, database_url: str, redis_url: str, threads: int, worker_cpus: str = "") -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=data_dir,
        database_url=database_url,
        redis_url=redis_url,
        worker_threads=threads,
        worker_cpus=worker_cpus,
        log_level="WARNING",
    )


def unused_redis_url() -> str:
    """A Redis URL nothing answers at: ``private_redis`` then starts a private server on that free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{probe.getsockname()[1]}/0"


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one run, dropped afterwards."""
    admin = make_engine(PG_ADMIN).execution_options(isolation_level="AUTOCOMMIT")
    name = f"unichar_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def _worker(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m bench.pipeline worker`` in its own process, stopped afterwards."""
    env = {
        **os.environ,
        "UNICHAR_DATA_DIR": str(settings.data_dir),
        "UNICHAR_DATABASE_URL": settings.database_url,
        "UNICHAR_REDIS_URL": settings.redis_url,
        "UNICHAR_WORKER_THREADS": str(settings.worker_threads),
        "UNICHAR_WORKER_CPUS": ",".join(map(str, settings.worker_cpus)),
        "UNICHAR_LOG_LEVEL": settings.log_level,
    }
    process = subprocess.Popen([sys.executable, "-m", "bench.pipeline", "worker"], env=env)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(30)


def run_worker() -> int:
    """The worker process: the production worker, its model swapped for the zero-cost double."""
    from tests.doubles import EchoModel
    from workers.celery_app import app, configure, start_worker
    from workers.context import context_from_settings, install_context
    from workers.shared_model import SharedModel

    settings = Settings()
    model = EchoModel(pieces=1)
    model.calls = _Discard()  # the double's call log would grow for the whole run
    install_context(context_from_settings(settings, SharedModel(lambda: model)))
    configure(app, settings)
    start_worker(settings, ["chat"])
    return 0


class _Discard(list):  # type: ignore[type-arg]
    """A list that keeps nothing."""

    def append(self, _item: object) -> None:
        pass


_WORDS = (
    "the harbour at dusk",
    "a storm over the bay",
    "fresh bread",
    "the old lighthouse",
    "a map of the isles",
    "your sister's letter",
    "the festival tonight",
    "a broken compass",
    "sea shanties",
    "the captain's log",
)


class Client:
    """A frontend's side of the path: the chat service and the stream follower."""

    def __init__(self, settings: Settings) -> None:
        from workers.celery_app import create_app
        from workers.tasks import dispatcher

        self.engine = make_engine(settings.sql_url)
        sessions = make_sessionmaker(self.engine)
        self.installation = installation_token(sessions)
        # an app per database: a Celery app sends for one database (workers.celery_app.use_installation)
        self.celery = create_app(settings)
        self.service = ChatService(sessions, settings, dispatcher(self.installation, self.celery))
        self.redis = Redis.from_url(settings.redis_url)

    def message(self, user: str, n: int) -> float:
        """Send one message and wait for its reply; returns the seconds it took."""
        started = time.perf_counter()
        text = f"{_WORDS[n % len(_WORDS)]} and {_WORDS[(7 * n) % len(_WORDS)]}, message {n}"
        outcome = self.service.handle(IncomingMessage("bench", user, user, str(n), text))
        if not isinstance(outcome, JobQueued):
            raise RuntimeError(f"message refused: {outcome}")
        for _entry, event in follow_sync(self.redis, self.installation, outcome.job_id, idle_timeout_s=60):
            if isinstance(event, Failed):
                raise RuntimeError(f"job {outcome.job_id} failed: {event.error}")
            if isinstance(event, Done) and event.message_id is None:
                raise RuntimeError(f"job {outcome.job_id} finished without a stored reply")
        return time.perf_counter() - started

    def close(self) -> None:
        self.redis.close()
        self.engine.dispose()
        self.celery.close()


def measure(database: str, database_url: str, redis_url: str, worker_cpus: str, args: argparse.Namespace) -> Result:
    """Latency over ``args.messages`` sequential messages, then throughput with ``args.users`` concurrent users.

    Both phases spread the messages over ``args.users`` users, so conversations stay a chat session long (the
    per-turn cost of memory recall grows with a conversation's length; ``--users 1`` shows that).
    """
    Redis.from_url(redis_url).flushall()
    with tempfile.TemporaryDirectory(prefix="unichar-bench-") as folder:
        settings = _settings(Path(folder), database_url, redis_url, args.threads, worker_cpus)
        upgrade(settings.sql_url)
        with make_sessionmaker(make_engine(settings.sql_url)).begin() as session:
            session.add(Character(name="Bench", description="Answers at once."))
            _add_history(session, args.history_jobs)
        with _worker(settings) as worker, contextlib.ExitStack() as stack:
            client = Client(settings)
            stack.callback(client.close)  # after the autovacuum stand-in, which uses its engine, has stopped
            for n in range(args.warmup):
                client.message("warmup", n)
            if database == "postgresql" and args.analyze:
                stack.enter_context(Autovacuum(client.engine))
            pids = {"client": None, "worker": worker.pid, "redis": client.redis.info("server")["process_id"]}
            cpu = _CpuMeter(pids, client.engine)
            # one message at a time, users in turn: conversations of messages / users turns each
            latencies = sorted(client.message(f"solo{n % args.users}", n) for n in range(args.messages))
            cpu_ms = cpu.per_message(args.messages)
            started = time.perf_counter()
            with ThreadPoolExecutor(args.users) as pool:
                work = [pool.submit(_user, client, f"user{u}", args.per_user) for u in range(args.users)]
                sent = sum(future.result() for future in work)
            elapsed = time.perf_counter() - started
            concurrent_cpu_ms = cpu.per_message(sent)
    return Result(
        database=database,
        worker_cpus=worker_cpus or "all",
        p50_ms=1000 * statistics.median(latencies),
        p99_ms=1000 * latencies[min(len(latencies) - 1, round(0.99 * len(latencies)))],
        mean_ms=1000 * statistics.fmean(latencies),
        messages=len(latencies),
        throughput=sent / elapsed,
        users=args.users,
        concurrent_messages=sent,
        cpu_ms=cpu_ms,
        concurrent_cpu_ms=concurrent_cpu_ms,
    )


def _add_history(session: Session, jobs: int) -> None:
    """``jobs`` finished replies of another user, as in the database of a service that has run a while."""
    if jobs:
        user = User(platform="bench", platform_user_id="history", display_name="An earlier user")
        session.add(user)
        session.flush()
        session.execute(insert(Job), [{"kind": JobKind.CHAT, "state": JobState.DONE, "user_id": user.id}] * jobs)


class Autovacuum:
    """Vacuums and analyses each table past autovacuum's thresholds (its defaults), checking every ``interval_s``.

    A deployment's server does this itself (autovacuum is PostgreSQL's default): it removes the row versions that
    each job's state changes leave behind and keeps the planner's statistics in step with the tables. This
    machine's server runs with autovacuum off, so the bench stands in for it. The check is frequent because the
    run is short: it stands for a service that has run long enough for its tables to be maintained, not for the
    minutes after a fresh start.
    """

    _DUE = text(
        "SELECT s.relname,"
        " s.n_dead_tup > 50 + 0.2 * greatest(c.reltuples, 0)"  # autovacuum_vacuum_threshold, _scale_factor
        " OR s.n_ins_since_vacuum > 1000 + 0.2 * greatest(c.reltuples, 0),"  # autovacuum_vacuum_insert_*
        " s.n_mod_since_analyze > 50 + 0.1 * greatest(c.reltuples, 0)"  # autovacuum_analyze_*
        " FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid"
    )

    def __init__(self, engine: Engine, interval_s: float = 1.0) -> None:
        self.engine, self.interval_s = engine, interval_s
        self.runs = 0  # VACUUM and ANALYZE statements run so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autovacuum", daemon=True)
        self._error: Exception | None = None  # what stopped the thread: the run's figures would not be maintained

    def __enter__(self) -> Autovacuum:
        self.maintain()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise RuntimeError("the autovacuum stand-in stopped during the run") from self._error

    def maintain(self) -> None:
        """Vacuum and analyse the tables due now."""
        with self.engine.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            for table, vacuum, analyse in list(connection.execute(self._DUE)):
                for command in ("VACUUM",) * vacuum + ("ANALYZE",) * analyse:
                    connection.execute(text(f'{command} "{table}"'))
                    self.runs += 1

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self.maintain()
        except Exception as error:  # noqa: BLE001 - reported by __exit__
            self._error = error


def _user(client: Client, user: str, count: int) -> int:
    for n in range(count):
        client.message(user, n)
    return count


def _machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, Redis {redis_version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=("bench", "worker"), default="bench")
    parser.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--messages", type=at_least(1), default=1000, help="sequential messages for p50/p99")
    parser.add_argument("--users", type=at_least(1), default=50, help="users (concurrent in the throughput run)")
    parser.add_argument("--per-user", type=at_least(1), default=20, help="messages each concurrent user sends")
    parser.add_argument("--threads", type=at_least(1), default=4, help="worker threads")
    parser.add_argument("--warmup", type=at_least(0), default=50)
    parser.add_argument(
        "--no-analyze",
        dest="analyze",
        action="store_false",
        help="leave PostgreSQL's tables unmaintained after the warm-up (no statistics, no vacuum)",
    )
    parser.add_argument(
        "--history-jobs", type=at_least(0), default=0, help="finished jobs of another user in the database beforehand"
    )
    parser.add_argument(
        "--worker-cpus",
        nargs="+",
        default=["all", str(max(os.sched_getaffinity(0)))],
        help="worker core configurations to measure: all, or cores as UNICHAR_WORKER_CPUS takes them (3, 2-3)",
    )
    args = parser.parse_args(argv)
    if args.mode == "worker":
        return run_worker()
    print(f"machine: {_machine()}; worker threads: {args.threads}", flush=True)
    print(
        "| database | worker cores | p50 ms | p99 ms | mean ms | messages | msg/s, concurrent users (messages) "
        "| CPU ms/message | CPU ms/message, concurrent |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    # one private Redis for every run, flushed before each measurement
    with (
        tempfile.TemporaryDirectory() as folder,
        private_redis(_settings(Path(folder), "", unused_redis_url(), 1)) as url,
    ):
        for database in args.db.split(","):
            for n, cpus in enumerate("" if cpus == "all" else cpus for cpus in args.worker_cpus):
                if database == "sqlite":
                    _print(measure(database, f"sqlite:///{folder}/bench{n}.db", url, cpus, args))
                else:
                    with postgres_database() as database_url:
                        _print(measure(database, database_url, url, cpus, args))
    return 0


def _print(result: Result) -> None:
    """One Markdown table row."""
    cpu, concurrent = (
        ", ".join(f"{name} {ms:.1f}" for name, ms in d.items()) for d in (result.cpu_ms, result.concurrent_cpu_ms)
    )
    print(
        f"| {result.database} | {result.worker_cpus} | {result.p50_ms:.1f} | {result.p99_ms:.1f} "
        f"| {result.mean_ms:.1f} | {result.messages} | "
        f"{result.throughput:.0f} with {result.users} users ({result.concurrent_messages}) | {cpu} | {concurrent} |",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
