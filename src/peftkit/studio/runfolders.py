"""Runs as folders: a run the studio launches is an ordinary ``peftkit train`` process over a recipe written into its
output folder, so the CLI can resume it; a run the CLI started in the workspace is listed alike.

Everything the studio knows about a run it reads back from the run's folder (``recipe.yaml``, ``metrics.jsonl``,
``latest``, ``adapter/``, the lock's pid, ``train.log``): a studio restart loses nothing. Runs keep training when the
studio stops (they run in their own session).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import PeftkitError
from peftkit.studio.workspace import StudioError, Workspace
from peftkit.train.checkpoint import LOCK, RUN_FILES, latest_checkpoint, write_text_atomic
from peftkit.train.config import RECIPE_RELATIVE, TrainConfig

__all__ = ["LOG", "RECIPE", "Runs"]

RECIPE = "recipe.yaml"
LOG = "train.log"  # the process's stdout and stderr (the studio's runs only)
_MARKERS = (RECIPE, "metrics.jsonl", "run.json", "latest", "adapter")
_SKIP = {"adapter", "best", "logs", "wandb", "mlruns", "__pycache__", "node_modules"}
_ERROR = re.compile(r"^peftkit[\w ]*: error: ")
_STEPS = re.compile(r"(\d+) rows, (\d+) steps")


def _is_run(folder: Path) -> bool:
    return any((folder / m).exists() for m in _MARKERS)


def _tail(path: Path, size: int = 8192) -> list[str]:
    """The last lines of a file (at most `size` bytes of it); [] when it is missing."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            return [line for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return []


def _live_pid(folder: Path) -> int | None:
    """The pid recorded in the run's lock, if that process is alive and is peftkit (the lock itself is never taken
    here: a probe could make a starting run find its folder busy)."""
    try:
        match = re.search(r"pid (\d+)", (folder / LOCK).read_text())
        pid = int(match[1]) if match else None
        if pid is None:
            return None
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists():
            return pid if b"peftkit" in cmdline.read_bytes() else None
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


class Runs:
    """The runs under a workspace: found, described, launched, stopped and resumed."""

    def __init__(self, ws: Workspace, python: str = sys.executable) -> None:
        self.ws = ws
        self.python = python
        self._procs: dict[Path, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # ---- finding and describing

    def folders(self, depth: int = 4) -> list[Path]:
        """Every run folder under the workspace (hidden folders and runs' own subfolders skipped)."""
        found = []
        for top, dirs, _ in os.walk(self.ws.root):
            here = Path(top)
            if _is_run(here) and here != self.ws.root:
                found.append(here)
                dirs.clear()  # a run's subfolders are its checkpoints and adapter
                continue
            level = len(here.relative_to(self.ws.root).parts)
            dirs[:] = [d for d in dirs if level < depth and not d.startswith(".") and d not in _SKIP
                       and not d.startswith("checkpoint-")]
        return sorted(found)

    def folder(self, run_id: str) -> Path:
        folder = self.ws.existing(run_id, "run")
        if not folder.is_dir() or not _is_run(folder):
            raise StudioError(f"run {run_id!r}: no run in that folder (no {RECIPE}, metrics.jsonl or adapter/)", 404)
        return folder

    def _own(self, folder: Path) -> subprocess.Popen | None:
        with self._lock:
            return self._procs.get(folder)

    def running(self, folder: Path) -> bool:
        proc = self._own(folder)
        return (proc is not None and proc.poll() is None) or _live_pid(folder) is not None

    def describe(self, folder: Path) -> dict[str, Any]:
        """What the run folder says: status (running, finished, failed, stopped, new), step, the error line."""
        proc = self._own(folder)
        log = _tail(folder / LOG)
        error = next((line for line in reversed(log) if _ERROR.match(line)), None)
        if proc is not None and proc.poll() not in (None, 0) and error is None and log:
            error = log[-1]  # killed, or died without the CLI's line
        last = _tail(folder / "metrics.jsonl", 2048)
        step = int(m[1]) if last and (m := re.match(r'\{"step": (\d+)', last[-1])) else 0
        steps = next((int(m[2]) for line in log if (m := _STEPS.search(line))), None)
        if self.running(folder):
            status = "running"
        elif (folder / "adapter").is_dir():
            status = "finished"
        elif error:
            status = "failed"
        else:
            status = "stopped" if latest_checkpoint(folder) is not None else "new"
        recipe = self.recipe(folder)
        return {"id": self.ws.relative(folder), "name": folder.name, "status": status, "step": step,
                "total_steps": steps or recipe.get("max_steps"), "error": error if status == "failed" else None,
                "method": recipe.get("method"), "model": self._shown(recipe.get("model")),
                "resumable": (folder / RECIPE).is_file(),
                "adapter": self.ws.relative(folder / "adapter") if (folder / "adapter").is_dir() else None}

    def _shown(self, model: Any) -> Any:
        """A model path under the workspace as the user names it (relative); anything else as it is."""
        if isinstance(model, str) and Path(model).is_absolute() and Path(model).is_relative_to(self.ws.root):
            return self.ws.relative(Path(model))
        return model

    @staticmethod
    def recipe(folder: Path) -> dict[str, Any]:
        try:
            data = yaml.safe_load((folder / RECIPE).read_text())
        except (OSError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    def list(self) -> list[dict[str, Any]]:
        return [self.describe(f) for f in self.folders()]

    # ---- launching and controlling

    def launch(self, name: str, recipe: dict[str, Any]) -> dict[str, Any]:
        """Write `recipe` (TrainConfig keys) as ``<output_dir>/recipe.yaml`` and start ``peftkit train`` on it.

        The output folder is ``recipe["output_dir"]`` (under the workspace) or ``runs/<name>``; data and model
        paths must lie under the workspace too.

        Raises:
            StudioError: a bad recipe (400), a path outside the workspace (403), a folder that holds or lies inside
                another run (409).
        """
        Workspace.check_name(name, "run name")
        recipe = dict(recipe)
        folder = self.ws.path(recipe.pop("output_dir", None) or f"runs/{name}", "output_dir")
        self._check_free(folder)
        recipe = self._checked_paths(recipe)
        recipe.setdefault("progress", False)  # a log file, not a terminal: no progress bar
        recipe["output_dir"] = str(folder)
        try:
            cfg = TrainConfig.from_dict(recipe, where="recipe: ")
            cfg.method_settings()
        except PeftkitError as e:
            raise StudioError(str(e)) from None
        self._check_fits(cfg)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / RECIPE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return self._start(folder, resume=False)

    def _check_fits(self, cfg: TrainConfig) -> None:
        """The method's settings on the model's geometry (a rank above a layer's width, a target that matches
        nothing): refused now rather than after the model loads. A model the estimator cannot read is left to
        training."""
        from peftkit.memory import count_trainable
        from peftkit.studio.plan import model_arch

        try:
            arch = model_arch(self.ws, cfg.model)
        except ValueError:
            return
        try:
            count_trainable(arch, cfg.method, **cfg.method_config)
        except ValueError as e:
            raise StudioError(f"{cfg.method} on {cfg.model}: {str(e).splitlines()[0]}") from None

    def _check_free(self, folder: Path) -> None:
        """Refuse a folder that holds a run, or lies inside one (its checkpoints and adapter are that run's)."""
        for parent in folder.parents:
            if parent == self.ws.root or not parent.is_relative_to(self.ws.root):
                break
            if _is_run(parent):
                raise StudioError(f"output_dir {self.ws.relative(folder)} lies inside the run "
                                  f"{self.ws.relative(parent)}: choose a folder outside it", 409)
        if not folder.exists():
            return
        taken = [n for n in (RECIPE, *RUN_FILES) if (folder / n).exists()]
        taken += [p.name for p in folder.glob("checkpoint-*")]
        live = _live_pid(folder) is not None
        if taken or live:
            what = "a live run" if live else f"a run ({', '.join(taken[:3])})"
            raise StudioError(f"{self.ws.relative(folder)} already holds {what}: resume it, or choose another "
                              "name", 409)

    def _checked_paths(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """Data and model paths made absolute, each under the workspace (Hub datasets and hub ids pass)."""
        for key in RECIPE_RELATIVE:
            value = recipe.get(key)
            if isinstance(value, str) and value and not value.startswith("hub:"):
                recipe[key] = str(self.ws.existing(value, key))
        model = recipe.get("model")
        if isinstance(model, str) and self.ws.is_path_like(model):
            recipe["model"] = str(self.ws.existing(model, "model"))
        return recipe

    def resume(self, run_id: str) -> dict[str, Any]:
        """``peftkit train <run>/recipe.yaml --resume``."""
        folder = self.folder(run_id)
        if not (folder / RECIPE).is_file():
            raise StudioError(f"run {run_id!r} has no {RECIPE} (the CLI started it): resume it with the command "
                              "that started it, plus --resume", 409)
        if self.running(folder):
            raise StudioError(f"run {run_id!r} is running already", 409)
        return self._start(folder, resume=True)

    def stop(self, run_id: str) -> dict[str, Any]:
        """SIGTERM: the run stops at its next step boundary after a checkpoint (``--resume`` continues)."""
        folder = self.folder(run_id)
        proc = self._own(folder)
        pid = proc.pid if proc is not None and proc.poll() is None else _live_pid(folder)
        if pid is None:
            raise StudioError(f"run {run_id!r} is not running", 409)
        os.kill(pid, signal.SIGTERM)
        return self.describe(folder)

    def _start(self, folder: Path, resume: bool) -> dict[str, Any]:
        command = [self.python, "-m", "peftkit.cli", "train", str(folder / RECIPE), *(["--resume"] if resume else [])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with (folder / LOG).open("w") as log:
            proc = subprocess.Popen(command, cwd=self.ws.root, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        with self._lock:
            self._procs[folder] = proc
        return self.describe(folder)

    def shutdown(self) -> None:
        """Forget the processes (they keep training in their own session; their folders say how they end)."""
        with self._lock:
            self._procs.clear()
