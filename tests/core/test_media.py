"""Image intake refuses what it cannot trust and normalises what it keeps; the file store is content-addressed."""

from __future__ import annotations

import io
import struct
import threading
import zlib

import pytest
from PIL import Image

from core.media import FileStore, MediaError, validate_image
from tests.factories import image_bytes


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(("fmt", "out"), [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "png"), ("GIF", "png")])
def test_accepted_formats_are_reencoded(settings, fmt, out):
    clean = validate_image(image_bytes(fmt), settings)
    assert clean.format == out and (clean.width, clean.height) == (32, 24)
    assert decoded(clean.data).format == out.upper()


def test_a_gif_keeps_its_first_frame(settings):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    image = decoded(validate_image(out.getvalue(), settings).data)
    assert image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied_and_metadata_dropped(settings):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    exif[0x010E] = "secret description"
    raw = image_bytes("JPEG", size=(40, 20), exif=exif.tobytes())
    clean = validate_image(raw, settings)
    assert (clean.width, clean.height) == (20, 40)
    assert b"secret description" not in clean.data and not decoded(clean.data).getexif()


def test_transparency_is_kept_as_png(settings):
    out = io.BytesIO()
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(out, format="PNG")
    clean = validate_image(out.getvalue(), settings)
    assert clean.format == "png" and decoded(clean.data).mode == "RGBA"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"%PDF-1.7 not an image" * 10, "not an image"),
        (bytes(range(256)) * 10, "not an image"),
        (b"GIF89a" + b"\x00" * 4, "not an image"),
        (image_bytes("BMP"), "not an image"),  # real image, format not accepted
        (image_bytes("PNG")[:80], "damaged"),
        (_png_header_only(100_000, 100_000), "too many pixels"),  # beyond Pillow's own bomb limit
        (_png_header_only(8_000, 6_000), "too many pixels"),  # beyond ours
    ],
)
def test_refusals_say_why(settings, data, reason):
    with pytest.raises(MediaError, match=f"(?i){reason}"):
        validate_image(data, settings)


def test_size_limits(tmp_path):
    from tests.conftest import make_settings

    small = make_settings(tmp_path, max_upload_bytes=1024, max_image_pixels=10_000)
    with pytest.raises(MediaError, match="too large"):
        validate_image(image_bytes("PNG", size=(200, 200)) + b"\x00" * 2000, small)
    with pytest.raises(MediaError, match="too many pixels"):
        validate_image(image_bytes("GIF", size=(101, 100)), small)


def test_file_store_is_content_addressed_and_atomic(tmp_path):
    store = FileStore(tmp_path)
    key = store.put(b"hello", ".PNG")
    assert key.endswith(".png") and store.put(b"hello", "png") == key
    assert store.read(key) == b"hello" and store.exists(key)
    with store.open(key) as blob:
        assert blob.read() == b"hello"
    assert not list(store.path(key).parent.glob(".tmp-*"))
    assert store.delete(key) and not store.delete(key) and not store.exists(key)


def test_file_store_streams_large_files(tmp_path):
    source = tmp_path / "adapter.bin"
    source.write_bytes(b"x" * (3 << 20))
    store = FileStore(tmp_path / "store")
    key = store.put_path(source, ".safetensors")
    assert key == store.put(source.read_bytes(), ".safetensors") and store.path(key).stat().st_size == 3 << 20


@pytest.mark.parametrize("key", ["../../etc/passwd", "ab", "A" * 64, "0" * 64 + "/x", "0" * 64 + ".muchtoolongsuffix"])
def test_file_store_refuses_bad_keys(tmp_path, key):
    with pytest.raises(ValueError):
        FileStore(tmp_path).path(key)


def test_file_store_concurrent_puts_of_one_blob(tmp_path):
    store, data = FileStore(tmp_path), b"same" * 10_000
    threads = [threading.Thread(target=store.put, args=(data,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [key] = {store.put(data)}
    assert store.read(key) == data
