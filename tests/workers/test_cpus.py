"""Keeping a worker to chosen cores: the process and what it starts afterwards run there only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers.cpus import CoresUnavailable, keep_to_cpus

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux")

_PINNED_CHILD = """
import os, subprocess, sys, threading
from workers.cpus import keep_to_cpus
seen, go = [], threading.Event()
older = threading.Thread(target=lambda: (go.wait(), seen.append(os.sched_getaffinity(0))))
older.start()  # a thread of the process before it is kept
keep_to_cpus([{core}])
go.set(); older.join()
newer = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
newer.start(); newer.join()
child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                       capture_output=True, text=True, check=True).stdout.strip()
print(sorted(os.sched_getaffinity(0)), sorted(seen[0]), sorted(seen[1]), child)
"""


def test_the_worker_its_threads_and_its_children_keep_to_the_cores() -> None:
    core = max(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", _PINNED_CHILD.format(core=core)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [f"[{core}]"] * 4  # the main thread, a thread older than the call, a newer one, a child process


def test_cores_this_process_may_not_use_are_refused_and_nothing_changes() -> None:
    before = os.sched_getaffinity(0)
    with pytest.raises(CoresUnavailable, match=r"may not use; it may use"):
        keep_to_cpus([max(before) + 1, max(before)])
    assert os.sched_getaffinity(0) == before
