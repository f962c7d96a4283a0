"""Character Card V2/V3: round trips through SQL (PNG and JSON), unknown keys kept, malformed cards refused."""

from __future__ import annotations

import base64
import copy
import json
import struct
import zlib
from typing import Any

import pytest
from sqlalchemy import func, select

from core.cards import CardError, load_card, parse_card, scan_lorebook
from core.characters import CharacterError, edit_character, export_card, greetings, import_card
from core.db.models import Character, ReferenceImage
from core.media import FileStore
from tests.factories import image_bytes

BOOK = {
    "name": "Temple lore",
    "scan_depth": 3,
    "token_budget": 60,
    "extensions": {"tool": {"x": 1}},
    "entries": [
        {"keys": ["tuna"], "content": "Ichihime would trade her bells for tuna.", "insertion_order": 2, "enabled": True,
         "extensions": {}},
        {"keys": ["temple"], "content": "The temple sits on a hill.", "insertion_order": 1, "priority": 5,
         "enabled": True, "extensions": {"depth": 4}},
        {"keys": ["Mahjong"], "content": "Mahjong is life.", "case_sensitive": True, "insertion_order": 3,
         "enabled": True, "extensions": {}},
        {"keys": ["secret"], "content": "Disabled entry.", "insertion_order": 0, "enabled": False, "extensions": {}},
        {"keys": [], "content": "Always on.", "constant": True, "insertion_order": 9, "enabled": True,
         "extensions": {}},
        {"keys": ["cat"], "secondary_keys": ["ears"], "selective": True, "content": "She insists the ears are fake.",
         "insertion_order": 4, "enabled": True, "extensions": {}},
        {"keys": ["r[ou]ll"], "use_regex": True, "content": "Dice are forbidden.", "insertion_order": 5,
         "enabled": True, "extensions": {}},
    ],
}


def v2_card() -> dict[str, Any]:
    return {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": "Ichihime",
            "description": "A cat-eared priestess of the Mahjong Soul temple who loves {{user}}'s snacks.",
            "personality": "greedy, sleepy, proud",
            "scenario": "A mahjong round at the temple.",
            "first_mes": "Hello! Glad to meet you-nyaa!",
            "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Nyaa!",
            "creator_notes": "made by a test",
            "system_prompt": "",
            "post_history_instructions": "",
            "alternate_greetings": ["Nyaa? Tuna?", "Zzz... oh, hi!"],
            "character_book": copy.deepcopy(BOOK),
            "tags": ["cat", "mahjong"],
            "creator": "tests",
            "character_version": "1.0",
            "extensions": {"depth_prompt": {"depth": 4, "prompt": "meow"}, "someone_else": [1, 2, {"a": None}]},
        },
        "unknown_top_level": {"kept": True},
    }


def v3_card() -> dict[str, Any]:
    card = v2_card()
    card["spec"], card["spec_version"] = "chara_card_v3", "3.0"
    card["data"].update(
        {
            "nickname": "Hime",
            "group_only_greetings": ["Hello, everyone-nyaa!"],
            "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
            "creation_date": 1700000000,
            "source": ["https://example.invalid/card"],
            "future_field": {"nested": ["kept"]},
        }
    )
    card["data"]["character_book"]["entries"][0]["use_regex"] = False
    return card


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with(chunks: dict[str, bytes]) -> bytes:
    """A real PNG with ``tEXt`` chunks (keyword -> text) inserted before IEND, built without the code under test."""
    png = image_bytes("PNG")
    iend = png.rindex(b"IEND") - 4
    extra = b"".join(_chunk(b"tEXt", k.encode() + b"\0" + v) for k, v in chunks.items())
    return png[:iend] + extra + png[iend:]


def b64(document: Any) -> bytes:
    return base64.b64encode(json.dumps(document).encode())


def text_chunks(png: bytes) -> dict[str, dict[str, Any]]:
    """The card chunks of a PNG, decoded independently of core.cards."""
    out, pos = {}, 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            out[key.decode()] = json.loads(base64.b64decode(value))
        pos += 12 + length
    return out


@pytest.fixture
def store(settings) -> FileStore:
    return FileStore(settings.files_dir)


def _import(sessionmaker, store, settings, data: bytes, **kw: Any) -> int:
    with sessionmaker.begin() as session:
        return import_card(session, data, store, settings, **kw).id


def _export(sessionmaker, store, character_id: int, fmt: str) -> bytes:
    with sessionmaker() as session:
        return export_card(session.get(Character, character_id), store, fmt)


@pytest.mark.parametrize("make", [v2_card, v3_card], ids=["v2", "v3"])
def test_json_round_trip_is_identical(make, sessionmaker, store, settings) -> None:
    original = make()
    cid = _import(sessionmaker, store, settings, json.dumps(original).encode())
    exported = json.loads(_export(sessionmaker, store, cid, "json"))
    assert exported == original
    with sessionmaker.begin() as session:  # the re-import of the export equals the first import
        session.delete(session.get(Character, cid))
    again = _import(sessionmaker, store, settings, json.dumps(exported).encode())
    assert json.loads(_export(sessionmaker, store, again, "json")) == original


@pytest.mark.parametrize("make", [v2_card, v3_card], ids=["v2", "v3"])
def test_png_round_trip_is_identical(make, sessionmaker, store, settings) -> None:
    original = make()
    keyword = "ccv3" if original["spec"] == "chara_card_v3" else "chara"
    cid = _import(sessionmaker, store, settings, png_with({keyword: b64(original)}))
    png = _export(sessionmaker, store, cid, "png")
    chunks = text_chunks(png)
    assert chunks[keyword] == original
    if keyword == "ccv3":  # V2 readers get a chara copy
        assert chunks["chara"]["spec"] == "chara_card_v2" and chunks["chara"]["data"] == original["data"]
    with sessionmaker.begin() as session:
        session.delete(session.get(Character, cid))
    again = _import(sessionmaker, store, settings, png)
    assert text_chunks(_export(sessionmaker, store, again, "png"))[keyword] == original


def test_ccv3_is_read_before_chara(sessionmaker, store, settings) -> None:
    v2 = v2_card()
    v2["data"]["name"] = "OldName"
    cid = _import(sessionmaker, store, settings, png_with({"chara": b64(v2), "ccv3": b64(v3_card())}))
    with sessionmaker() as session:
        character = session.get(Character, cid)
        assert character.name == "Ichihime"
        assert character.card["spec"] == "chara_card_v3"


def test_import_maps_fields_and_stores_the_image(sessionmaker, store, settings) -> None:
    cid = _import(sessionmaker, store, settings, png_with({"chara": b64(v2_card())}))
    with sessionmaker() as session:
        c = session.get(Character, cid)
        assert c.status == "published"
        assert c.greeting == "Hello! Glad to meet you-nyaa!"
        assert c.style_notes == "greedy, sleepy, proud"
        assert c.example_dialogues.startswith("<START>")
        assert greetings(c) == ["Hello! Glad to meet you-nyaa!", "Nyaa? Tuna?", "Zzz... oh, hi!"]
        assert [r.caption for r in c.reference_images] == ["card image"]
        stored = store.read(c.avatar_key)
        assert b"tEXt" not in stored  # metadata (and the card chunk) stripped by validate_image


def test_edits_are_exported_and_the_rest_kept(sessionmaker, store, settings) -> None:
    cid = _import(sessionmaker, store, settings, json.dumps(v3_card()).encode())
    with sessionmaker.begin() as session:
        edit_character(session, session.get(Character, cid), greeting="Edited hello", scenario="")
    exported = json.loads(_export(sessionmaker, store, cid, "json"))
    assert exported["data"]["first_mes"] == "Edited hello"
    assert exported["data"]["scenario"] == ""
    assert exported["data"]["future_field"] == {"nested": ["kept"]}
    assert exported["data"]["extensions"] == v3_card()["data"]["extensions"]


def test_native_character_exports_a_valid_v3_card(sessionmaker, store, settings) -> None:
    from core.characters import add_reference_image, create_character
    from core.media import validate_image

    with sessionmaker.begin() as session:
        c = create_character(session, "Mio", description="A librarian.", greeting="Shh.", status="published")
        cid = c.id
        with pytest.raises(CharacterError, match="no image"):
            export_card(c, store, "png")
        add_reference_image(session, c, validate_image(image_bytes("JPEG"), settings), store)
    loaded = load_card(_export(sessionmaker, store, cid, "png"), max_bytes=settings.max_upload_bytes)
    assert loaded.card.version == 3
    assert loaded.card.data["name"] == "Mio" and loaded.card.data["first_mes"] == "Shh."


def _refused(sessionmaker, store, settings, data: bytes, reason: str) -> None:
    with pytest.raises(CharacterError, match=reason):
        _import(sessionmaker, store, settings, data)
    with sessionmaker() as session:
        assert session.scalar(select(func.count()).select_from(Character)) == 0
        assert session.scalar(select(func.count()).select_from(ReferenceImage)) == 0
    assert not settings.files_dir.exists() or not any(p.is_file() for p in settings.files_dir.rglob("*"))


def _wrong(field: str, value: Any) -> bytes:
    card = v2_card()
    card["data"][field] = value
    return json.dumps(card).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (png_with({"chara": b"not base64 at all!!"}), "not valid base64"),
        (png_with({"chara": base64.b64encode(b"{broken json")}), "not valid JSON"),
        (png_with({"comment": b64(v2_card())}), "no 'ccv3' or 'chara'"),
        (image_bytes("PNG"), "holds no character card"),
        (b"\x89PNG\r\n\x1a\n" + b"\0\0\0\x0dIHDR" + b"\0" * 5, "truncated"),
        (png_with({"chara": b64(v2_card())})[:-30], "truncated|corrupt"),
        (b"", "empty"),
        (b"GIF89a....", "not valid JSON"),
        (json.dumps([1, 2]).encode(), "must be a JSON object"),
        (json.dumps({"spec": "chara_card_v9", "data": {}}).encode(), "unsupported card spec"),
        (json.dumps({"spec": "chara_card_v2", "spec_version": "2.0"}).encode(), "no 'data' object"),
        (_wrong("name", ""), "has no name"),
        (_wrong("name", 42), "has no name"),
        (_wrong("description", ["a", "list"]), "data.description must be a string"),
        (_wrong("alternate_greetings", "one string"), "alternate_greetings must be a list of strings"),
        (_wrong("extensions", []), "extensions must be an object"),
        (_wrong("character_book", {"entries": [{"keys": "tuna", "content": "x"}]}), r"entries\[0\]\.keys"),
        (_wrong("character_book", {"entries": "nope"}), "entries must be a list"),
    ],
    ids=[
        "bad-base64", "bad-json-in-chunk", "wrong-chunk", "no-chunk", "truncated-header", "truncated-file", "empty",
        "not-a-card", "json-array", "bad-spec", "no-data", "empty-name", "int-name", "list-description",
        "string-greetings", "list-extensions", "string-keys", "string-entries",
    ],
)
def test_malformed_cards_are_refused_and_nothing_stored(data, reason, sessionmaker, store, settings) -> None:
    _refused(sessionmaker, store, settings, data, reason)


def test_a_50_mb_png_is_refused_before_parsing(sessionmaker, store, settings) -> None:
    huge = png_with({"chara": b64(v2_card())})
    huge = huge[:-12] + _chunk(b"zzZz", b"\0" * (50 * 1024 * 1024)) + huge[-12:]
    _refused(sessionmaker, store, settings, huge, "50.*MB; the limit is")


def test_a_card_whose_image_is_undecodable_stores_nothing(sessionmaker, store, settings) -> None:
    png = png_with({"chara": b64(v2_card())})
    start = png.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", png[start : start + 4])
    body = b"\x00" * length
    broken = png[:start] + _chunk(b"IDAT", body) + png[start + 12 + length :]
    _refused(sessionmaker, store, settings, broken, "image refused")


def test_duplicate_name_is_refused(sessionmaker, store, settings) -> None:
    _import(sessionmaker, store, settings, json.dumps(v2_card()).encode())
    with pytest.raises(CharacterError, match="already exists"):
        _import(sessionmaker, store, settings, json.dumps(v3_card()).encode())
    renamed = _import(sessionmaker, store, settings, json.dumps(v3_card()).encode(), name="Hime")
    with sessionmaker() as session:
        assert session.get(Character, renamed).name == "Hime"


def test_v1_card_is_lifted_to_v2() -> None:
    card = parse_card({"name": "Old", "description": "d", "first_mes": "hi"})
    assert card.version == 2 and card.data["first_mes"] == "hi"


def test_lorebook_injects_by_keyword_within_budget() -> None:
    count = lambda text: len(text.split())  # noqa: E731 - a word counter is enough for ordering and budget
    hits = scan_lorebook(BOOK, ["old turn about tuna", "x", "y", "Mahjong at the temple?"], count, budget=1000)
    # scan_depth 3 drops the first text; 'Mahjong' matches case-sensitively; constant entry always; ordered
    assert [h.content for h in hits] == ["The temple sits on a hill.", "Mahjong is life.", "Always on."]
    assert [h.content for h in scan_lorebook(BOOK, ["mahjong"], count, 1000)] == ["Always on."]
    assert "She insists the ears are fake." not in [h.content for h in scan_lorebook(BOOK, ["cat"], count, 1000)]
    assert "She insists the ears are fake." in [h.content for h in scan_lorebook(BOOK, ["cat ears"], count, 1000)]
    assert "Dice are forbidden." in [h.content for h in scan_lorebook(BOOK, ["let's roll"], count, 1000)]
    # a tight budget keeps the higher priority entry
    tight = scan_lorebook(BOOK, ["temple tuna"], count, budget=7)
    assert [h.content for h in tight] == ["The temple sits on a hill."]
    assert sum(h.tokens for h in scan_lorebook(BOOK, ["temple tuna Mahjong"], count, budget=10_000)) <= 60


def test_card_error_is_a_value_error() -> None:
    with pytest.raises(CardError):
        load_card(b"{}", max_bytes=10)
