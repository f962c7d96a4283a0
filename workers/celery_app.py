"""The Celery app: queues chat, image and train, and the delivery settings long GPU jobs need.

A task carries only a job id; the job row is the truth. Late acks with reject-on-worker-lost mean a worker that
dies mid-job leaves its message unacknowledged, and Redis hands it out again after the visibility timeout, which
is longer than the longest job so a healthy job is never handed out twice. One message per worker thread at a time
(prefetch 1) keeps a long image job from holding other users' replies hostage, and pictures never take a worker's
last thread while it also serves replies. No result backend: results are rows and event streams.

Every broker key (the queues, the unacknowledged messages, kombu's bindings) lives under the SQL store's token
(``core.db.installation``), set by :func:`use_installation`: job ids are only unique within one database, so two
installations sharing a Redis database, or a database made again, never take each other's job messages.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery
from kombu import Queue

from core.config import Settings, get_settings
from core.jobs import QUEUE_OF_KIND
from workers.context import get_context
from workers.cpus import keep_to_cpus

__all__ = [
    "QUEUES",
    "create_app",
    "configure",
    "broker_prefix",
    "use_installation",
    "worker_argv",
    "ModelUnavailable",
    "start_worker",
    "app",
]

QUEUES = ("chat", "image", "train")
assert set(QUEUE_OF_KIND.values()) <= set(QUEUES)


def configure(celery: Celery, settings: Settings, **overrides: object) -> None:
    """Point ``celery`` at ``settings.redis_url`` with the project's delivery settings (``overrides`` win); the
    database it is bound to (:func:`use_installation`) stays."""
    longest = max(settings.job_timeout_s, settings.train_timeout_s)
    bound = (celery.conf.broker_transport_options or {}).get("global_keyprefix")
    celery.conf.update(
        broker_url=settings.redis_url,
        broker_transport="workers.broker:Transport",  # kombu's Redis transport, minus a client object per message
        broker_transport_options={
            "visibility_timeout": int(longest * 1.25) + 60,
            # a worker on chat and image keeps one thread for replies however many pictures wait (workers.broker)
            "leave_free": {"image": 1},
            **({"global_keyprefix": bound} if bound else {}),
        },
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


def broker_prefix(installation: str) -> str:
    """The prefix of every broker key of the database named ``installation``."""
    return f"broker:{installation}:"


def use_installation(celery: Celery, installation: str) -> None:
    """Keep ``celery``'s broker keys under the database named ``installation``; call it before the app's first
    message (:func:`configure` keeps it).

    An app serves one database: binding it to another one is a RuntimeError, since its connections would keep the
    first prefix.
    """
    options = dict(celery.conf.broker_transport_options or {})
    bound, prefix = options.get("global_keyprefix"), broker_prefix(installation)
    if bound == prefix:
        return
    if bound:
        raise RuntimeError(f"this Celery app already sends under {bound!r}, not {prefix!r}")
    celery.conf.broker_transport_options = {**options, "global_keyprefix": prefix}


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


class ModelUnavailable(RuntimeError):
    """The model a chat or image worker serves cannot be loaded; the message says why."""


def start_worker(settings: Settings, queues: Sequence[str], hostname: str | None = None) -> None:
    """Run a worker on ``queues`` in this process until it is stopped, under the broker prefix of its context's
    database (``workers.context.get_context``).

    A chat or image worker keeps to ``settings.worker_cpus`` (``workers.cpus``) and loads its model (warmed up, on
    a GPU) before it takes a job, so that no user waits for that; a train worker uses every core and loads what
    each job trains. Raises ValueError on unknown queues, CoresUnavailable on cores it may not use, SchemaNotReady
    on a database without its token and ModelUnavailable on a model folder it cannot load, before taking jobs.
    """
    argv = worker_argv(settings, queues, hostname)
    serves_model = set(queues) != {"train"}
    if settings.worker_cpus and serves_model:
        keep_to_cpus(settings.worker_cpus)
    context = get_context()
    use_installation(app, context.installation)  # the database this process's tasks run on
    if serves_model:
        try:
            context.model.get()
        except (OSError, ValueError) as error:  # a missing or mismatched file, named by the loader
            raise ModelUnavailable(f"the model cannot be loaded: {error}") from error
    app.worker_main(argv)


app = create_app(get_settings())
