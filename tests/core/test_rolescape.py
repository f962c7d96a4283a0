"""RoleScape-20 folders (../shared/rolescape) imported as characters with their images and dialogues."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.characters import CharacterError
from core.db.models import Character, ReferenceImage
from core.media import FileStore
from core.rolescape import import_rolescape, read_rolescape

SAMPLE = Path(__file__).resolve().parents[2] / ".." / "shared" / "rolescape" / "train"
ICHIHIME = SAMPLE / "Mahjong Soul-Ichihime"
PIKACHU = SAMPLE / "Pokemon-Pikachu"

pytestmark = pytest.mark.skipif(not ICHIHIME.is_dir(), reason="the RoleScape sample (../shared/rolescape) is absent")


def test_read_ichihime() -> None:
    source = read_rolescape(ICHIHIME)
    annotation = json.loads((ICHIHIME / "annotation.json").read_text(encoding="utf-8"))
    assert source.name == "Ichihime"
    assert source.description == annotation["description"].strip()
    assert source.opening == annotation["opening"].strip()
    assert [path.name for path, _ in source.images] == [f"{i}.png" for i in range(10)]
    assert source.images[0][1].startswith("Ichihime winking")  # caption from the t2i instructions
    first_scene = annotation["scenes"][0]
    assert source.example_dialogues.startswith(
        f"<START>\n{{{{user}}}}: {first_scene[0]['text'].strip()}\n{{{{char}}}}: {first_scene[1]['text'].strip()}"
    )


def test_import_stores_character_and_ten_images(sessionmaker, settings) -> None:
    store = FileStore(settings.files_dir)
    with sessionmaker.begin() as session:
        character = import_rolescape(session, ICHIHIME, store, settings)
        cid = character.id
    with sessionmaker() as session:
        c = session.get(Character, cid)
        assert (c.name, c.status) == ("Ichihime", "published")
        assert c.greeting.startswith("Hello! My name is Ichihime.")
        assert len(c.reference_images) == 10
        assert all(store.exists(r.file_key) and r.width > 0 for r in c.reference_images)
        assert c.avatar_key == c.reference_images[0].file_key
        assert c.example_dialogues.count("<START>") > 10


def test_pikachu_with_empty_opening_and_seven_images(sessionmaker, settings) -> None:
    with sessionmaker.begin() as session:
        c = import_rolescape(session, PIKACHU, FileStore(settings.files_dir), settings)
        assert c.name == "Pikachu" and c.greeting == "" and len(c.reference_images) == 7


def test_broken_folder_is_refused_and_nothing_stored(tmp_path: Path, sessionmaker, settings) -> None:
    folder = tmp_path / "Broken-Char"
    shutil.copytree(ICHIHIME, folder, ignore=shutil.ignore_patterns("processed"))
    (folder / "7.png").write_bytes(b"this is not a png")
    with pytest.raises(CharacterError, match="image refused"), sessionmaker.begin() as session:
        import_rolescape(session, folder, FileStore(settings.files_dir), settings)
    (folder / "annotation.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CharacterError, match="annotation.json cannot be read"):
        read_rolescape(folder)
    with pytest.raises(CharacterError, match="not a RoleScape character folder"):
        read_rolescape(tmp_path)
    with sessionmaker() as session:
        assert session.scalar(select(func.count()).select_from(Character)) == 0
        assert session.scalar(select(func.count()).select_from(ReferenceImage)) == 0
    assert not settings.files_dir.exists()
