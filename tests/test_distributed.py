"""Two processes on CPU (gloo, torchrun): identical adapters, rank-0-only checkpoints, sharded data, same loss."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import write_data

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, data: str, out: Path, batch_size: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(WORKER), data, str(out), str(batch_size)]
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), data, str(out), str(batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_two_process_ddp_matches_single_process(tmp_path):
    data = write_data(tmp_path / "d.jsonl", n=40)
    ranks = launch(2, data, tmp_path / "ddp", batch_size=2)
    single = launch(1, data, tmp_path / "single", batch_size=4)[0]
    assert [r["world"] for r in ranks] == [2, 2]
    # adapters identical across ranks
    assert ranks[0]["digest"] == ranks[1]["digest"]
    # data sharded without duplicates, and together the ranks saw exactly what one process saw
    assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"])
    assert sorted(ranks[0]["rows"] + ranks[1]["rows"]) == sorted(single["rows"])
    # same loss curve and weights as one process with the same global batch
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for name, values in single["weights"].items():
        assert ranks[0]["weights"][name] == pytest.approx(values, rel=1e-4, abs=1e-6)
    # only rank 0 wrote checkpoints: one set of files, complete
    ckpts = sorted(p.name for p in (tmp_path / "ddp").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    for ckpt in ckpts:
        assert json.loads((tmp_path / "ddp" / ckpt / "trainer_state.json").read_text())["rank"] == 0
    assert not list((tmp_path / "ddp").glob(".*tmp-*"))
