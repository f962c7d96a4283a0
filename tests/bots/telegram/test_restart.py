"""End to end: a bot restarted mid-reply finishes it in the same message, and never posts a reply twice."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from core.jobs import JobState
from core.model.api import OnText, Segment, TextParams
from tests.bots.telegram.conftest import ANN, fake_api, jobs, run, running_bot
from tests.conftest import Live
from tests.doubles import EchoModel

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


class PausingModel(EchoModel):
    """Streams the first half of its echo, then waits for ``resume`` before the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = threading.Event()
        self.halfway = threading.Event()

    def generate_text(
        self, context: Sequence[Segment], params: TextParams, on_text: OnText | None = None, adapter: str | None = None
    ) -> str:
        reply = self.reply_to(context)
        half = len(reply) // 2
        if on_text is not None:
            on_text(reply[:half])
        self.halfway.set()
        self.resume.wait(timeout=60)
        if on_text is not None:
            on_text(reply[half:])
        return reply


def test_restart_mid_reply_finishes_the_same_message_once(tg: Live) -> None:
    model = PausingModel()
    tg.use_model(model)
    said = "tell me about the tournament yesterday"

    async def body() -> None:
        async with fake_api() as fake:
            async with running_bot(tg, fake):
                await fake.send(ANN, ANN, said)
                partial = await fake.wait_for(lambda: next(iter(fake.bot_messages(ANN)), None))
                assert "echo:" in partial.text and said not in partial.text
            # The bot is down; the worker finishes the job meanwhile.
            model.resume.set()
            await fake.wait_for(lambda: jobs(tg)[0].state is JobState.DONE)
            assert jobs(tg)[0].delivered_at is None
            async with running_bot(tg, fake):
                await fake.wait_for(lambda: jobs(tg)[0].delivered_at is not None)
            assert [m.text for m in fake.bot_messages(ANN)] == [f"echo: {said}"]
            assert fake.bot_messages(ANN)[0].message_id == partial.message_id  # edited, not posted again
            sends = len(fake.called("sendMessage"))
            async with running_bot(tg, fake):  # a third start finds nothing left to do
                await fake.send(ANN, ANN, "/help")
                await fake.wait_for(lambda: len(fake.called("sendMessage")) == sends + 1)
            assert len(fake.bot_messages(ANN)) == 2

    run(body)

