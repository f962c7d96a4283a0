"""`unichar admin queue ...` drives the review queue from the shell and reports refusals as exit code 2."""

from __future__ import annotations

import pytest
from PIL import Image

from core.media import FileStore
from core.submissions import Actor, Submissions
from tests.training.builders import make_db, make_settings, noise_png
from unichar.cli import main

USER = Actor("test", "u1")


@pytest.fixture
def pending(tmp_path, monkeypatch):
    monkeypatch.setenv("UNICHAR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("UNICHAR_ADMIN_IDS", "test:admin")
    settings = make_settings(tmp_path)
    db = make_db(settings)
    service = Submissions(settings, FileStore(settings.files_dir))
    with db.begin() as s:
        service.start(s, USER)
        service.set_name(s, USER, "Ichihime")
        service.set_description(s, USER, "A cheerful cat-eared mahjong player.")
        service.set_greeting(s, USER, "Nya!")
        for i in range(10):
            service.add_image(s, USER, noise_png(i))
        service.attest_consent(s, USER, real_person=False)
        return service.submit(s, USER).id


def test_queue_list_show_approve(pending, tmp_path, capsys, monkeypatch):
    sent: list[int] = []
    monkeypatch.setattr("unichar.admin_cli._train_sender", lambda _settings, _installation: sent.append)
    assert main(["admin", "queue", "list"]) == 0
    assert f"#{pending}" in capsys.readouterr().out
    sheet = tmp_path / "sheet.png"
    assert main(["admin", "queue", "show", str(pending), "--sheet", str(sheet)]) == 0
    assert "cat-eared" in capsys.readouterr().out and Image.open(sheet).format == "PNG"
    assert main(["admin", "queue", "approve", str(pending)]) == 0
    assert f"train job {sent[0]} queued" in capsys.readouterr().out
    assert main(["admin", "queue", "list"]) == 0
    assert "approved" in capsys.readouterr().out


def test_refusals_are_one_line(pending, capsys):
    assert main(["admin", "queue", "approve", "999"]) == 2
    assert "no submission #999" in capsys.readouterr().err
    assert main(["admin", "queue", "reject", str(pending), "Blurry", "images"]) == 0
    assert main(["admin", "queue", "retry", str(pending)]) == 2
    assert "is rejected" in capsys.readouterr().err
