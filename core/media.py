"""Image intake and the content-addressed file store.

Uploaded bytes are never trusted or kept as sent: :func:`validate_image` sniffs the content (not the file name),
refuses oversized files and decompression bombs before decoding pixels, decodes for real, applies the EXIF
orientation, and re-encodes (JPEG stays JPEG, everything else becomes PNG), which drops every metadata block
(EXIF with GPS, comments, ICC). Chat pictures may be PNG, JPEG, WebP or GIF (its first frame); a character's
training pictures (/newcharacter, issue 7) only PNG, JPEG or WebP (``TRAINING_FORMATS``). :class:`FileStore` keeps
blobs under their sha256, written atomically, so a duplicate upload costs nothing and a half-written file is never
visible.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from core.config import Settings

__all__ = [
    "ACCEPTED_FORMATS",
    "TRAINING_FORMATS",
    "FileStore",
    "MediaError",
    "ValidatedImage",
    "format_names",
    "validate_image",
]

ACCEPTED_FORMATS: Final = ("PNG", "JPEG", "WEBP", "GIF")
TRAINING_FORMATS: Final = ("PNG", "JPEG", "WEBP")  # a character's source pictures: stills only
_SPELLING: Final = {"WEBP": "WebP"}
_KEY = re.compile(r"^[0-9a-f]{64}(\.[a-z0-9]{1,12})?$")


class MediaError(ValueError):
    """An upload was refused; ``str(error)`` is the reason, fit to show the user."""


@dataclass(frozen=True, slots=True)
class ValidatedImage:
    """A decoded, normalised image ready to store: clean bytes and its size."""

    data: bytes = field(repr=False)
    format: Literal["png", "jpeg"]
    width: int
    height: int

    @property
    def suffix(self) -> str:
        """File-store suffix of the encoded bytes."""
        return ".jpg" if self.format == "jpeg" else ".png"

    @property
    def content_type(self) -> str:
        """MIME type of the encoded bytes."""
        return f"image/{self.format}"

    def open(self) -> Image.Image:
        """The image decoded again (cheap: the bytes are already clean)."""
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.0f} MB"


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def format_names(formats: Sequence[str]) -> str:
    """Pillow's format names as people write them: "PNG, JPEG or WebP"."""
    names = [_SPELLING.get(name, name) for name in formats]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def validate_image(data: bytes, settings: Settings, formats: Sequence[str] = ACCEPTED_FORMATS) -> ValidatedImage:
    """Decode and normalise an uploaded image in one of ``formats``, or raise MediaError saying why it was refused."""
    if not data:
        raise MediaError("The file is empty.")
    if len(data) > settings.max_upload_bytes:
        raise MediaError(f"The image is too large: the limit is {_megabytes(settings.max_upload_bytes)}.")
    try:
        # formats= makes Pillow sniff only these decoders from the bytes; the header is read, no pixels yet
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
        if isinstance(error, Image.DecompressionBombError):
            raise MediaError("The image has too many pixels.") from None
        raise MediaError(f"This file is not an image I can read: send a {format_names(formats)}.") from None
    source_format = image.format
    if source_format not in formats:  # a GIF where only stills are taken
        found = format_names([source_format or "?"])
        raise MediaError(f"A {found} image can't be used here: send a {format_names(formats)}.")
    width, height = image.size
    if width < 1 or height < 1 or width * height > settings.max_image_pixels:  # the decompression-bomb guard
        raise MediaError(f"The image has too many pixels: the limit is {settings.max_image_pixels:,}.")
    try:
        image.seek(0)  # an animation's first frame
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise MediaError("The image is damaged or incomplete.") from None
    alpha = _has_alpha(image)
    image = image.convert("RGBA" if alpha else "RGB")  # a fresh image: no EXIF, ICC or comments survive
    out = io.BytesIO()
    if source_format == "JPEG" and not alpha:
        image.save(out, format="JPEG", quality=95, optimize=True)
        fmt: Literal["png", "jpeg"] = "jpeg"
    else:
        image.save(out, format="PNG", optimize=False)
        fmt = "png"
    return ValidatedImage(data=out.getvalue(), format=fmt, width=image.width, height=image.height)


def _normal_suffix(suffix: str) -> str:
    suffix = suffix.lower()
    if suffix and not suffix.startswith("."):
        suffix = "." + suffix
    if suffix and not re.fullmatch(r"\.[a-z0-9]{1,12}", suffix):
        raise ValueError(f"bad file-store suffix {suffix!r}")
    return suffix


class FileStore:
    """Blobs (images, adapters) under ``root``, named by the sha256 of their content plus a suffix."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """Where the blob ``key`` lives; raises ValueError on a malformed key (no path tricks)."""
        if not _KEY.match(key):
            raise ValueError(f"bad file-store key {key!r}")
        return self.root / key[:2] / key[2:4] / key

    def _place(self, key: str, write: Callable[[BinaryIO], None]) -> str:
        target = self.path(key)
        if target.exists():
            return key
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)  # atomic: readers see the whole file or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def put(self, data: bytes, suffix: str = "") -> str:
        """Store ``data``; returns its key (the same for the same content)."""
        key = hashlib.sha256(data).hexdigest() + _normal_suffix(suffix)
        return self._place(key, lambda out: out.write(data))

    def put_path(self, source: Path | str, suffix: str = "") -> str:
        """Store a (large) file by streaming it; returns its key."""
        digest = hashlib.sha256()
        with open(source, "rb") as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)

        def copy(out: BinaryIO) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)

        return self._place(digest.hexdigest() + _normal_suffix(suffix), copy)

    def exists(self, key: str) -> bool:
        """Whether the blob is stored."""
        return self.path(key).exists()

    def read(self, key: str) -> bytes:
        """The blob's bytes; raises FileNotFoundError when missing."""
        return self.path(key).read_bytes()

    def open(self, key: str) -> BinaryIO:
        """The blob opened for reading."""
        return self.path(key).open("rb")

    def delete(self, key: str) -> bool:
        """Remove the blob; returns whether it existed."""
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            return False
        return True
