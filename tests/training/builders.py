"""Test builders shared by the submission and training tests: settings, SQL sessions, images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.db.models import Base
from core.db.session import make_engine, make_sessionmaker

ROLESCAPE = Path(__file__).resolve().parents[2] / ".." / "shared" / "rolescape"
ICHIHIME = ROLESCAPE / "train" / "Mahjong Soul-Ichihime"


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings on a temporary data folder with one admin on each test platform."""
    values: dict[str, object] = {"data_dir": tmp_path, "admin_ids": ["test:admin", "telegram:99"]}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def make_db(settings: Settings) -> sessionmaker[Session]:
    """A fresh SQLite store with the schema built from the models."""
    engine = make_engine(settings.sql_url)
    Base.metadata.create_all(engine)
    return make_sessionmaker(engine)


def noise_png(seed: int, size: int = 64) -> bytes:
    """A random-looking PNG; different seeds give images far apart in perceptual hash."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
