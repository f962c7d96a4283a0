"""Keeping a worker process to a few CPU cores (``settings.worker_cpus``).

A worker's threads share one interpreter lock and hand it over at every database call and Redis round trip. On
cores of their own the hand-over is a switch on the same core; spread over all cores it wakes a thread on another
core each time, which costs more than the statement (much more in a virtual machine, where that wake-up leaves the
guest). A GPU worker's own CPU work is that Python, so it loses nothing by keeping to one core; a worker that runs
the model on the CPU does, and should not be kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection

__all__ = ["CoresUnavailable", "keep_to_cpus"]

logger = logging.getLogger(__name__)


class CoresUnavailable(ValueError):
    """The configured cores cannot be used here; the message says why."""


def keep_to_cpus(cpus: Collection[int]) -> None:
    """Run this process's threads, and the threads and processes it starts from now on, on ``cpus`` only.

    Raises CoresUnavailable naming the cores this process may not use, or where the system cannot pin processes.
    """
    if not hasattr(os, "sched_setaffinity"):
        raise CoresUnavailable("UNICHAR_WORKER_CPUS needs Linux (this system cannot keep a process to chosen cores)")
    allowed = os.sched_getaffinity(0)
    missing = sorted(set(cpus) - allowed)
    if missing:
        raise CoresUnavailable(
            f"UNICHAR_WORKER_CPUS names cores {missing} that this worker may not use; it may use {sorted(allowed)}"
        )
    for thread in os.listdir("/proc/self/task"):  # each thread has its own mask; new ones copy their creator's
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.sched_setaffinity(int(thread), set(cpus))
    logger.info("the worker keeps to CPU cores %s", sorted(cpus))
