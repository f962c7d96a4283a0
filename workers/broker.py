"""The Redis broker transport: one publishing client per channel, and the acknowledgement bookkeeping in scripts.

kombu's Redis channel builds a new ``redis.Redis`` object for every publish and acknowledgement; building one
costs more CPU than sending the command (about 0.3 ms: it fills a table of some 170 response callbacks). The
object only borrows connections from the channel's pool and is thread-safe, so one per channel does the same
work.

With late acks kombu records each delivered message in two keys (the unacked hash and its time index, from which
``restore_visible`` hands a message out again after the visibility timeout) and removes it on ack, each time in a
MULTI/EXEC pipeline. :class:`QoS` does the same writes to the same keys as one atomic script call, which costs
the worker less; delivery, restoring and the visibility timeout stay kombu's.
"""

from __future__ import annotations

from time import time
from typing import Any, Final

from kombu.transport import redis, virtual
from kombu.utils.json import dumps

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
    """kombu's acknowledgement emulation, each step one script call (a key prefix keeps kombu's own path)."""

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.global_keyprefix:
            return super().append(message, delivery_tag)
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.channel.conn_or_acquire() as client:
            run_script(client, _APPEND, [self.unacked_index_key, self.unacked_key], [delivery_tag, time(), record])
        virtual.QoS.append(self, message, delivery_tag)
        return None

    def ack(self, delivery_tag: str) -> None:
        if self.channel.global_keyprefix:
            return super().ack(delivery_tag)
        with self.channel.conn_or_acquire() as client:
            run_script(client, _REMOVE, [self.unacked_index_key, self.unacked_key], [delivery_tag])
        virtual.QoS.ack(self, delivery_tag)
        return None


class Channel(redis.Channel):
    """A Redis channel that reuses its synchronous client and keeps its acknowledgements in scripts."""

    QoS = QoS

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
