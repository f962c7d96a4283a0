"""Character Card V2 and V3: reading, writing and the lorebook (``character_book``).

A card travels as JSON or inside a PNG as a ``tEXt`` chunk holding base64 JSON: ``ccv3`` (V3) is read first, then
``chara`` (V2, or V1 in old files). The parsed card keeps the whole document verbatim in :attr:`Card.raw`, so that
unknown keys and ``extensions`` survive an import/export round trip unchanged; only the fields a character edits
are written back over it. Everything here is pure: storage lives in :mod:`core.characters`.

Lorebook entries are injected when one of their keys appears in the recent text (case-insensitive unless the entry
says otherwise, regular expressions for V3 ``use_regex``), constant entries always; selective entries also need a
secondary key. When the hits exceed the token budget, the lowest ``priority`` entries go first, and the survivors
are ordered by ``insertion_order``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "CardError",
    "Card",
    "LoadedCard",
    "LoreHit",
    "PNG_SIGNATURE",
    "parse_card",
    "load_card",
    "card_json",
    "card_png",
    "new_card",
    "scan_lorebook",
]

log = logging.getLogger(__name__)

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_CARD_CHUNKS: Final = ("ccv3", "chara")  # reading order: V3 first
_SPECS: Final = {"chara_card_v2": ("2.0", 2), "chara_card_v3": ("3.0", 3)}
_TEXT_FIELDS: Final = (
    "name",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "creator_notes",
    "system_prompt",
    "post_history_instructions",
    "creator",
    "character_version",
    "nickname",
)
_LIST_FIELDS: Final = ("alternate_greetings", "tags", "group_only_greetings")
_V3_REQUIRED: Final = (
    "name",
    "description",
    "tags",
    "creator",
    "character_version",
    "mes_example",
    "extensions",
    "system_prompt",
    "post_history_instructions",
    "first_mes",
    "alternate_greetings",
    "personality",
    "scenario",
    "creator_notes",
    "group_only_greetings",
)


class CardError(ValueError):
    """A card that cannot be imported; the message says why, fit to show the user."""


@dataclass(frozen=True, slots=True)
class Card:
    """A validated character card; ``raw`` is the whole document as read, unknown keys included."""

    raw: dict[str, Any]

    @property
    def version(self) -> int:
        """2 or 3."""
        return _SPECS[self.raw["spec"]][1]

    @property
    def data(self) -> dict[str, Any]:
        """The card's ``data`` object."""
        return self.raw["data"]

    def text(self, field: str) -> str:
        """A text field, empty when absent."""
        return self.data.get(field) or ""

    def strings(self, field: str) -> list[str]:
        """A list-of-strings field, empty when absent."""
        return list(self.data.get(field) or [])

    @property
    def character_book(self) -> dict[str, Any] | None:
        """The embedded lorebook, if any."""
        return self.data.get("character_book")


@dataclass(frozen=True, slots=True)
class LoadedCard:
    """A card read from a file; ``image`` is the PNG it came in (None for JSON)."""

    card: Card
    image: bytes | None


@dataclass(frozen=True, slots=True)
class LoreHit:
    """A lorebook entry whose keys matched the scanned text."""

    content: str
    priority: int
    order: int
    tokens: int


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise CardError(reason)


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check_book(book: Any) -> None:
    """Refuse a ``character_book`` whose shape the lorebook scanner cannot use."""
    _require(isinstance(book, dict), "character_book must be an object")
    entries = book.get("entries", [])
    _require(isinstance(entries, list), "character_book.entries must be a list")
    for i, entry in enumerate(entries):
        where = f"character_book.entries[{i}]"
        _require(isinstance(entry, dict), f"{where} must be an object")
        _require(_is_strings(entry.get("keys", [])), f"{where}.keys must be a list of strings")
        _require(_is_strings(entry.get("secondary_keys", [])), f"{where}.secondary_keys must be a list of strings")
        _require(isinstance(entry.get("content", ""), str), f"{where}.content must be a string")
        for key in ("insertion_order", "priority"):
            value = entry.get(key)
            _require(
                value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
                f"{where}.{key} must be a number",
            )
    budget = book.get("token_budget")
    _require(budget is None or (isinstance(budget, int) and budget >= 0), "character_book.token_budget must be >= 0")


def parse_card(document: Any) -> Card:
    """A validated card from a decoded JSON document; a V1 card (flat fields) is lifted to V2."""
    _require(isinstance(document, dict), "a character card must be a JSON object")
    spec = document.get("spec")
    if spec is None and "name" in document and "data" not in document:
        document = {"spec": "chara_card_v2", "spec_version": "2.0", "data": dict(document)}
        spec = "chara_card_v2"
    _require(spec in _SPECS, f"unsupported card spec {spec!r}: expected chara_card_v2 or chara_card_v3")
    data = document.get("data")
    _require(isinstance(data, dict), "the card has no 'data' object")
    name = data.get("name")
    _require(isinstance(name, str) and bool(name.strip()), "the card has no name (data.name)")
    _require(len(name.strip()) <= 64, "the card's name is longer than 64 characters")
    for field in _TEXT_FIELDS:
        _require(isinstance(data.get(field, ""), str), f"data.{field} must be a string")
    for field in _LIST_FIELDS:
        _require(_is_strings(data.get(field, [])), f"data.{field} must be a list of strings")
    _require(isinstance(data.get("extensions", {}), dict), "data.extensions must be an object")
    if data.get("character_book") is not None:
        _check_book(data["character_book"])
    return Card(document)


def _decode_json(payload: bytes, what: str) -> Any:
    try:
        return json.loads(payload.decode("utf-8-sig"))  # a BOM is common in hand-edited JSON
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"{what} is not valid JSON: {exc}") from None


def _png_chunks(png: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (type, body) chunks of a PNG, checked for truncation and CRC."""
    _require(png.startswith(PNG_SIGNATURE), "not a PNG file")
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        end = pos + 12 + length
        _require(end <= len(png), "the PNG is truncated")
        body = png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[end - 4 : end])
        _require(zlib.crc32(kind + body) == crc, f"PNG chunk {kind.decode('latin-1')!r} is corrupt (bad CRC)")
        yield kind, body
        if kind == b"IEND":
            return
        pos = end
    raise CardError("the PNG is truncated (no IEND chunk)")


def _text_chunks(png: bytes) -> dict[str, bytes]:
    """The PNG's ``tEXt`` chunks by lower-case keyword."""
    found: dict[str, bytes] = {}
    for kind, body in _png_chunks(png):
        if kind == b"tEXt" and b"\0" in body:
            keyword, _, text = body.partition(b"\0")
            found.setdefault(keyword.decode("latin-1").lower(), text)
    return found


def _card_from_png(png: bytes) -> Card:
    chunks = _text_chunks(png)
    keyword = next((k for k in _CARD_CHUNKS if k in chunks), None)
    _require(keyword is not None, "this PNG holds no character card (no 'ccv3' or 'chara' tEXt chunk)")
    try:
        payload = base64.b64decode(chunks[keyword], validate=True)
    except (binascii.Error, ValueError):
        raise CardError(f"the PNG's '{keyword}' chunk is not valid base64") from None
    return parse_card(_decode_json(payload, f"the PNG's '{keyword}' chunk"))


def load_card(data: bytes, *, max_bytes: int) -> LoadedCard:
    """A card from the bytes of a ``.png`` or ``.json`` file; raises :class:`CardError` with the reason."""
    _require(len(data) > 0, "the card file is empty")
    _require(
        len(data) <= max_bytes,
        f"the card file is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.1f} MB",
    )
    if data.startswith(PNG_SIGNATURE):
        return LoadedCard(_card_from_png(data), data)
    return LoadedCard(parse_card(_decode_json(data, "the card file")), None)


def card_json(card: Card) -> bytes:
    """The card as a JSON file."""
    return json.dumps(card.raw, ensure_ascii=False, indent=2).encode("utf-8")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _card_chunk(keyword: str, document: Mapping[str, Any]) -> bytes:
    payload = base64.b64encode(json.dumps(document, ensure_ascii=False).encode("utf-8"))
    return _chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + payload)


def card_png(card: Card, image_png: bytes) -> bytes:
    """``image_png`` carrying the card: ``ccv3`` for V3 (with a ``chara`` copy for V2 readers), ``chara`` for V2."""
    chunks = [
        (kind, body)
        for kind, body in _png_chunks(image_png)
        if not (kind == b"tEXt" and body.partition(b"\0")[0].decode("latin-1").lower() in _CARD_CHUNKS)
    ]
    added = [_card_chunk("chara", card.raw if card.version == 2 else _as_v2(card.raw))]
    if card.version == 3:
        added.append(_card_chunk("ccv3", card.raw))
    out = [PNG_SIGNATURE]
    for kind, body in chunks:
        if kind == b"IEND":
            out.extend(added)
        out.append(_chunk(kind, body))
    return b"".join(out)


def _as_v2(document: Mapping[str, Any]) -> dict[str, Any]:
    """The V2 view of a V3 card, for readers that only know ``chara`` (V2 readers ignore extra fields)."""
    return {**document, "spec": "chara_card_v2", "spec_version": "2.0"}


def new_card(fields: Mapping[str, Any]) -> Card:
    """A fresh V3 card holding ``fields`` (card field names), with every field V3 requires."""
    empty = {key: [] for key in _LIST_FIELDS} | {"extensions": {}}
    data: dict[str, Any] = {key: empty.get(key, "") for key in _V3_REQUIRED}
    data.update(fields)
    return parse_card({"spec": "chara_card_v3", "spec_version": "3.0", "data": data})


def _matches(keys: Sequence[str], text: str, folded: str, entry: Mapping[str, Any]) -> bool:
    """Whether any key occurs in the text, as the entry asks (regex, case)."""
    case = bool(entry.get("case_sensitive"))
    for key in keys:
        if not key:
            continue
        if entry.get("use_regex"):
            try:
                if re.search(key, text, 0 if case else re.IGNORECASE):
                    return True
            except re.error:
                log.warning("lorebook entry %r has a bad regex key %r", entry.get("name", ""), key)
        elif (key in text) if case else (key.casefold() in folded):
            return True
    return False


def scan_lorebook(
    book: Mapping[str, Any] | None,
    texts: Sequence[str],
    count_tokens: Callable[[str], int],
    budget: int,
) -> list[LoreHit]:
    """The entries triggered by ``texts`` (newest last), within the book's token budget or ``budget``."""
    if not book:
        return []
    depth = book.get("scan_depth")
    scanned = texts[-depth:] if isinstance(depth, int) and depth > 0 else texts
    text = "\n".join(scanned)
    folded = text.casefold()
    hits: list[LoreHit] = []
    for entry in book.get("entries", []):
        content = entry.get("content", "")
        if entry.get("enabled", True) is False or not content.strip():
            continue
        if not entry.get("constant"):
            if not _matches(entry.get("keys", []), text, folded, entry):
                continue
            if entry.get("selective") and entry.get("secondary_keys"):
                if not _matches(entry["secondary_keys"], text, folded, entry):
                    continue
        priority, order = int(entry.get("priority") or 0), int(entry.get("insertion_order") or 0)
        hits.append(LoreHit(content, priority, order, count_tokens(content)))
    limit = min(budget, book["token_budget"]) if book.get("token_budget") else budget
    kept: list[LoreHit] = []
    used = 0
    for hit in sorted(hits, key=lambda h: (-h.priority, h.order)):
        if used + hit.tokens <= limit:
            kept.append(hit)
            used += hit.tokens
    return sorted(kept, key=lambda h: h.order)
