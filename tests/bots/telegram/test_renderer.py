"""Unit tests of the Telegram renderer's pieces: photo fitting and the translation of Telegram's errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from telegram.error import BadRequest, Forbidden, RetryAfter

from bots.delivery import MessageGone, RecipientGone
from bots.render import RetryLater
from bots.telegram.renderer import fit_photo, image_buttons, telegram_errors


def noisy_png(size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_small_photo_is_sent_as_is() -> None:
    data = noisy_png((64, 64))
    assert fit_photo(data) is data


def test_photo_over_the_limit_is_recompressed_under_it() -> None:
    data = noisy_png((512, 512))  # about 790 KB of incompressible noise
    fitted = fit_photo(data, max_bytes=100_000)
    assert len(fitted) <= 100_000
    with Image.open(io.BytesIO(fitted)) as image:
        assert image.format == "JPEG"


def test_photo_too_wide_for_telegram_is_shrunk() -> None:
    out = io.BytesIO()
    Image.new("RGB", (12_000, 50), "white").save(out, format="PNG")
    with Image.open(io.BytesIO(fit_photo(out.getvalue()))) as image:
        assert image.width + image.height <= 10_000


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RetryAfter(3), RetryLater),
        (Forbidden("Forbidden: bot was blocked by the user"), RecipientGone),
        (BadRequest("Chat not found"), RecipientGone),
        (BadRequest("Message to edit not found"), MessageGone),
    ],
)
def test_telegram_errors_become_delivery_errors(error: Exception, expected: type[Exception]) -> None:
    with pytest.raises(expected), telegram_errors():
        raise error


def test_not_modified_is_not_an_error_and_other_bad_requests_stay() -> None:
    with telegram_errors():
        raise BadRequest("Message is not modified: specified new message content is the same")
    with pytest.raises(BadRequest), telegram_errors():
        raise BadRequest("Can't parse entities")


def test_retry_after_keeps_its_seconds() -> None:
    with pytest.raises(RetryLater) as caught, telegram_errors():
        raise RetryAfter(7)
    assert caught.value.retry_after == 7


def test_image_buttons_fit_telegrams_callback_data() -> None:
    markup = image_buttons(2**62)
    for row in markup.inline_keyboard:
        for button in row:
            assert len(button.callback_data.encode()) <= 64
