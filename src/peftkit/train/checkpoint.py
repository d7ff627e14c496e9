"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically.

Every file is safetensors or JSON (`peftkit.train.state_files`): loading a checkpoint never unpickles anything.

A checkpoint is a folder ``checkpoint-<step>`` written to a temporary name and renamed into place; the file
``latest`` (also replaced atomically) names the newest complete one. A run killed mid-save leaves the previous
checkpoint and ``latest`` intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from peftkit.core.adapter_io import current_umask, write_atomic_dir, writing
from peftkit.errors import PeftkitError
from peftkit.train.state_files import load_state, write_state

__all__ = ["Checkpoints", "RunFolder", "finished_run", "latest_checkpoint", "load_checkpoint", "rng_file", "rng_state",
           "save_checkpoint", "write_text_atomic"]

# what a training run writes into its output folder (`RunFolder` owns exactly these)
RUN_FILES = ("metrics.jsonl", "run.json", "loss.png", "latest", "adapter", "best", "best.json", "demo_results.json",
             "logs", "wandb", "mlruns")  # logs, wandb, mlruns: the trackers' (`peftkit.train.tracking`)
# left by a write that was killed (removed at start)
TEMP_GLOBS = (".checkpoint-*", ".latest.*", ".adapter.*", ".best.*")
LOCK = ".peftkit.lock"


class RunFolder:
    """One run owns its output folder: a folder holding another run is refused unless the run resumes it or
    overwrites it, and an advisory lock (``fcntl.flock`` on ``.peftkit.lock``) refuses a second live run.

    Args:
        path: the output folder (created if missing).
        resume: continue the run in it (an error if it has no checkpoint).
        overwrite: remove the run files in it first (other files are left alone).
    """

    def __init__(self, path: Path, resume: bool = False, overwrite: bool = False) -> None:
        import fcntl

        if resume and overwrite:
            raise PeftkitError("--resume and --overwrite contradict each other: choose one")
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._lock = open(path / LOCK, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            owner = self._lock.read().strip() or "another process"
            self._lock.close()
            raise PeftkitError(f"{path} is in use by another peftkit run ({owner}); wait for it to finish or choose "
                               "another output_dir") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}")
        self._lock.flush()
        for pattern in TEMP_GLOBS:
            for stale in path.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        found = self.run_files()
        checkpoint, finished = latest_checkpoint(path), (path / "adapter").is_dir()
        if resume and checkpoint is None:
            if finished:
                self.release()
                raise PeftkitError(f"--resume: {path} holds a finished run without checkpoints: nothing to resume "
                                   "(to train it again, use --overwrite or another output_dir)")
            if found:  # stopped before its first checkpoint: the same run again, from the start
                print(f"peftkit: {path} has no checkpoint yet (the run stopped before its first): starting it again "
                      "from step 0", file=sys.stderr)
            overwrite = True
        if found and (overwrite or not resume):
            if not overwrite:
                self.release()
                shown = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
                what = "use --resume to continue it" if checkpoint is not None or finished else (
                    "it stopped before its first checkpoint: --resume starts it again from step 0")
                raise PeftkitError(f"{path} already holds a run ({shown}); {what}, --overwrite to replace it, or "
                                   "another output_dir")
            for p in found:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def run_files(self) -> list[Path]:
        names = [self.path / n for n in RUN_FILES if (self.path / n).exists()]
        return names + sorted(self.path.glob("checkpoint-*"))

    def release(self) -> None:
        if not self._lock.closed:
            self._lock.close()  # closing the file drops the lock


def rng_state() -> dict[str, Any]:
    """This process's random generators (Python, NumPy, torch CPU, and the current CUDA device's when one is in
    use) as JSON (no pickle: a checkpoint file never runs code when loaded)."""
    version, internal, gauss = random.getstate()
    # the legacy global generator is MT19937, whose legacy state is this tuple (numpy's stub says it may be a dict)
    legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
    name, keys, pos, has_gauss, cached = legacy
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()  # dropout on the GPU draws from this one
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def rng_file(rank: int) -> str:
    """The RNG state file of process `rank` in a checkpoint (``rng.json`` for rank 0 and single-process runs)."""
    return "rng.json" if rank == 0 else f"rng-rank{rank}.json"


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step (a temporary file renamed over it; removed if the write fails)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with writing(path), os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    output_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any],
    scheduler: Any,
    state: dict[str, Any],
    keep: int = 2,
    rng: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically, point ``latest`` at it, prune old ones.

    `optimizer` is the optimizer, or its state dict already taken (a sharded run's, gathered by every rank).
    `rng` holds every process's `rng_state` by rank (default: this process's alone); each goes to its own
    `rng_file`, so that a distributed run resumes with every rank's dropout exactly where it was.

    A full disk is a `PeftkitError` naming the file ("no space left on device while writing ..."); the previous
    checkpoints and ``latest`` are then left as they were, and no temporary file remains.
    """
    folder = output_dir / f"checkpoint-{step}"
    tensors = {k: v.detach().contiguous() for k, v in trainable.items()}
    write_atomic_dir(
        folder,
        {
            "trainable.safetensors": lambda p: save_file(tensors, str(p)),
            **write_state(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), "optimizer"),
            **write_state(scheduler.state_dict(), "scheduler"),
            **{rng_file(rank): json.dumps(r) for rank, r in enumerate(rng or [rng_state()])},
            "trainer_state.json": json.dumps({**state, "step": step}, indent=2),
        },
    )
    try:
        write_text_atomic(output_dir / "latest", folder.name)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # `latest` still names the previous one: this one is not a state
        raise
    old = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for stale in old[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def finished_run(output_dir: Path, total_steps: int) -> str | None:
    """The line a resume of a finished run prints instead of training (None when there is training left): the
    adapter is saved and the newest checkpoint, if any, is at `total_steps` or past it."""
    if not (output_dir / "adapter").is_dir():
        return None
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        return f"{output_dir} holds a finished run (adapter/, no checkpoints): nothing to do"
    try:
        step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the resume itself says what is wrong with the checkpoint
    if not isinstance(step, int) or step < total_steps:
        return None
    return f"{output_dir} holds a finished run (step {step} of {total_steps}, adapter/): nothing to do"


def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = output_dir / "latest"
    if not pointer.is_file():
        return None
    folder = output_dir / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def load_checkpoint(
    folder: Path, trainable: dict[str, torch.nn.Parameter], optimizer: Any, scheduler: Any,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore a checkpoint into live objects (and process `rank`'s random generators); return the trainer state
    (step, data position...)."""
    if not (folder / rng_file(rank)).is_file() and (folder / "trainer_state.json").is_file():
        raise PeftkitError(f"checkpoint {folder} has no random generator state for rank {rank} ({rng_file(rank)}): "
                           "it was written by fewer processes; resume with as many processes as the run had")
    optim_state, sched_state = load_state(folder, "optimizer"), load_state(folder, "scheduler")
    try:
        tensors = load_file(str(folder / "trainable.safetensors"))
        state = json.loads((folder / "trainer_state.json").read_text())
        rng = json.loads((folder / rng_file(rank)).read_text())
    except Exception as e:  # noqa: BLE001 - any unreadable piece means the checkpoint is unusable
        raise PeftkitError(f"checkpoint {folder} is unreadable: {str(e).splitlines()[0]}") from None
    if set(tensors) != set(trainable):
        raise PeftkitError(f"checkpoint {folder} does not match this run's trainable parameters")
    with torch.no_grad():
        for name, value in tensors.items():
            trainable[name].copy_(value)
    try:
        optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict(sched_state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise PeftkitError(f"checkpoint {folder}: its optimizer or scheduler state does not fit this run "
                           f"({str(e).splitlines()[0]}); start a new run (--overwrite or another output_dir)") from None
    _set_rng_state(rng)
    return state


class Checkpoints:
    """The checkpoints of one training run: save its state every `save_every` steps, restore it on resume.

    Args:
        output_dir: the run's folder.
        keep: checkpoints kept (older ones are pruned).
        world, rank: processes in the run and this one's index; every rank's generators are saved, rank 0 writes.
        reshardable: the checkpoint may be resumed on another number of processes (a sharded run's): a rank the
            writing run did not have starts from rank 0's generators.
    """

    def __init__(self, output_dir: Path, keep: int, world: int = 1, rank: int = 0, reshardable: bool = False) -> None:
        self.output_dir, self.keep, self.world, self.rank = output_dir, keep, world, rank
        self.reshardable = reshardable

    def latest(self) -> Path | None:
        return latest_checkpoint(self.output_dir)

    def save(self, step: int, weights: dict[str, torch.Tensor], optimizer: Any, scheduler: Any,
             position: dict[str, Any], scaler: torch.amp.GradScaler | None = None) -> None:
        """Trainable weights, optimizer, scheduler, every rank's RNG and the data `position` (epoch, micro-batch,
        history...); called on every rank (the generators are gathered), written by rank 0."""
        from accelerate.utils import gather_object

        # every rank's generators (dropout draws differ with each rank's batch shapes), gathered to rank 0
        rng = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        # a sharded run's optimizer state is gathered by every rank (`peftkit.train.sharding.ShardedOptimizer`)
        optimizer_state = optimizer.state_dict() if getattr(optimizer, "collective", False) else optimizer
        if self.rank != 0:
            return
        position = {**position, "rank": self.rank, "world": self.world}
        if scaler is not None and scaler.is_enabled():
            position["grad_scaler"] = scaler.state_dict()
        save_checkpoint(self.output_dir, step, weights, optimizer_state, scheduler, position, self.keep, rng)

    def restore(self, folder: Path, trainable: dict[str, torch.nn.Parameter], optimizer: Any,
                scheduler: Any, lr: float, scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
        """Load `folder` into the live objects; the saved position. The restored schedule keeps its step; the
        learning rate `lr` and the schedule's shape come from the resuming run's config."""
        rank = self.rank
        if self.reshardable and not (folder / rng_file(rank)).is_file():
            rank = 0  # resumed on more processes than wrote it: dropout masks then differ from an unbroken run
        saved = load_checkpoint(folder, trainable, optimizer, scheduler, rank)
        scheduler.base_lrs = [lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups]  # LoRA+'s B groups
        groups = optimizer.param_groups
        for group, base, value in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["initial_lr"], group["lr"] = base, base * value(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        if scaler is not None and "grad_scaler" in saved:
            scaler.load_state_dict(saved["grad_scaler"])
        return saved
