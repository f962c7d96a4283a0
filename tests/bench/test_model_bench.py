"""bench.model_bench keeps running as the runtime changes: its text rows, the adapter's among them, on the tiny
model on the CPU (its figures are the GPU's; this only runs the code)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_text_rows_run_on_the_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "model_bench.json"
    argv = [sys.executable, "-m", "bench.model_bench", "--tiny", "--text-only", "--out", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    text = json.loads(out.read_text(encoding="utf-8"))["text"]
    assert {"rank-64 adapter, its graph (generate_text)", "rank-64 adapter, step by step"} <= set(text)
    assert all(row["new_tokens"] == 16 and row["decode_tok_s"] > 0 for row in text.values())
    assert "decode 16 tokens (rank-64 adapter, its graph (generate_text))" in run.stdout
