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
keep_to_cpus([{core}])
seen = []
thread = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
thread.start(); thread.join()
child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                       capture_output=True, text=True, check=True).stdout.strip()
print(sorted(os.sched_getaffinity(0)), sorted(seen[0]), child)
"""


def test_the_worker_its_threads_and_its_children_keep_to_the_cores() -> None:
    core = max(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", _PINNED_CHILD.format(core=core)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [f"[{core}]"] * 3


def test_cores_this_process_may_not_use_are_refused_and_nothing_changes() -> None:
    before = os.sched_getaffinity(0)
    with pytest.raises(CoresUnavailable, match=r"may not use; it may use"):
        keep_to_cpus([max(before) + 1, max(before)])
    assert os.sched_getaffinity(0) == before
