"""Run by tests/test_sharding.py (under torchrun, or alone as one process): train the tiny Llama as a plan says.

``sharding_worker.py PLAN.json``: the plan is a list of jobs ``{"name", "config": {...TrainConfig keys},
"until_step": int | null, "resume": bool, "from_folder": bool, "on_rank": {"<rank>": {...keys of that rank}},
"slow_load": seconds}`` (``from_folder``: the trainer loads ``config["model"]`` itself; ``slow_load``: each load of
weights takes that much longer); each trains into ``<output_dir>`` and writes
``<output_dir>/rank<r>.json`` (the world, the per-step losses, the bytes of packed 4-bit weights held, the bytes of
the model's original whole parameters still alive once the trainer is built, what the folder held before).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama, tiny_tokenizer  # noqa: E402

from peftkit.train import TrainConfig, Trainer  # noqa: E402


def kill_while_saving(step: int) -> None:
    """This process dies by SIGKILL halfway through writing ``checkpoint-<step>``'s weights (rank 0 writes them)."""
    import signal

    from peftkit.train import checkpoint

    write = checkpoint.save_file

    def torn(tensors: dict, path: str) -> None:
        write(tensors, path)
        if f"checkpoint-{step}" in path:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_file = torn


def run(job: dict) -> None:
    rank = int(os.environ.get("RANK", 0))
    cfg = TrainConfig.from_dict({**job["config"], **job.get("on_rank", {}).get(str(rank), {})})
    if job.get("kill_saving") and rank == 0:
        kill_while_saving(job["kill_saving"])
    os.environ["SLOW_LOAD"] = str(job.get("slow_load", 0))
    found = found_in(Path(cfg.output_dir))  # before the trainer clears stale temporary folders
    first_load = len(LOADS)
    model = None if job.get("from_folder") else tiny_llama()  # from_folder: the trainer loads ``model`` itself
    whole = [weakref.ref(p) for p in model.parameters()] if model is not None else []
    trainer = Trainer(cfg, model=model, tokenizer=None if model is None else tiny_tokenizer(),
                      resume=job.get("resume", False))
    del model
    gc.collect()
    alive = [r() for r in whole]
    whole_bytes = sum(p.numel() * p.element_size() for p in alive if p is not None and not hasattr(p, "to_local"))
    del alive
    held: dict[str, int] = {}
    trainer.subscribe(lambda event: held.setdefault("optimizer", optimizer_bytes()) if event.step == 1 else None)
    trainer.run(until_step=job.get("until_step"))
    Path(cfg.output_dir, f"rank{rank}.json").write_text(json.dumps({
        "world": trainer.world, "losses": [h["loss"] for h in trainer.history],
        "sharded": trainer.sharded, "packed_bytes": packed_bytes(trainer.model), "whole_bytes": whole_bytes,
        "found": found, "optimizer_bytes": held.get("optimizer", 0), "loads": LOADS[first_load:],
        "fingerprint": trainer.context.fingerprint,
    }))


LOADS: list[bool] = []
"""The `weights` argument of every `peftkit.models.load_model` call of this process (`record_loads`)."""


def record_loads() -> None:
    from peftkit import models

    load = models.load_model

    def recorded(*args, **kw):
        LOADS.append(kw.get("weights", True))
        if kw.get("weights", True):
            time.sleep(float(os.environ.get("SLOW_LOAD", "0")))  # a large model's reading, for the others to wait
        return load(*args, **kw)

    models.load_model = recorded


def optimizer_bytes() -> int:
    """Bytes of optimizer state this process holds (its shards' when sharded): the live optimizer's tensors, step
    counters left out."""
    optimizers = [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)]
    tensors = [t for o in optimizers for st in o.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    # each storage once: Accelerate's optimizer wrapper (DDP runs) shows the same state as the optimizer it wraps
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in local}.values())


def found_in(folder: Path) -> dict:
    """What a run folder held: the checkpoint ``latest`` names, the checkpoints, whether a temporary folder (a torn
    write) remains."""
    if not folder.is_dir():
        return {}
    latest = folder / "latest"
    return {"latest": latest.read_text().strip() if latest.is_file() else None,
            "checkpoints": sorted(p.name for p in folder.glob("checkpoint-*")),
            "torn": any(".tmp-" in p.name for p in folder.iterdir())}


def packed_bytes(model: torch.nn.Module) -> int:
    """Bytes of 4-bit codes and 8-bit absmax this process holds (its shards when sharded)."""
    tensors = [*model.parameters(), *model.buffers()]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() for t in local if t.dtype == torch.uint8)


if __name__ == "__main__":
    torch.set_num_threads(1)
    record_loads()
    for job in json.loads(Path(sys.argv[1]).read_text()):
        run(job)
