"""The /newcharacter workflow and its admin review queue, platform-neutral (bots and `unichar admin` call it).

A user's draft lives in SQL (``CharacterSubmission`` in state ``collecting``), so a dialog survives restarts; one
open draft per user. Images are validated by :func:`core.media.validate_image`, stored in the content-addressed
file store and refused when a near-duplicate (perceptual hash) of one already added. ``submit`` needs the configured
number of images, the texts and the consent attestation, all at once or nothing changes.

Admins (``Settings.is_admin``; the ``cli`` platform is the machine's operator) list, inspect (a contact sheet PNG and
the persona text), approve (creates the ``train`` Job and its ``TrainingJob``), reject with a reason, cancel, retry,
and publish once they have read the evaluation report; each action writes an ``AuditEntry``. Every state change
leaves a ``Notification`` row for the submitter (and review requests for the admins) that the bot of their platform
delivers: ``pending_notifications(session, platform)``, post ``text`` to ``platform_chat_id``, ``mark_delivered``.

Services take the caller's ``Session`` and never commit; file deletions and task dispatch run after the commit.

    collecting -> pending -> approved -> training -> evaluated -> published
         |           |           |           |-> failed -> (retry) approved
         v           v           v           v           v
     cancelled   rejected    cancelled   cancelled   rejected      (withdrawn: any state, by submitter or admin)
"""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
from PIL import Image, ImageDraw
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from core.db.models import (
    AuditEntry,
    Character,
    CharacterSubmission,
    Job,
    Notification,
    ReferenceImage,
    SubmissionImage,
    TrainingJob,
    User,
    utcnow,
)
from core.db.repositories import create_job, get_or_create_user
from core.jobs import TERMINAL_STATES, JobKind, JobState
from core.media import TRAINING_FORMATS, FileStore, MediaError, ValidatedImage, validate_image

if TYPE_CHECKING:
    from core.config import Settings

__all__ = [
    "CONSENT_TEXT",
    "Actor",
    "Inspection",
    "NotAllowed",
    "QueueItem",
    "State",
    "Step",
    "SubmissionError",
    "Submissions",
    "contact_sheet",
    "hash_distance",
    "mark_delivered",
    "notify",
    "pending_notifications",
    "perceptual_hash",
]

log = logging.getLogger(__name__)

NAME_CHARS: Final = (2, 64)
DESCRIPTION_CHARS: Final = (20, 8000)
GREETING_CHARS: Final = (1, 2000)
CONSENT_TEXT: Final = (
    "I have the right to use these images for this character. If they show a real person, that person has "
    "consented to a public role-play character being made from them."
)


class State:
    """A submission's states (``CharacterSubmission.state``)."""

    COLLECTING = "collecting"
    PENDING = "pending"
    APPROVED = "approved"  # a train job is queued
    TRAINING = "training"
    EVALUATED = "evaluated"  # trained; the admin reads the report, then publishes
    PUBLISHED = "published"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    FAILED = "failed"
    WITHDRAWN = "withdrawn"

    OPEN: Final = frozenset({COLLECTING, PENDING, APPROVED, TRAINING, EVALUATED})
    IN_QUEUE: Final = frozenset({PENDING, APPROVED, TRAINING, EVALUATED, FAILED})


class Step:
    """The /newcharacter dialog's next question (``CharacterSubmission.step``), in order."""

    NAME = "name"
    DESCRIPTION = "description"
    GREETING = "greeting"
    IMAGES = "images"
    CONSENT = "consent"
    CONFIRM = "confirm"  # everything is there: submit or cancel


class SubmissionError(ValueError):
    """A request refused with a message fit to show the user; nothing stored changed."""


class NotAllowed(SubmissionError):
    """The actor may not do this (not an admin, or not the submitter)."""


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks: a platform identity; platform ``cli`` is the operator at the machine's shell."""

    platform: str
    user_id: str
    display_name: str = ""

    def __str__(self) -> str:
        return f"{self.platform}:{self.user_id}"


@dataclass(frozen=True, slots=True)
class QueueItem:
    """One submission as the admin queue shows it, with its training progress."""

    id: int
    name: str
    state: str
    submitter: str
    images: int
    created_at: str
    reason: str
    job_id: int | None
    step: int
    total_steps: int
    loss: float | None
    eta_s: float | None

    @property
    def percent(self) -> float:
        """Training progress in percent (0 before training starts)."""
        return 100.0 * self.step / self.total_steps if self.total_steps else 0.0


@dataclass(frozen=True, slots=True)
class Inspection:
    """What an admin reviews: the queue line, the persona text, the images as one PNG, the evaluation report."""

    item: QueueItem
    description: str
    greeting: str
    real_person: bool
    consent_text: str
    contact_sheet_png: bytes
    report: dict


# --- perceptual hash and contact sheet -------------------------------------------------------------------


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    return np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)


_DCT32: Final = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> str:
    """64-bit DCT pHash as 16 hex digits: robust to re-encoding, resizing and small edits."""
    gray = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ gray @ _DCT32.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term would dominate the median
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def hash_distance(a: str, b: str) -> int:
    """Differing bits between two perceptual hashes."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def contact_sheet(images: Sequence[Image.Image], *, thumb: int = 256, columns: int = 5) -> bytes:
    """The images as one numbered PNG grid, for an admin to review at a glance."""
    if not images:
        raise SubmissionError("there are no images to show")
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * thumb, rows * thumb), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        tile = image.convert("RGB")
        tile.thumbnail((thumb - 8, thumb - 8))
        x, y = (i % columns) * thumb, (i // columns) * thumb
        sheet.paste(tile, (x + (thumb - tile.width) // 2, y + (thumb - tile.height) // 2))
        draw.text((x + 6, y + 4), str(i + 1), fill=(255, 255, 0))
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


# --- notifications ---------------------------------------------------------------------------------------


def notify(session: Session, submission: CharacterSubmission, kind: str, text: str) -> Notification:
    """Leave a message for the submitter; their platform's bot delivers it."""
    user = session.get(User, submission.user_id)
    assert user is not None, "a submission always has its user"
    note = Notification(
        user_id=user.id,
        platform=user.platform,
        platform_chat_id=submission.platform_chat_id or user.platform_user_id,
        submission_id=submission.id,
        kind=kind,
        text=text,
    )
    session.add(note)
    return note


def pending_notifications(session: Session, platform: str, limit: int = 50) -> list[Notification]:
    """Undelivered notifications for one platform's bot, oldest first."""
    query = (
        select(Notification)
        .where(Notification.platform == platform, Notification.delivered_at.is_(None))
        .order_by(Notification.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def mark_delivered(session: Session, notification_id: int) -> None:
    """Record that a notification was posted, so a restarted bot never posts it twice."""
    note = session.get(Notification, notification_id)
    if note is not None and note.delivered_at is None:
        note.delivered_at = utcnow()


# --- the service -----------------------------------------------------------------------------------------


def _after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` once the caller's transaction commits; dropped on rollback."""
    pending: list[Callable[[], None]] | None = session.info.get("unichar_after_commit")
    if pending is None:
        pending = session.info["unichar_after_commit"] = []

        def run(_session: Session) -> None:
            actions, pending[:] = list(pending), []
            for queued in actions:
                try:
                    queued()
                except Exception:  # a failed cleanup must not undo a committed change
                    log.exception("post-commit action failed")

        event.listen(session, "after_commit", run)
        event.listen(session, "after_rollback", lambda _s: pending.clear())
    pending.append(action)


def _text(value: str, what: str, bounds: tuple[int, int]) -> str:
    text = (value or "").strip()
    low, high = bounds
    if len(text) < low:
        raise SubmissionError(f"The {what} is too short: at least {low} characters, please.")
    if len(text) > high:
        raise SubmissionError(f"The {what} is too long: {len(text)} characters, at most {high}.")
    return text


class Submissions:
    """The /newcharacter and admin-review service; ``dispatch(job_id)`` sends a train task after commit."""

    def __init__(self, settings: Settings, store: FileStore, dispatch: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.dispatch = dispatch

    # --- the submitter's dialog ------------------------------------------------------------------------

    def start(self, session: Session, who: Actor, chat_id: str = "") -> CharacterSubmission:
        """The user's open draft, or a new one; a restarted dialog picks up where it stopped."""
        current = self.draft(session, who)
        if current is not None:
            return current
        user = get_or_create_user(session, who.platform, who.user_id, who.display_name)
        submission = CharacterSubmission(user_id=user.id, platform_chat_id=chat_id)
        session.add(submission)
        session.flush()
        return submission

    def draft(self, session: Session, who: Actor) -> CharacterSubmission | None:
        """The user's submission still being collected, if any."""
        query = (
            select(CharacterSubmission)
            .join(User, User.id == CharacterSubmission.user_id)
            .where(
                User.platform == who.platform,
                User.platform_user_id == who.user_id,
                CharacterSubmission.state == State.COLLECTING,
            )
        )
        return session.scalars(query).first()

    def mine(self, session: Session, who: Actor) -> list[CharacterSubmission]:
        """All of the user's submissions, newest first, for a status command."""
        query = (
            select(CharacterSubmission)
            .join(User, User.id == CharacterSubmission.user_id)
            .where(User.platform == who.platform, User.platform_user_id == who.user_id)
            .order_by(CharacterSubmission.id.desc())
        )
        return list(session.scalars(query))

    def set_name(self, session: Session, who: Actor, name: str) -> CharacterSubmission:
        """Name the character; refused when empty, too long, multi-line or already taken."""
        submission = self._open_draft(session, who)
        name = _text(name, "name", NAME_CHARS)
        if any(ch in name for ch in "\n\r\t") or not name.isprintable():
            raise SubmissionError("The name must be one line of printable characters.")
        if self._name_taken(session, name, submission.id):
            raise SubmissionError(f"There is already a character or submission called {name!r}; pick another name.")
        submission.name = name
        return self._advance(submission)

    def set_description(self, session: Session, who: Actor, text: str) -> CharacterSubmission:
        """Set the persona: who the character is, how they speak and behave."""
        submission = self._open_draft(session, who)
        submission.description = _text(text, "description", DESCRIPTION_CHARS)
        return self._advance(submission)

    def set_greeting(self, session: Session, who: Actor, text: str) -> CharacterSubmission:
        """Set the first message the character sends in a new conversation."""
        submission = self._open_draft(session, who)
        submission.greeting = _text(text, "greeting", GREETING_CHARS)
        return self._advance(submission)

    def set_example_dialogues(self, session: Session, who: Actor, text: str) -> CharacterSubmission:
        """Optional sample conversations (``<START>`` blocks of ``{{user}}:`` / ``{{char}}:`` lines)."""
        submission = self._open_draft(session, who)
        submission.example_dialogues = _text(text, "example dialogue", (0, 50000))
        return self._advance(submission)

    def add_image(self, session: Session, who: Actor, data: bytes) -> int:
        """Validate, store and attach one image; returns the draft's image count, or raises with the reason."""
        submission = self._open_draft(session, who)
        most = self.settings.submission_max_images
        if len(submission.images) >= most:
            raise SubmissionError(f"This submission already has {most} images, the most allowed. Submit or cancel.")
        validated = self._validated(data)
        digest = perceptual_hash(validated.open())
        for other in submission.images:
            if hash_distance(digest, other.phash) <= self.settings.submission_dup_distance:
                raise SubmissionError(
                    f"This image is a near-duplicate of image {other.position + 1}; send a different picture."
                )
        key = self.store.put(validated.data, validated.suffix)
        submission.images.append(
            SubmissionImage(
                file_key=key,
                phash=digest,
                position=len(submission.images),
                width=validated.width,
                height=validated.height,
            )
        )
        self._advance(submission)
        session.flush()
        return len(submission.images)

    def attest_consent(
        self, session: Session, who: Actor, *, real_person: bool, text: str = CONSENT_TEXT
    ) -> CharacterSubmission:
        """Record the uploader's attestation (the exact text they agreed to) and whether a real person is shown."""
        submission = self._open_draft(session, who)
        submission.real_person = real_person
        submission.consent_attested = True
        submission.consent_text = _text(text, "consent statement", (10, 2000))
        return self._advance(submission)

    def missing(self, submission: CharacterSubmission) -> list[str]:
        """What a draft still lacks before it can be submitted, in words."""
        low, high = self.settings.submission_min_images, self.settings.submission_max_images
        count = len(submission.images)
        gaps = [what for what, ok in (
            ("a name", bool(submission.name)),
            ("a description", bool(submission.description)),
            ("a greeting", bool(submission.greeting)),
        ) if not ok]
        if not low <= count <= high:
            wanted = f"{low}" if low == high else f"{low} to {high}"
            gaps.append(f"{wanted} images (it has {count})")
        if not submission.consent_attested:
            gaps.append("the consent attestation")
        return gaps

    def submit(self, session: Session, who: Actor) -> CharacterSubmission:
        """Send the draft to the admin queue; refused (nothing changes) while anything is missing."""
        submission = self._open_draft(session, who)
        gaps = self.missing(submission)
        if gaps:
            raise SubmissionError("Not ready to submit; still needed: " + ", ".join(gaps) + ".")
        if self._name_taken(session, submission.name, submission.id):
            raise SubmissionError(f"The name {submission.name!r} was taken meanwhile; set another name.")
        submission.state = State.PENDING
        notify(session, submission, "submitted", f"Your character {submission.name!r} is waiting for review.")
        self._tell_admins(session, f"New character submission #{submission.id} ({submission.name!r}) to review.")
        return submission

    def cancel(self, session: Session, who: Actor) -> CharacterSubmission:
        """Abandon the open draft and delete its images."""
        submission = self._open_draft(session, who)
        submission.state = State.CANCELLED
        self._drop_images(session, submission)
        return submission

    def withdraw(self, session: Session, who: Actor, submission_id: int, reason: str = "") -> CharacterSubmission:
        """Take a submission down (the submitter, or an admin): stop training, retire the character, delete files."""
        submission = self._get(session, submission_id)
        owner = session.get(User, submission.user_id)
        is_owner = owner is not None and (owner.platform, owner.platform_user_id) == (who.platform, who.user_id)
        if not is_owner:
            self._require_admin(who)
            self._audit(session, who, "withdraw", submission, reason)
        if submission.state in (State.WITHDRAWN, State.CANCELLED, State.REJECTED):
            raise SubmissionError(f"Submission #{submission.id} is already {submission.state}.")
        self._stop_job(session, submission)
        self._drop_training_outputs(session, submission)
        if submission.character_id is not None:
            character = session.get(Character, submission.character_id)
            if character is not None:
                character.status = "retired"
                old_key, character.adapter_key = character.adapter_key, None
                if old_key:
                    self._delete_file_later(session, old_key)
        submission.state = State.WITHDRAWN
        submission.reason = reason
        self._drop_images(session, submission)
        if not is_owner:
            notify(session, submission, "withdrawn", f"Your character {submission.name!r} was taken down. {reason}")
        return submission

    # --- the admin queue -------------------------------------------------------------------------------

    def queue(self, session: Session, who: Actor, states: Iterable[str] = State.IN_QUEUE) -> list[QueueItem]:
        """Submissions awaiting an admin or a worker, oldest first, with training progress."""
        self._require_admin(who)
        query = (
            select(CharacterSubmission)
            .where(CharacterSubmission.state.in_(list(states)))
            .order_by(CharacterSubmission.id)
        )
        return [self._item(session, s) for s in session.scalars(query)]

    def list_pending(self, session: Session, who: Actor) -> list[QueueItem]:
        """Submissions waiting for a decision."""
        return self.queue(session, who, (State.PENDING,))

    def inspect(self, session: Session, who: Actor, submission_id: int) -> Inspection:
        """Everything an admin needs to decide: persona text, consent, the images as one contact sheet."""
        self._require_admin(who)
        submission = self._get(session, submission_id)
        images = [self._load(image.file_key) for image in submission.images]
        training = self._training(session, submission)
        return Inspection(
            item=self._item(session, submission),
            description=submission.description,
            greeting=submission.greeting,
            real_person=submission.real_person,
            consent_text=submission.consent_text,
            contact_sheet_png=contact_sheet(images) if images else b"",
            report=dict(training.report) if training else {},
        )

    def approve(self, session: Session, who: Actor, submission_id: int) -> int:
        """Queue the character's training; returns the train Job's id (dispatched after commit)."""
        self._require_admin(who)
        submission = self._get(session, submission_id, State.PENDING)
        training = TrainingJob(submission_id=submission.id, total_steps=self.settings.train_steps, config=self._recipe())
        session.add(training)
        session.flush()
        training.work_dir = str(self.settings.data_dir / "training" / f"job-{training.id}")
        job_id = self._queue_job(session, submission, training)
        submission.state = State.APPROVED
        self._audit(session, who, "approve", submission, f"job {job_id}")
        notify(session, submission, "approved", f"Your character {submission.name!r} was approved; training is queued.")
        return job_id

    def reject(self, session: Session, who: Actor, submission_id: int, reason: str) -> CharacterSubmission:
        """Refuse a pending submission with a reason the submitter sees; its images are deleted."""
        self._require_admin(who)
        reason = _text(reason, "reason", (3, 1000))
        submission = self._get(session, submission_id, State.PENDING, State.EVALUATED)
        self._stop_job(session, submission)
        self._drop_training_outputs(session, submission)
        submission.state = State.REJECTED
        submission.reason = reason
        self._drop_images(session, submission)
        self._audit(session, who, "reject", submission, reason)
        notify(session, submission, "rejected", f"Your character {submission.name!r} was not accepted: {reason}")
        return submission

    def admin_cancel(self, session: Session, who: Actor, submission_id: int, reason: str = "") -> CharacterSubmission:
        """Stop a queued or running training (or drop a pending submission); a running worker stops at its next check."""
        self._require_admin(who)
        submission = self._get(
            session, submission_id, State.PENDING, State.APPROVED, State.TRAINING, State.EVALUATED, State.FAILED
        )
        self._stop_job(session, submission)
        self._drop_training_outputs(session, submission)
        submission.state = State.CANCELLED
        submission.reason = reason
        self._drop_images(session, submission)
        self._audit(session, who, "cancel", submission, reason)
        notify(session, submission, "cancelled", f"Training of {submission.name!r} was cancelled. {reason}".strip())
        return submission

    def retry(self, session: Session, who: Actor, submission_id: int) -> int:
        """Queue a failed training again; it resumes from its last checkpoint. Returns the new Job's id."""
        self._require_admin(who)
        submission = self._get(session, submission_id, State.FAILED)
        training = self._training(session, submission)
        if training is None:
            raise SubmissionError(f"Submission #{submission.id} was never trained; approve it instead.")
        training.state = "queued"
        job_id = self._queue_job(session, submission, training)
        submission.state = State.APPROVED
        submission.reason = ""
        self._audit(session, who, "retry", submission, f"job {job_id}")
        notify(session, submission, "retried", f"Training of {submission.name!r} was queued again.")
        return job_id

    def publish(self, session: Session, who: Actor, submission_id: int) -> Character:
        """After reading the evaluation report: create or update the Character with the new adapter version."""
        self._require_admin(who)
        submission = self._get(session, submission_id, State.EVALUATED)
        training = self._training(session, submission)
        if training is None or not training.adapter_key:
            raise SubmissionError(f"Submission #{submission.id} has no trained adapter to publish.")
        character = session.get(Character, submission.character_id) if submission.character_id else None
        if character is None:
            character = Character(name=submission.name, creator_id=submission.user_id)
            session.add(character)
        character.description = submission.description
        character.greeting = submission.greeting
        character.example_dialogues = submission.example_dialogues
        character.real_person = submission.real_person
        character.consent_attested = submission.consent_attested
        character.status = "published"
        old_key = character.adapter_key
        character.adapter_key = training.adapter_key
        character.adapter_version = (character.adapter_version or 0) + 1
        character.card = {**(character.card or {}), "evaluation": dict(training.report)}
        session.flush()
        if old_key and old_key != training.adapter_key:
            self._delete_file_later(session, old_key)
        self._keep_references(session, submission, character)
        submission.character_id = character.id
        submission.state = State.PUBLISHED
        self._audit(session, who, "publish", submission, f"adapter {training.adapter_key} v{character.adapter_version}")
        notify(
            session, submission, "published",
            f"Your character {character.name!r} is live (adapter version {character.adapter_version}).",
        )
        return character

    # --- called by the training pipeline (training/pipeline.py) ----------------------------------------

    def training_started(self, session: Session, submission_id: int) -> CharacterSubmission:
        """The worker picked the job up."""
        submission = self._get(session, submission_id, State.APPROVED, State.TRAINING)
        if submission.state != State.TRAINING:
            submission.state = State.TRAINING
            notify(session, submission, "training", f"Training of {submission.name!r} has started.")
        return submission

    def training_progress(self, session: Session, submission_id: int, percent: int, eta_s: float | None) -> None:
        """Tell the submitter how far training is (the pipeline calls it at a few milestones)."""
        submission = self._get(session, submission_id)
        eta = f", about {max(1, round(eta_s / 60))} min left" if eta_s else ""
        notify(session, submission, "progress", f"Training of {submission.name!r}: {percent}% done{eta}.")

    def training_failed(self, session: Session, submission_id: int, reason: str) -> None:
        """The run failed; an admin may retry (it resumes from the last checkpoint)."""
        submission = self._get(session, submission_id)
        if submission.state in (State.APPROVED, State.TRAINING):
            submission.state = State.FAILED
            submission.reason = reason[:2000]
            notify(session, submission, "failed", f"Training of {submission.name!r} failed; an admin will look at it.")
            self._tell_admins(session, f"Training of submission #{submission.id} failed: {reason[:300]}")

    def training_finished(self, session: Session, submission_id: int) -> CharacterSubmission:
        """Trained and evaluated: waits for an admin to read the report and publish."""
        submission = self._get(session, submission_id, State.TRAINING)
        submission.state = State.EVALUATED
        notify(session, submission, "evaluated", f"{submission.name!r} is trained; an admin will review it shortly.")
        self._tell_admins(session, f"Submission #{submission.id} ({submission.name!r}) is trained: review and publish.")
        return submission

    # --- helpers ---------------------------------------------------------------------------------------

    def _recipe(self) -> dict:
        s = self.settings
        return {
            "rank": s.lora_rank, "alpha": s.lora_alpha, "steps": s.train_steps, "lr": s.train_lr,
            "tokens_per_step": s.train_tokens_per_step, "full_finetune": s.train_full_finetune,
            "checkpoint_every": s.train_checkpoint_every, "image_size": s.train_image_size,
        }

    def _queue_job(self, session: Session, submission: CharacterSubmission, training: TrainingJob) -> int:
        params = {"submission_id": submission.id, "training_job_id": training.id}
        job = create_job(session, JobKind.TRAIN, submission.user_id, params=params)
        training.job_id = job.id
        if self.dispatch is not None:
            dispatch, job_id = self.dispatch, job.id
            _after_commit(session, lambda: dispatch(job_id))
        return job.id

    def _stop_job(self, session: Session, submission: CharacterSubmission) -> None:
        training = self._training(session, submission)
        if training is None:
            return
        job = session.get(Job, training.job_id) if training.job_id else None
        if job is not None and job.state not in TERMINAL_STATES:
            job.state = JobState.CANCELLED
            job.finished_at = utcnow()
        if training.state not in ("done", "failed"):
            training.state = "cancelled"

    def _drop_training_outputs(self, session: Session, submission: CharacterSubmission) -> None:
        """Delete an unpublished adapter and the run's folder (checkpoints, annotations) after commit."""
        training = self._training(session, submission)
        if training is None:
            return
        key, training.adapter_key = training.adapter_key, None
        if key:
            self._delete_file_later(session, key)
        if training.work_dir:
            folder = Path(training.work_dir)
            _after_commit(session, lambda: shutil.rmtree(folder, ignore_errors=True))

    def _keep_references(self, session: Session, submission: CharacterSubmission, character: Character) -> None:
        """Keep the sources as the character's reference images when the policy says so, else delete them."""
        if not self.settings.keep_source_images:
            self._drop_images(session, submission)
            return
        if character.reference_images:
            return
        for image in submission.images:
            character.reference_images.append(
                ReferenceImage(file_key=image.file_key, position=image.position, width=image.width, height=image.height)
            )

    def _drop_images(self, session: Session, submission: CharacterSubmission) -> None:
        keys = [image.file_key for image in submission.images]
        submission.images.clear()
        session.flush()
        for key in keys:
            self._delete_file_later(session, key)

    def _delete_file_later(self, session: Session, key: str) -> None:
        """Delete a stored file after commit, unless another row still uses it (the store dedupes by content)."""
        still_used = session.scalar(select(func.count()).select_from(SubmissionImage).where(SubmissionImage.file_key == key))
        still_used = still_used or session.scalar(
            select(func.count()).select_from(ReferenceImage).where(ReferenceImage.file_key == key)
        )
        still_used = still_used or session.scalar(
            select(func.count()).select_from(Character).where(Character.adapter_key == key)
        )
        if not still_used:
            _after_commit(session, lambda: self.store.delete(key))

    def _validated(self, data: bytes) -> ValidatedImage:
        """The decoded, normalised image; media's refusal becomes a SubmissionError with its reason."""
        try:
            return validate_image(data, self.settings, TRAINING_FORMATS)  # issue 7: PNG, JPEG or WebP only
        except MediaError as exc:
            raise SubmissionError(str(exc)) from exc

    def _load(self, key: str) -> Image.Image:
        image = Image.open(self.store.path(key))
        image.load()
        return image

    def _advance(self, submission: CharacterSubmission) -> CharacterSubmission:
        """Point the dialog at the first thing still missing."""
        if not submission.name:
            submission.step = Step.NAME
        elif not submission.description:
            submission.step = Step.DESCRIPTION
        elif not submission.greeting:
            submission.step = Step.GREETING
        elif len(submission.images) < self.settings.submission_min_images:
            submission.step = Step.IMAGES
        elif not submission.consent_attested:
            submission.step = Step.CONSENT
        else:
            submission.step = Step.CONFIRM
        return submission

    def _open_draft(self, session: Session, who: Actor) -> CharacterSubmission:
        submission = self.draft(session, who)
        if submission is None:
            raise SubmissionError("You have no character in progress; start one with /newcharacter.")
        return submission

    def _get(self, session: Session, submission_id: int, *states: str) -> CharacterSubmission:
        submission = session.get(CharacterSubmission, submission_id)
        if submission is None:
            raise SubmissionError(f"There is no submission #{submission_id}.")
        if states and submission.state not in states:
            raise SubmissionError(
                f"Submission #{submission_id} is {submission.state}; this needs it to be {' or '.join(states)}."
            )
        return submission

    def _training(self, session: Session, submission: CharacterSubmission) -> TrainingJob | None:
        query = select(TrainingJob).where(TrainingJob.submission_id == submission.id).order_by(TrainingJob.id.desc())
        return session.scalars(query).first()

    def _item(self, session: Session, submission: CharacterSubmission) -> QueueItem:
        user = session.get(User, submission.user_id)
        training = self._training(session, submission)
        return QueueItem(
            id=submission.id,
            name=submission.name,
            state=submission.state,
            submitter=f"{user.platform}:{user.platform_user_id}" if user else "?",
            images=len(submission.images),
            created_at=submission.created_at.strftime("%Y-%m-%d %H:%M"),
            reason=submission.reason,
            job_id=training.job_id if training else None,
            step=training.step if training else 0,
            total_steps=training.total_steps if training else 0,
            loss=training.loss if training else None,
            eta_s=training.eta_s if training else None,
        )

    def _name_taken(self, session: Session, name: str, submission_id: int) -> bool:
        lowered = name.lower()
        characters = select(Character.id).where(func.lower(Character.name) == lowered, Character.status != "retired")
        others = select(CharacterSubmission.id).where(
            func.lower(CharacterSubmission.name) == lowered,
            CharacterSubmission.id != submission_id,
            CharacterSubmission.state.in_(list(State.IN_QUEUE)),
        )
        return session.scalars(characters).first() is not None or session.scalars(others).first() is not None

    def _require_admin(self, who: Actor) -> None:
        if who.platform != "cli" and not self.settings.is_admin(who.platform, who.user_id):
            raise NotAllowed("Only an admin can do that.")

    def _audit(self, session: Session, who: Actor, action: str, submission: CharacterSubmission, detail: str) -> None:
        session.add(AuditEntry(actor=str(who), action=action, target=f"submission:{submission.id}", detail=detail))

    def _tell_admins(self, session: Session, text: str) -> None:
        """Leave a notification for every configured admin (their bot delivers it in a DM)."""
        for admin in self.settings.admin_ids:
            platform, _, user_id = admin.partition(":")
            user = get_or_create_user(session, platform, user_id)
            session.add(Notification(user_id=user.id, platform=platform, platform_chat_id=user_id, kind="review", text=text))
