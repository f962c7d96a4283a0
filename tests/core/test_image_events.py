"""The scene-picture events on a job's stream and the deployment's picture presets (issue 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import IMAGE_PRESETS, Settings
from core.imaging import image_params, sampler_params
from core.jobs import ImageFollows, ImageRefused, decode_event, encode_event


@pytest.mark.parametrize("event", [ImageFollows(42), ImageRefused("This chat has used its 100 pictures for today.")])
def test_picture_events_round_trip(event) -> None:
    assert decode_event(encode_event(event)) == event
    assert decode_event({k.encode(): v.encode() for k, v in encode_event(event).items()}) == event


def settings(**values) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_presets() -> None:
    assert settings().image_shape == IMAGE_PRESETS["preview"]  # the embedded tiny model: quick on a CPU
    assert settings(model_dir=Path("/models/bagel")).image_shape == (1024, 1024, 50)
    assert settings(model_dir=Path("/m"), image_preset="fast").image_shape == (512, 512, 20)
    assert settings(image_preset="custom", image_width=320, image_steps=8).image_shape == (320, 1024, 8)
    assert settings(image_width=128, image_height=128, image_steps=4).image_shape == (128, 128, 4)  # auto: as set


def test_stored_sampler_settings_win_over_the_preset() -> None:
    stored = sampler_params(settings(image_preset="fast"), seed=7) | {"cfg_text_scale": 5.0}
    params = image_params(stored, settings())  # the deployment's preset changed since: the job keeps its own
    assert (params.width, params.num_timesteps, params.seed, params.cfg_text_scale) == (512, 20, 7, 5.0)
    assert params.cfg_interval == (0.4, 1.0)
    assert image_params({}, settings()).seed > 0
