"""Characters: create, edit, list, publish, retire, reference images; the ``unichar character`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.characters import (
    CharacterError,
    accept_image,
    add_reference_image,
    create_character,
    edit_character,
    get_character,
    greetings,
    list_characters,
    publish_character,
    retire_character,
)
from core.db.models import Character
from core.db.session import make_engine
from core.media import FileStore
from tests.core.test_cards import png_with, text_chunks, v3_card, b64
from tests.factories import image_bytes
from unichar.cli import main


def test_lifecycle_create_edit_publish_retire(sessionmaker) -> None:
    with sessionmaker.begin() as session:
        mio = create_character(session, "  Mio ", description="", greeting="Shh.", alternate_greetings=["Hm?"])
        assert mio.name == "Mio" and mio.status == "draft"
        assert list_characters(session) == []
        with pytest.raises(CharacterError, match="no description"):
            publish_character(session, mio)
        edit_character(session, mio, description="A quiet librarian.", image_policy="auto")
        publish_character(session, mio)
        assert [c.name for c in list_characters(session)] == ["Mio"]
        assert get_character(session, "MIO") is mio
        assert greetings(mio) == ["Shh.", "Hm?"]
        retire_character(session, mio)
        assert list_characters(session) == []
        assert list_characters(session, ("retired",)) == [mio]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"name": ""}, "needs a name"),
        ({"name": "x" * 65}, "at most 64"),
        ({"name": "two\nlines"}, "one line"),
        ({"description": 3}, "description must be text"),
        ({"alternate_greetings": "hi"}, "list of texts"),
        ({"image_policy": "always"}, "image_policy must be one of"),
        ({"nsfw": "yes"}, "true or false"),
        ({"adapter_key": "x"}, "unknown character fields"),
    ],
)
def test_bad_edits_are_refused_and_change_nothing(fields, reason, sessionmaker) -> None:
    with sessionmaker.begin() as session:
        create_character(session, "Mio", description="A librarian.")
    with pytest.raises(CharacterError, match=reason), sessionmaker.begin() as session:
        edit_character(session, get_character(session, "Mio"), **fields)
    with sessionmaker() as session:
        mio = get_character(session, "Mio")
        assert (mio.description, mio.image_policy, mio.nsfw) == ("A librarian.", "on_request", False)


def test_names_are_unique_ignoring_case(sessionmaker) -> None:
    with sessionmaker.begin() as session:
        create_character(session, "Mio", description="d")
        with pytest.raises(CharacterError, match="already exists"):
            create_character(session, "mio", description="d")
        other = create_character(session, "Rin", description="d")
        with pytest.raises(CharacterError, match="already exists"):
            edit_character(session, other, name="MIO")


def test_reference_images_are_validated_and_stored(sessionmaker, settings) -> None:
    store = FileStore(settings.files_dir)
    with sessionmaker.begin() as session:
        mio = create_character(session, "Mio", description="d")
        first = add_reference_image(session, mio, accept_image(image_bytes("PNG"), settings), store, "one")
        add_reference_image(session, mio, accept_image(image_bytes("JPEG"), settings), store, "two")
        assert mio.avatar_key == first.file_key
        assert [(r.position, r.caption) for r in mio.reference_images] == [(0, "one"), (1, "two")]
        assert all(store.exists(r.file_key) for r in mio.reference_images)
    with pytest.raises(CharacterError, match="image refused"):
        accept_image(b"not an image", settings)


# --- the unichar character commands ---------------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The command's settings on a fresh tmp data dir (the command migrates the empty store itself)."""
    monkeypatch.setenv("UNICHAR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("UNICHAR_DATABASE_URL", "")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_import_list_export(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = cli_env / "hime.png"
    card.write_bytes(png_with({"ccv3": b64(v3_card())}))
    assert main(["character", "import", str(card)]) == 0
    assert "imported Ichihime (published, 1 reference image)" in capsys.readouterr().out
    assert main(["character", "list"]) == 0
    assert "Ichihime" in capsys.readouterr().out
    assert main(["character", "export", "ichihime", "--out", str(cli_env / "out.png")]) == 0
    assert text_chunks((cli_env / "out.png").read_bytes())["ccv3"] == v3_card()
    assert main(["character", "export", "Ichihime", "--format", "json"]) == 0
    assert json.loads((cli_env / "Ichihime.json").read_text()) == v3_card()


def test_cli_refusals_exit_2_and_store_nothing(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = cli_env / "bad.png"
    bad.write_bytes(png_with({"chara": b"@@@"}))
    assert main(["character", "import", str(bad)]) == 2
    assert "not valid base64" in capsys.readouterr().err
    huge = cli_env / "huge.png"
    with huge.open("wb") as out:
        out.truncate(50 * 1024 * 1024)
    assert main(["character", "import", str(huge)]) == 2
    assert "50.0 MB; the limit is 20.0 MB" in capsys.readouterr().err
    assert main(["character", "import", str(cli_env / "missing.json")]) == 2
    assert main(["character", "import", str(cli_env)]) == 2
    assert "neither a card file nor a RoleScape folder" in capsys.readouterr().err
    assert main(["character", "export", "Nobody"]) == 2
    engine = make_engine(f"sqlite:///{(cli_env / 'var' / 'unichar.db').as_posix()}")
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Character)) == 0
    engine.dispose()
