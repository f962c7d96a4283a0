"""`unichar chat` with scene pictures (issue 8): each image policy through the live worker path."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from bots.console import ConsoleFrontend
from core.db.models import Character
from tests.workers.test_inline_images import PLAN, ThinkingModel

pytestmark = pytest.mark.integration


def console(live: Any, tmp_path: Path, policy: str) -> ConsoleFrontend:
    with live.sessionmaker.begin() as session:
        session.add(Character(name="Alice", description="A cheerful sailor.", image_policy=policy))
    return ConsoleFrontend(
        service=live.service, redis=live.ctx.redis, installation=live.ctx.installation, store=live.ctx.store,
        image_dir=tmp_path / "images",
        out=io.StringIO(), idle_timeout_s=60,
    )


@pytest.mark.parametrize(
    ("policy", "line", "plan", "pictures"),
    [
        ("never", "send me a selfie please", PLAN, 0),
        ("on_request", "send me a selfie please", "", 1),
        ("on_request", "tell me about the sea", PLAN, 0),
        ("auto", "tell me about the sea", PLAN, 1),
        ("auto", "tell me about the sea", "<think>no picture</think>", 0),
    ],
)
def test_each_policy_in_the_console(live: Any, tmp_path: Path, policy: str, line: str, plan: str, pictures: int):
    live.use_model(ThinkingModel(plan=plan))
    frontend = console(live, tmp_path, policy)
    frontend.send(line)
    out = frontend.out.getvalue()  # type: ignore[attr-defined]
    assert "Alice: echo:" in out
    assert out.count("[image saved: ") == pictures, out
    assert len(list((tmp_path / "images").glob("*.png"))) == pictures


def test_a_refused_picture_is_said_in_the_console(live: Any, tmp_path: Path):
    frontend = console(live, tmp_path, "on_request")
    frontend.send("send me a naked selfie")
    out = frontend.out.getvalue()  # type: ignore[attr-defined]
    assert "Alice: echo:" in out and "[no picture: This deployment does not make adult images.]" in out
