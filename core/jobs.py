"""Job and event contracts shared by frontends and workers.

A frontend turns a platform update into an :class:`IncomingMessage`; the chat service stores it with a ``Job``
row and sends a Celery task carrying only the job id. The worker publishes :data:`JobEvent` values to the Redis
stream (``stream_key``); frontends read them back with :func:`decode_event`. Events are small, immutable and carry
references (file-store keys), never image bytes.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal, TypeAlias

__all__ = [
    "JobKind",
    "JobState",
    "TERMINAL_STATES",
    "QUEUE_OF_KIND",
    "QUEUED_BEHIND",
    "Attachment",
    "IncomingMessage",
    "TextDelta",
    "Progress",
    "ImageReady",
    "ImageFollows",
    "ImageRefused",
    "Done",
    "Failed",
    "JobEvent",
    "encode_event",
    "decode_event",
    "stream_key",
]


class JobKind(str, enum.Enum):
    """What a job asks of the workers; the kind picks the Celery queue."""

    CHAT = "chat"  # an in-character reply (text, maybe followed by a scene image)
    IMAGE = "image"  # /imagine, Regenerate, or the image half of a reply
    SUMMARY = "summary"  # rolling memory summary, low priority
    TRAIN = "train"  # a character's adapter training


class JobState(str, enum.Enum):
    """queued -> running -> done | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES: Final = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

QUEUE_OF_KIND: Final[dict[JobKind, str]] = {
    JobKind.CHAT: "chat",
    JobKind.IMAGE: "image",
    JobKind.SUMMARY: "image",  # summaries wait behind images, never in front of a reply
    JobKind.TRAIN: "train",
}

QUEUED_BEHIND: Final = "queued_behind"  # job param: the jobs ahead of it in its queue when it was queued (omitted: 0)


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file the user sent, already downloaded by the frontend."""

    filename: str
    content_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A user's message, platform-neutral; ``chat_id`` is the platform's channel, group or DM id."""

    platform: str
    user_id: str
    chat_id: str
    message_id: str
    text: str
    attachments: tuple[Attachment, ...] = ()
    display_name: str = ""
    is_group: bool = False
    reply_to_message_id: str | None = None
    character_id: int | None = None  # the character a frontend addressed (a reply to its message); None: the chat's


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New reply text, to append to what came before."""

    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a job stands: ``stage`` is queued, text or image; ``position`` is the queue position when queued.

    ``stage == "retry"`` starts a new attempt after a worker died: text deltas before it are discarded.
    """

    stage: str
    step: int = 0
    total: int = 0
    position: int | None = None
    eta_s: float | None = None
    type: Literal["progress"] = "progress"


@dataclass(frozen=True, slots=True)
class ImageReady:
    """An image the job produced, stored in the file store under ``key``."""

    key: str
    width: int
    height: int
    seed: int
    type: Literal["image"] = "image"


@dataclass(frozen=True, slots=True)
class ImageFollows:
    """A scene picture for this reply was queued as job ``job_id``: the delivery follows it into the same reply."""

    job_id: int
    type: Literal["image_follows"] = "image_follows"


@dataclass(frozen=True, slots=True)
class ImageRefused:
    """The reply would have carried a picture, but it may not be made; ``reason`` is fit to show the user."""

    reason: str
    type: Literal["image_refused"] = "image_refused"


@dataclass(frozen=True, slots=True)
class Done:
    """The job finished; ``message_id`` is the stored reply message."""

    message_id: int | None
    type: Literal["done"] = "done"


@dataclass(frozen=True, slots=True)
class Failed:
    """The job failed with a message fit to show the user."""

    error: str
    type: Literal["error"] = "error"


JobEvent: TypeAlias = TextDelta | Progress | ImageReady | ImageFollows | ImageRefused | Done | Failed

_EVENT_TYPES: Final[dict[str, type[Any]]] = {
    "text": TextDelta,
    "progress": Progress,
    "image": ImageReady,
    "image_follows": ImageFollows,
    "image_refused": ImageRefused,
    "done": Done,
    "error": Failed,
}


def stream_key(namespace: str, job_id: int) -> str:
    """The Redis stream that carries one job's events; ``namespace`` names the database the job is a row of."""
    return f"job:{namespace}:{job_id}"


def encode_event(event: JobEvent) -> dict[str, str]:
    """An event as the one-field mapping stored in a Redis stream entry."""
    return {"e": json.dumps(asdict(event), separators=(",", ":"))}


def decode_event(fields: dict[bytes, bytes] | dict[str, str]) -> JobEvent:
    """The event stored in a Redis stream entry; raises ValueError on an unknown type."""
    raw = fields.get(b"e") if b"e" in fields else fields.get("e")  # type: ignore[call-overload]
    if raw is None:
        raise ValueError("stream entry has no event field")
    payload = json.loads(raw)
    cls = _EVENT_TYPES.get(payload.get("type"))
    if cls is None:
        raise ValueError(f"unknown event type {payload.get('type')!r}")
    return cls(**payload)
