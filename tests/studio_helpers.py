"""A studio workspace for the tests: conftest's tiny Llama saved as a model folder, instruction data with a bad row,
and helpers to wait for runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from conftest import tiny_llama, tiny_tokenizer

ROWS = [{"instruction": f"Repeat {i % 7} twice", "output": f"{i % 7}{i % 7}"} for i in range(40)]
TINY_RUN = {"model": "tiny", "data": "data/train.jsonl", "precision": "fp32", "batch_size": 4, "lr": 3e-3,
            "max_length": 64, "packing": False, "warmup_ratio": 0.0}


def make_workspace(root: Path) -> Path:
    """``tiny/`` (a model folder), ``data/train.jsonl`` (40 rows) and ``data/bad.jsonl`` (one row without output)."""
    tiny_llama().save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    bad = [*ROWS[:3], {"instruction": "no answer here"}, ROWS[3]]
    (root / "data" / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    return root


def wait_for(get_status: Any, done: Any, timeout: float = 120.0, every: float = 0.3) -> dict[str, Any]:
    """Poll `get_status()` until `done(status)`; the last status (an AssertionError naming it on timeout)."""
    deadline = time.monotonic() + timeout
    status = get_status()
    while not done(status):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; last status: {status}")
        time.sleep(every)
        status = get_status()
    return status
