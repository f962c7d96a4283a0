"""On a GPU, decoding replays a CUDA graph per LoRA adapter: the same replies as eager decoding, in any order.

Skipped without CUDA (CI's machine). On the GPU machine: carry the wheels of pydantic-settings, SQLAlchemy and redis
(the root conftest imports them) and run ``python3 -m pytest tests/model/test_decode_graphs.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from core.model.api import TextParams, TextSegment
from core.model.decode import GRAPHS_KEPT
from core.model.runtime import UniCharacterRuntime
from tests.model.adapters import write_random_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

CONTEXT = [TextSegment("Character Description: a sailor."), TextSegment("User Input: tell me about the sea")]
GREEDY = TextParams(max_new_tokens=24, temperature=0.0)


def test_each_adapter_decodes_through_its_own_graph_as_eagerly(tiny_dir: Path, tmp_path: Path) -> None:
    runtime = UniCharacterRuntime.load(tiny_dir, device="cuda")
    paths: dict[str, str | None] = {
        name: write_random_adapter(runtime, tiny_dir, tmp_path / f"{name}.safetensors", seed)
        for seed, name in enumerate("ABC", start=1)
    }
    paths["base"] = None

    def reply(name: str) -> str:
        return runtime.generate_text(CONTEXT, GREEDY, adapter=paths[name])

    runtime._decoder.use_graphs = False
    eager = {name: reply(name) for name in paths}
    runtime._decoder.use_graphs = True
    assert len(set(eager.values())) == len(paths)  # every adapter changes the reply

    for name in ["base", "A", "B", "base", "A", "C", "B", "A", "base", "C"]:
        assert reply(name) == eager[name], name
        assert len(runtime._decoder._graphs) <= GRAPHS_KEPT

    old = runtime._adapters[paths["A"]]
    stat = os.stat(paths["A"])
    os.utime(paths["A"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a replaced file: loaded again
    assert reply("A") == eager["A"]
    new = runtime._adapters[paths["A"]]
    assert new is not old and runtime._decoder._graphs[new.id].adapter is new  # its new tensors, its own graph
