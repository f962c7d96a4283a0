"""The Redis broker transport: one publishing client per channel, acknowledgement bookkeeping in scripts, and
thread slots kept free for replies.

kombu's Redis channel builds a new ``redis.Redis`` object for every publish and acknowledgement; building one
costs more CPU than sending the command (about 0.3 ms: it fills a table of some 170 response callbacks). The
object only borrows connections from the channel's pool and is thread-safe, so one per channel does the same
work.

With late acks kombu records each delivered message in two keys (the unacked hash and its time index, from which
``restore_visible`` hands a message out again after the visibility timeout) and removes it on ack, each time in a
MULTI/EXEC pipeline. :class:`QoS` does the same writes to the same keys as one atomic script call, which costs
the worker less; delivery, restoring and the visibility timeout stay kombu's. The keys carry the channel's
``global_keyprefix`` (the database's, ``workers.celery_app.use_installation``), written out here: kombu's
prefixing client would prefix only a script's first key.

A GPU worker's threads serve the chat and image queues together, one message per thread (prefetch 1), and a
picture holds its thread for as long as it renders. Enough pictures at once would hold every thread, and a reply
would wait in Redis behind them. The transport option ``leave_free`` (queue name -> slots) stops that: while the
channel consumes other queues too, a queue that holds all the prefetch slots but ``leave_free`` of them is left out
of the next BRPOP, so those slots only ever take the other queues' messages (replies) until one of its own is done.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from time import time
from typing import Any, Final

from kombu.transport import redis, virtual
from kombu.utils.json import dumps
from redis import Redis

from core.streams import run_script

__all__ = ["Channel", "QoS", "Transport"]

_APPEND: Final = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
"""
_REMOVE: Final = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
"""


class QoS(redis.QoS):
    """kombu's acknowledgement emulation, each step one script call."""

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        self.channel.run_script(_APPEND, [self.unacked_index_key, self.unacked_key], [delivery_tag, time(), record])
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        self.channel.run_script(_REMOVE, [self.unacked_index_key, self.unacked_key], [delivery_tag])
        virtual.QoS.ack(self, delivery_tag)


class _WithoutFull:
    """A channel's queue cycle that leaves out the queues ``full()`` names (their place in the cycle is kept)."""

    def __init__(self, cycle: Any, full: Callable[[], frozenset[str]]) -> None:
        self._cycle, self._full = cycle, full

    def consume(self, n: int) -> list[str]:
        full = self._full()
        return [queue for queue in self._cycle.consume(n) if queue not in full]

    def __getattr__(self, name: str) -> Any:  # update, rotate: the cycle's own
        return getattr(self._cycle, name)


class Channel(redis.Channel):
    """A Redis channel that reuses its synchronous client, keeps its acknowledgements in scripts, and leaves a
    queue out of its reads while that queue holds all the slots ``leave_free`` lets it have."""

    QoS = QoS
    leave_free: Mapping[str, int] = {}  # queue -> prefetch slots it leaves to the channel's other queues
    from_transport_options = (*redis.Channel.from_transport_options, "leave_free")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue_cycle = _WithoutFull(self._queue_cycle, self._full_queues)

    def _full_queues(self) -> frozenset[str]:
        """Queues holding every slot they may while other queues are consumed too: the next BRPOP skips them."""
        limited = {queue: free for queue, free in self.leave_free.items() if queue in self.active_queues}
        slots = self.qos.prefetch_count or 0
        if not limited or not slots or not self.active_queues - limited.keys():
            return frozenset()
        qos = self.qos  # delivered and not yet acknowledged (kombu's own record), by queue
        held = Counter(m.delivery_info.get("routing_key") for tag, m in qos._delivered.items() if tag not in qos._dirty)
        return frozenset(queue for queue, free in limited.items() if held[queue] >= max(1, slots - free))

    def run_script(self, source: str, keys: list[str], args: list[object]) -> Any:
        """Run the Lua ``source`` on ``keys`` under this channel's key prefix, with a client that adds none."""
        client = self.__dict__.get("_unichar_scripts")
        if client is None:
            client = self.__dict__["_unichar_scripts"] = Redis(connection_pool=self.pool)
        return run_script(client, source, [self.global_keyprefix + key for key in keys], args)

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # kombu caches those itself
            return super()._create_client(asynchronous=True)
        client = self.__dict__.get("_unichar_client")
        if client is None:
            client = self.__dict__["_unichar_client"] = super()._create_client()
        return client


class Transport(redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
