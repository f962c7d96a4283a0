"""Fixtures of the model tests: one tiny random model folder and one runtime on it for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from core.model.runtime import UniCharacterRuntime
from core.model.tiny import write_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def runtime(tiny_dir: Path) -> UniCharacterRuntime:
    return UniCharacterRuntime.load(tiny_dir, device="cpu")


@pytest.fixture(autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    """The tiny model's ops are too small to share: intra-op threads only contend (10x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
