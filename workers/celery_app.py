"""The Celery app: queues chat, image and train, and the delivery settings long GPU jobs need.

A task carries only a job id; the job row is the truth. Late acks with reject-on-worker-lost mean a worker that
dies mid-job leaves its message unacknowledged, and Redis hands it out again after the visibility timeout, which
is longer than the longest job so a healthy job is never handed out twice. One message per worker thread at a time
(prefetch 1) keeps a long image job from holding other users' replies hostage, and pictures never take a worker's
last thread while it also serves replies. No result backend: results are rows and event streams.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery
from kombu import Queue

from core.config import Settings, get_settings
from core.jobs import QUEUE_OF_KIND
from workers.cpus import keep_to_cpus

__all__ = ["QUEUES", "create_app", "configure", "worker_argv", "start_worker", "app"]

QUEUES = ("chat", "image", "train")
assert set(QUEUE_OF_KIND.values()) <= set(QUEUES)


def configure(celery: Celery, settings: Settings, **overrides: object) -> None:
    """Point ``celery`` at ``settings.redis_url`` with the project's delivery settings (``overrides`` win)."""
    longest = max(settings.job_timeout_s, settings.train_timeout_s)
    celery.conf.update(
        broker_url=settings.redis_url,
        broker_transport="workers.broker:Transport",  # kombu's Redis transport, minus a client object per message
        # a worker on chat and image keeps one thread for replies however many pictures wait (workers.broker)
        broker_transport_options={"visibility_timeout": int(longest * 1.25) + 60, "leave_free": {"image": 1}},
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_queues=[Queue(name, routing_key=name) for name in QUEUES],
        task_default_queue="chat",
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    celery.conf.update(overrides)


def create_app(settings: Settings) -> Celery:
    """A Celery app for ``settings``, with the tasks of ``workers.tasks``."""
    celery = Celery("unichar", include=["workers.tasks"])
    configure(celery, settings)
    return celery


def worker_argv(settings: Settings, queues: Sequence[str], hostname: str | None = None) -> list[str]:
    """Arguments of ``app.worker_main`` for a worker on ``queues``.

    Chat and image workers run ``settings.worker_threads`` threads sharing one model in the process; a train
    worker runs one job at a time.
    """
    unknown = set(queues) - set(QUEUES)
    if unknown or not queues:
        raise ValueError(f"unknown queues {sorted(unknown)}; choose from {', '.join(QUEUES)}")
    threads = 1 if set(queues) == {"train"} else settings.worker_threads
    argv = ["worker", "--pool", "threads", "--concurrency", str(threads), "--queues", ",".join(queues)]
    argv += ["--loglevel", settings.log_level, "--without-gossip", "--without-mingle"]
    return argv + (["--hostname", hostname] if hostname else [])


def start_worker(settings: Settings, queues: Sequence[str], hostname: str | None = None) -> None:
    """Run a worker on ``queues`` in this process until it is stopped.

    A chat or image worker keeps to ``settings.worker_cpus`` (``workers.cpus``); a train worker uses every core.
    Raises ValueError on unknown queues and CoresUnavailable on cores it may not use, before anything starts.
    """
    argv = worker_argv(settings, queues, hostname)
    if settings.worker_cpus and set(queues) != {"train"}:
        keep_to_cpus(settings.worker_cpus)
    app.worker_main(argv)


app = create_app(get_settings())
