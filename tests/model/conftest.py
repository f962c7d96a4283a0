"""Fixtures of the model tests: one tiny random model folder and one runtime on it for the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.model.runtime import UniCharacterRuntime
from core.model.tiny import write_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def runtime(tiny_dir: Path) -> UniCharacterRuntime:
    return UniCharacterRuntime.load(tiny_dir, device="cpu")
