"""How requests share one model: turns within a lane, and one LoRA adapter at a time on the shared layers.

The runtime has two lanes, text and images, that run side by side on the GPU (text on a high-priority stream):
decoding is bound by memory bandwidth and an image's steps by compute, so an image rendering next to other users'
replies loses far less than if they took turns (an H100 measurement is in bench/RESULTS.md, issue 8). Within a lane
requests take turns (:class:`TurnLock`). Both lanes run the same modules, and a LoRA adapter is switched on those
modules in place, so :class:`AdapterGate` lets any number of holders in at once only while they want the same
adapter (or none); one that wants another waits until they leave, first come, first served.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

__all__ = ["AdapterGate", "TurnLock"]

A = TypeVar("A")


class TurnLock:
    """A first-come, first-served lock: an image that asks again after every step queues behind the requests that
    arrived meanwhile (a plain Lock lets the releasing thread win again and starve them)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = self._serving = 0
        self._abandoned: set[int] = set()  # tickets whose waiter was interrupted: skipped when their turn comes

    @property
    def queued(self) -> int:
        """Requests holding or waiting for the lock."""
        return self._next - self._serving - len(self._abandoned)

    def __enter__(self) -> None:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            try:
                self._cond.wait_for(lambda: self._serving == ticket)
            except BaseException:
                self._abandoned.add(ticket)
                self._advance()  # a no-op unless it was already this ticket's turn
                raise

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._advance()

    def _advance(self) -> None:
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()


class AdapterGate(Generic[A]):
    """Holders share the layers' one active adapter; ``switch`` is called, alone, whenever it must change.

    ``switch(adapter)`` runs with no holder inside: when the first holder of a different adapter enters (None
    means the base model), and with None when the last holder of an adapter leaves, so the base model is what
    stays active between requests.
    """

    def __init__(self, switch: Callable[[A | None], None], key: Callable[[A], object] = id) -> None:
        self._switch, self._key = switch, key
        self._cond = threading.Condition()
        self._active: A | None = None
        self._holders = 0
        self._waiting: deque[object] = deque()  # one token per request, in arrival order

    def _same(self, adapter: A | None) -> bool:
        return (adapter is None and self._active is None) or (
            adapter is not None and self._active is not None and self._key(adapter) == self._key(self._active)
        )

    @contextmanager
    def holding(self, adapter: A | None) -> Iterator[None]:
        """Run a block with ``adapter`` active on the shared layers, beside holders of the same adapter."""
        token = object()
        with self._cond:
            self._waiting.append(token)
            try:
                self._cond.wait_for(lambda: self._waiting[0] is token and (self._holders == 0 or self._same(adapter)))
            except BaseException:
                self._waiting.remove(token)
                self._cond.notify_all()
                raise
            try:
                if not self._same(adapter):  # no holder is inside: the layers are free to change
                    try:
                        self._switch(adapter)
                    except BaseException:
                        self._switch(None)  # never leave the layers half switched
                        self._active = None
                        raise
                    self._active = adapter
            finally:
                self._waiting.popleft()
                self._cond.notify_all()  # the next in line may share this adapter
            self._holders += 1
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                if self._holders == 0 and self._active is not None:
                    self._switch(None)
                    self._active = None
                self._cond.notify_all()
