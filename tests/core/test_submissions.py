"""The /newcharacter workflow and the admin queue on SQLite: refusals are clear and change nothing."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image
from sqlalchemy import func, select

from core.db.models import (
    AuditEntry,
    Character,
    CharacterSubmission,
    Job,
    Notification,
    TrainingJob,
)
from core.jobs import JobKind, JobState
from core.media import FileStore
from core.submissions import (
    Actor,
    NotAllowed,
    State,
    Step,
    SubmissionError,
    Submissions,
    hash_distance,
    mark_delivered,
    pending_notifications,
    perceptual_hash,
)
from tests.training.builders import make_settings, noise_png

USER = Actor("test", "u1", "Ada")
ADMIN = Actor("test", "admin")


@pytest.fixture
def env(tmp_path, any_sessionmaker):
    """Settings with admins, the store, the service; every test runs on SQLite and on PostgreSQL."""
    settings = make_settings(tmp_path)
    store = FileStore(settings.files_dir)
    sent: list[int] = []
    return settings, any_sessionmaker, store, Submissions(settings, store, dispatch=sent.append), sent


def fill(service: Submissions, db, n: int = 10, who: Actor = USER, name: str = "Ichihime") -> None:
    with db.begin() as s:
        service.start(s, who, chat_id="c1")
        service.set_name(s, who, name)
        service.set_description(s, who, "A cheerful cat-eared mahjong player who loves fish and winning.")
        service.set_greeting(s, who, "Nya! Shall we play a round?")
        for i in range(n):
            service.add_image(s, who, noise_png(i + 100 * len(name)))
        service.attest_consent(s, who, real_person=False)


def submitted(env) -> int:
    settings, db, store, service, _ = env
    fill(service, db)
    with db.begin() as s:
        return service.submit(s, USER).id


def test_dialog_survives_restart_and_steps_advance(env):
    settings, db, store, service, _ = env
    with db.begin() as s:
        first = service.start(s, USER)
        assert first.step == Step.NAME
        service.set_name(s, USER, "  Ichihime ")
    with db.begin() as s:  # a new session, as after a bot restart
        again = service.start(s, USER)
        assert again.id == first.id and again.name == "Ichihime" and again.step == Step.DESCRIPTION


def test_submit_needs_exactly_the_configured_images(env):
    settings, db, store, service, _ = env
    fill(service, db, n=9)
    with db.begin() as s:
        with pytest.raises(SubmissionError, match="10 images \\(it has 9\\)"):
            service.submit(s, USER)
    with db.begin() as s:
        assert service.draft(s, USER).state == State.COLLECTING  # nothing changed
        assert service.add_image(s, USER, noise_png(999)) == 10
        with pytest.raises(SubmissionError, match="the most allowed"):
            service.add_image(s, USER, noise_png(1000))
        assert service.submit(s, USER).state == State.PENDING
    with db.begin() as s:
        kinds = [n.kind for n in s.scalars(select(Notification))]
        assert "submitted" in kinds and "review" in kinds  # the submitter and the admins are told


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF", "not an image"),
        (noise_png(1)[:60], "damaged|not an image"),
        (b"", "empty"),
    ],
)
def test_bad_files_refused_with_reason(env, data, reason):
    settings, db, store, service, _ = env
    with db.begin() as s:
        service.start(s, USER)
        service.add_image(s, USER, noise_png(1))
        with pytest.raises(SubmissionError, match=reason):
            service.add_image(s, USER, data)
        assert len(service.draft(s, USER).images) == 1


def _huge_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a tiny (truncated) body: a decompression bomb's shape."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_100_megapixel_png_refused(env):
    settings, db, store, service, _ = env
    with db.begin() as s:
        service.start(s, USER)
        with pytest.raises(SubmissionError, match="too many pixels"):
            service.add_image(s, USER, _huge_png(10_000, 10_000))


def test_identical_and_near_duplicate_images_refused(env):
    settings, db, store, service, _ = env
    original = noise_png(7, size=256)
    recoded = io.BytesIO()
    Image.open(io.BytesIO(original)).convert("RGB").resize((200, 200)).save(recoded, format="JPEG", quality=80)
    with db.begin() as s:
        service.start(s, USER)
        assert service.add_image(s, USER, original) == 1
        for dup in (original, recoded.getvalue()):
            with pytest.raises(SubmissionError, match="near-duplicate of image 1"):
                service.add_image(s, USER, dup)
        assert len(service.draft(s, USER).images) == 1


def test_perceptual_hash_separates_different_images():
    a, b = (Image.open(io.BytesIO(noise_png(seed, 128))) for seed in (1, 2))
    assert hash_distance(perceptual_hash(a), perceptual_hash(a)) == 0
    assert hash_distance(perceptual_hash(a), perceptual_hash(b)) > 10


def test_text_validation(env):
    settings, db, store, service, _ = env
    with db.begin() as s:
        service.start(s, USER)
        with pytest.raises(SubmissionError, match="too short"):
            service.set_name(s, USER, " ")
        with pytest.raises(SubmissionError, match="one line"):
            service.set_name(s, USER, "two\nlines")
        with pytest.raises(SubmissionError, match="too long"):
            service.set_description(s, USER, "x" * 9000)
        s.add(Character(name="Taken"))
        s.flush()
        with pytest.raises(SubmissionError, match="already a character"):
            service.set_name(s, USER, "taken")
    with db.begin() as s:
        with pytest.raises(SubmissionError, match="no character in progress"):
            service.set_name(s, Actor("test", "stranger"), "Someone")


def test_cancel_deletes_images(env):
    settings, db, store, service, _ = env
    fill(service, db, n=3)
    with db.begin() as s:
        keys = [i.file_key for i in service.draft(s, USER).images]
        assert all(store.exists(k) for k in keys)
        service.cancel(s, USER)
    assert not any(store.exists(k) for k in keys)
    with db.begin() as s:
        assert service.draft(s, USER) is None


def test_admin_actions_need_an_admin_and_are_audited(env):
    settings, db, store, service, sent = env
    sid = submitted(env)
    with db.begin() as s:
        with pytest.raises(NotAllowed):
            service.approve(s, USER, sid)
        [item] = service.list_pending(s, ADMIN)
        assert item.id == sid and item.images == 10
        view = service.inspect(s, ADMIN, sid)
        sheet = Image.open(io.BytesIO(view.contact_sheet_png))
        assert sheet.format == "PNG" and sheet.width == 5 * 256 and sheet.height == 2 * 256
        assert "mahjong" in view.description
        job_id = service.approve(s, ADMIN, sid)
        assert sent == []  # dispatched only after commit
    assert sent == [job_id]
    with db.begin() as s:
        job = s.get(Job, job_id)
        assert job.kind == JobKind.TRAIN and job.state == JobState.QUEUED
        training = s.scalars(select(TrainingJob)).one()
        assert training.job_id == job_id and training.config["rank"] == settings.lora_rank
        with pytest.raises(SubmissionError, match="is approved"):
            service.reject(s, ADMIN, sid, "too late")
        service.admin_cancel(s, ADMIN, sid, "changed my mind")
        assert s.get(Job, job_id).state == JobState.CANCELLED
        assert [a.action for a in s.scalars(select(AuditEntry).order_by(AuditEntry.id))] == ["approve", "cancel"]


def test_reject_tells_the_submitter_and_drops_images(env):
    settings, db, store, service, _ = env
    sid = submitted(env)
    with db.begin() as s:
        with pytest.raises(SubmissionError, match="too short"):
            service.reject(s, ADMIN, sid, "")
        keys = [i.file_key for i in s.get(CharacterSubmission, sid).images]
        service.reject(s, ADMIN, sid, "The images show several different people.")
    assert not any(store.exists(k) for k in keys)
    with db.begin() as s:
        notes = pending_notifications(s, "test")
        rejected = [n for n in notes if n.kind == "rejected"]
        assert rejected and "several different people" in rejected[0].text and rejected[0].platform_chat_id == "c1"
        mark_delivered(s, rejected[0].id)
    with db.begin() as s:
        assert all(n.kind != "rejected" for n in pending_notifications(s, "test"))


def test_retry_and_publish(env):
    settings, db, store, service, sent = env
    sid = submitted(env)
    with db.begin() as s:
        service.approve(s, ADMIN, sid)
    with db.begin() as s:
        sub = s.get(CharacterSubmission, sid)
        with pytest.raises(SubmissionError, match="needs it to be failed"):
            service.retry(s, ADMIN, sid)
        sub.state = State.FAILED
    with db.begin() as s:
        job_id = service.retry(s, ADMIN, sid)
    assert sent[-1] == job_id
    adapter_key = store.put(b"adapter bytes", ".lora")
    with db.begin() as s:
        service.training_started(s, sid)
        training = s.scalars(select(TrainingJob)).one()
        training.adapter_key, training.report = adapter_key, {"identity_similarity": 0.5}
        service.training_finished(s, sid)
        with pytest.raises(NotAllowed):
            service.publish(s, USER, sid)
        character = service.publish(s, ADMIN, sid)
        assert character.adapter_version == 1 and character.status == "published"
        assert character.card["evaluation"] == {"identity_similarity": 0.5}
    with db.begin() as s:
        assert s.scalar(select(func.count()).select_from(Notification).where(Notification.kind == "published")) == 1
        service.withdraw(s, USER, sid)
    assert not store.exists(adapter_key)
    with db.begin() as s:
        assert s.scalars(select(Character)).one().status == "retired"
