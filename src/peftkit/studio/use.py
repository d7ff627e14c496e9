"""Use: chat with the base model and the runs' adapters side by side, and merge or export an adapter.

Chat goes through `peftkit serve` itself: its engine is built as ``peftkit serve --adapter-root WORKSPACE --adapter
RUN=RUN/adapter ...`` builds it (`peftkit.commands.serve.build_engine`: the base the adapters were trained on, stored
as they were trained), and its OpenAI-shaped API (`peftkit.serve.app`) is mounted under ``/api/use/serve``: one
request per model on the same prompt, decoded together in the engine's mixed batches, each adapter's prompt built as
its training built them. Merge and export run ``peftkit merge`` / ``peftkit export`` as subprocesses.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from peftkit.studio.runfolders import Runs
from peftkit.studio.workspace import StudioError

__all__ = ["EngineHost", "ExportRequest", "Jobs", "LoadRequest", "router"]

Scope = MutableMapping[str, Any]
ASGIFn = Callable[[], Awaitable[MutableMapping[str, Any]]]
SendFn = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class LoadRequest(BaseModel):
    runs: list[str] = Field(default_factory=list, max_length=8)  # their adapters are served by run id
    model: str | None = None  # default: the base the adapters were trained on


class ExportRequest(BaseModel):
    run: str = Field(min_length=1)
    kind: Literal["gguf", "merge"] = "gguf"
    output: str | None = None  # default: exports/<run name>.gguf or merged/<run name>
    dtype: str | None = None


class EngineHost:
    """The serve engine of the Use page, rebuilt when another base or set of adapters is asked for, and the ASGI
    app that forwards ``/api/use/serve/...`` to its serve API."""

    def __init__(self, runs: Runs) -> None:
        self.runs = runs
        self._key: tuple[Any, ...] | None = None
        self._engine: Any = None
        self._app: Any = None
        self._lock = threading.Lock()

    def load(self, body: LoadRequest) -> dict[str, Any]:
        """Serve `body.model` (or the adapters' base) with the adapters of `body.runs`. Blocking (loads weights)."""
        from peftkit.cli import build_parser
        from peftkit.commands.serve import build_engine
        from peftkit.serve.app import create_app

        ws = self.runs.ws
        argv = ["serve", "--adapter-root", str(ws.root)]
        for run in body.runs:
            adapter = self.runs.folder(run) / "adapter"
            if not adapter.is_dir():
                raise StudioError(f"run {run!r} has no adapter yet (it is written when the run finishes)", 409)
            argv += ["--adapter", f"{ws.relative(self.runs.folder(run))}={adapter}"]
        if body.model:
            argv += ["--model", str(ws.existing(body.model, "model")) if ws.is_path_like(body.model) else body.model]
        key = tuple(argv)
        with self._lock:
            if key != self._key:
                self.close()
                engine = build_engine(build_parser().parse_args(argv))
                engine.start()  # a mounted app's lifespan does not run: the engine is started and stopped here
                self._engine, self._app, self._key = engine, create_app(engine), key
            engine = self._engine
        return {"base": engine.base_name, "models": engine.models(), "warnings": engine.warnings}

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown(5.0)
        self._engine = self._app = self._key = None

    async def __call__(self, scope: Scope, receive: ASGIFn, send: SendFn) -> None:
        app = self._app
        if app is None:
            from starlette.responses import JSONResponse

            response = JSONResponse({"error": "no model loaded: choose runs and load them first (POST /api/use/load)"},
                                    409)
            await response(scope, receive, send)
            return
        await app(scope, receive, send)


class Jobs:
    """``peftkit export`` / ``peftkit merge`` of a run's adapter in a subprocess; its output goes to a log under
    ``.studio/jobs`` in the workspace."""

    def __init__(self, runs: Runs, python: str = sys.executable) -> None:
        self.runs, self.python = runs, python
        self._jobs: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    def start(self, body: ExportRequest) -> dict[str, Any]:
        ws = self.runs.ws
        folder = self.runs.folder(body.run)
        adapter = folder / "adapter"
        if not adapter.is_dir():
            raise StudioError(f"run {body.run!r} has no adapter yet (it is written when the run finishes)", 409)
        default = f"exports/{folder.name}.gguf" if body.kind == "gguf" else f"merged/{folder.name}"
        output = ws.path(body.output or default, "output")
        output.parent.mkdir(parents=True, exist_ok=True)
        command = [self.python, "-m", "peftkit.cli", "export" if body.kind == "gguf" else "merge", str(adapter),
                   str(output), "--overwrite", *(["--dtype", body.dtype] if body.dtype else [])]
        job = str(next(self._ids))
        log = ws.root / ".studio" / "jobs" / f"{job}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            proc = subprocess.Popen(command, cwd=ws.root, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._jobs[job] = {"proc": proc, "log": log, "started": time.monotonic(), "kind": body.kind,
                           "output": ws.relative(output), "run": body.run}
        return self.describe(job)

    def describe(self, job: str) -> dict[str, Any]:
        if job not in self._jobs:
            raise StudioError(f"no job {job!r}", 404)
        j = self._jobs[job]
        rc = j["proc"].poll()
        lines = [line for line in Path(j["log"]).read_text(errors="replace").splitlines() if line.strip()]
        status = "running" if rc is None else "done" if rc == 0 else "failed"
        if "ended" not in j and rc is not None:
            j["ended"] = time.monotonic()
        return {"id": job, "kind": j["kind"], "run": j["run"], "output": j["output"], "status": status,
                "seconds": round(j.get("ended", time.monotonic()) - j["started"], 1),
                "line": lines[-1] if lines else "", "error": lines[-1] if status == "failed" and lines else None}


def router(host: EngineHost, jobs: Jobs) -> APIRouter:
    r = APIRouter(prefix="/use")

    @r.post("/load")
    def load(body: LoadRequest) -> dict[str, Any]:
        return host.load(body)

    @r.post("/export")
    def export(body: ExportRequest) -> dict[str, Any]:
        return jobs.start(body)

    @r.get("/jobs")
    def job(id: str) -> dict[str, Any]:
        return jobs.describe(id)

    return r
