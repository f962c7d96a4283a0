"""Fixtures of the training tests: the tiny model written once per session, settings and stores per test."""

from __future__ import annotations

import pytest

from core.media import FileStore
from core.model.tiny import write_tiny_model
from core.submissions import Submissions
from tests.training.builders import ICHIHIME, make_db, make_settings


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def stack(tmp_path, tiny_model_dir):
    """Settings on the tiny model (CPU), a fresh SQLite store, the file store and the submission service."""
    settings = make_settings(tmp_path, model_dir=tiny_model_dir, device="cpu")
    store = FileStore(settings.files_dir)
    return settings, make_db(settings), store, Submissions(settings, store)


@pytest.fixture
def ichihime():
    if not (ICHIHIME / "annotation.json").is_file():
        pytest.skip("the RoleScape sample (../shared/rolescape) is absent")
    return ICHIHIME
