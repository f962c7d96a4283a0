"""Two lanes on one model: requests of the same adapter overlap, another adapter waits its turn, in order."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from core.model import lora
from core.model.api import TextParams, TextSegment
from core.model.runtime import UniCharacterRuntime
from core.model.scheduling import AdapterGate
from tests.model.adapters import write_random_adapter

GUARD_S = 60  # not a timing assertion: only stops a broken gate from hanging the suite


class Adapter:
    def __init__(self, name: str) -> None:
        self.id = name


def _gate() -> tuple[AdapterGate[Adapter], list[str | None]]:
    switches: list[str | None] = []
    return AdapterGate(lambda a: switches.append(None if a is None else a.id), key=lambda a: a.id), switches


def _enter_in_thread(gate: AdapterGate[Adapter], adapter: Adapter | None, log: list[str], name: str,
                     release: threading.Event) -> threading.Thread:
    def run() -> None:
        with gate.holding(adapter):
            log.append(name)
            release.wait(GUARD_S)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_holders_of_the_same_adapter_share_the_layers() -> None:
    gate, switches = _gate()
    a = Adapter("a")
    with gate.holding(a):
        with gate.holding(Adapter("a")):  # another request of the same character: no wait, no switch
            assert switches == ["a"]
    assert switches == ["a", None]  # the base model stays active between requests


def test_another_adapter_waits_until_the_holders_leave_and_later_arrivals_queue_behind_it() -> None:
    gate, switches = _gate()
    log: list[str] = []
    release_first, release_rest = threading.Event(), threading.Event()
    first = _enter_in_thread(gate, Adapter("a"), log, "a1", release_first)
    _until(lambda: log == ["a1"], "the first holder did not enter")
    other = _enter_in_thread(gate, Adapter("b"), log, "b", release_rest)
    time.sleep(0.05)
    late = _enter_in_thread(gate, Adapter("a"), log, "a2", release_rest)  # same as the holder, but behind "b"
    time.sleep(0.05)
    assert log == ["a1"]  # "b" waits for a1; a2 may not overtake "b" (no starvation)
    release_first.set()
    _until(lambda: log == ["a1", "b"], "b did not get the layers after a1 left")
    time.sleep(0.05)
    assert log == ["a1", "b"]  # a2 waits for b
    release_rest.set()
    for thread in (first, other, late):
        thread.join(GUARD_S)
    assert log == ["a1", "b", "a2"]
    assert switches == ["a", None, "b", None, "a", None]


def test_a_failed_switch_leaves_the_base_model_and_lets_others_in() -> None:
    switches: list[str | None] = []

    def switch(adapter: Adapter | None) -> None:
        if adapter is not None and adapter.id == "broken":
            raise lora.AdapterError("broken adapter")
        switches.append(None if adapter is None else adapter.id)

    gate: AdapterGate[Adapter] = AdapterGate(switch, key=lambda a: a.id)
    with pytest.raises(lora.AdapterError), gate.holding(Adapter("broken")):
        pass
    with gate.holding(Adapter("ok")):
        pass
    assert switches == [None, "ok", None]


def test_a_text_reply_runs_while_the_image_lane_holds_the_model(runtime: UniCharacterRuntime, tiny_dir: Path,
                                                                 tmp_path: Path) -> None:
    text, params = [TextSegment("User Input: hi")], TextParams(max_new_tokens=4, temperature=0.0)
    alone = runtime.generate_text(text, params)
    replies: list[str] = []

    def reply() -> None:
        replies.append(runtime.generate_text(text, params))

    with runtime._image_turn(None):  # an image step in progress on the base model
        thread = threading.Thread(target=reply, daemon=True)
        thread.start()
        thread.join(GUARD_S)
        assert replies == [alone]  # answered beside the step, not after it

    character = runtime._adapter(write_random_adapter(runtime, tiny_dir, tmp_path / "char.safetensors", seed=1))
    with runtime._image_turn(character):  # a step with a character's adapter: base-model text must wait for it
        thread = threading.Thread(target=reply, daemon=True)
        thread.start()
        time.sleep(0.2)
        assert len(replies) == 1 and lora.active_adapter(runtime.model) == character.id
    thread.join(GUARD_S)
    assert replies == [alone, alone] and lora.active_adapter(runtime.model) is None
