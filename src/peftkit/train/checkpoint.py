"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically.

A checkpoint is a folder ``checkpoint-<step>`` written to a temporary name and renamed into place; the file
``latest`` (also replaced atomically) names the newest complete one. A run killed mid-save leaves the previous
checkpoint and ``latest`` intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from peftkit.core.adapter_io import write_atomic_dir
from peftkit.errors import PeftkitError

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically, point ``latest`` at it, prune old ones."""
    folder = output_dir / f"checkpoint-{step}"
    tensors = {k: v.detach().contiguous() for k, v in trainable.items()}
    write_atomic_dir(
        folder,
        {
            "trainable.safetensors": lambda p: save_file(tensors, str(p)),
            "optimizer.pt": lambda p: torch.save(optimizer.state_dict(), p),
            "scheduler.pt": lambda p: torch.save(scheduler.state_dict(), p),
            "rng.pt": lambda p: torch.save(_rng_state(), p),
            "trainer_state.json": json.dumps({**state, "step": step}, indent=2),
        },
    )
    _write_text_atomic(output_dir / "latest", folder.name)
    old = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for stale in old[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = output_dir / "latest"
    if not pointer.is_file():
        return None
    folder = output_dir / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def load_checkpoint(
    folder: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore a checkpoint into live objects and return the trainer state (step, data position...)."""
    try:
        tensors = load_file(str(folder / "trainable.safetensors"))
        state = json.loads((folder / "trainer_state.json").read_text())
        optim_state = torch.load(folder / "optimizer.pt", weights_only=False)
        sched_state = torch.load(folder / "scheduler.pt", weights_only=False)
        rng = torch.load(folder / "rng.pt", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable piece means the checkpoint is unusable
        raise PeftkitError(f"checkpoint {folder} is unreadable: {e}") from None
    if set(tensors) != set(trainable):
        raise PeftkitError(f"checkpoint {folder} does not match this run's trainable parameters")
    with torch.no_grad():
        for name, value in tensors.items():
            trainable[name].copy_(value)
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(sched_state)
    _set_rng_state(rng)
    return state
