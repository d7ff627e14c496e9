"""Train: the runs' API: list, launch, stop, resume, and each run's metrics streamed as server-sent events.

The stream tails ``metrics.jsonl`` from a byte offset: each event carries the new complete lines and, as its id,
``<inode>:<offset>``, so a reconnecting browser (``Last-Event-ID``) gets only what it has not seen. A resumed run
cuts its log back to its checkpoint (a new file): the stream then says ``reset`` and sends the file again.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from peftkit.studio.runfolders import Runs
from peftkit.studio.workspace import StudioError

__all__ = ["LaunchRequest", "RunRequest", "router", "tail_metrics", "with_overrides"]

POLL_S = 0.5


class LaunchRequest(BaseModel):
    name: str = Field(min_length=1)
    recipe: dict[str, Any] = Field(default_factory=dict)  # TrainConfig keys
    overrides: list[str] = Field(default_factory=list)  # "key=value" as on the command line: method_config.r=16


class RunRequest(BaseModel):
    run: str = Field(min_length=1)


def with_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`recipe` with ``key=value`` overrides on top, read as `peftkit train` reads them (YAML values;
    ``method_config.KEY`` sets a method key)."""
    from peftkit.core.config import parse_override

    out = {**recipe, "method_config": dict(recipe.get("method_config") or {})}
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ValueError as e:
            raise StudioError(str(e)) from None
        if key.startswith("method_config."):
            out["method_config"][key.split(".", 1)[1]] = value
        else:
            out[key] = value
    return out


def _position(last_event_id: str | None, offset: int) -> tuple[int | None, int]:
    """(inode, offset) to continue from: the browser's Last-Event-ID, else the query's offset."""
    if last_event_id and ":" in last_event_id:
        inode, _, at = last_event_id.partition(":")
        if inode.isdigit() and at.isdigit():
            return int(inode), int(at)
    return None, max(0, offset)


def _read_new(path: Path, inode: int | None, offset: int) -> tuple[int | None, int, list[str], bool]:
    """(inode, new offset, complete new lines, whether the file was replaced) of `path` past `offset`."""
    try:
        st = os.stat(path)
    except OSError:
        return inode, offset, [], False
    reset = (inode is not None and st.st_ino != inode) or st.st_size < offset
    if reset:
        offset = 0
    if st.st_size <= offset:
        return st.st_ino, offset, [], reset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read(min(st.st_size - offset, 4 << 20))
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
    lines = [line for line in chunk[:end].decode("utf-8", "replace").splitlines() if line.strip()]
    return st.st_ino, offset + end, lines, reset


async def tail_metrics(runs: Runs, folder: Path, inode: int | None, offset: int,
                       request: Request | None = None) -> AsyncIterator[str]:
    """Server-sent events: ``status`` when the run's status changes, ``reset`` when its log was replaced, and a
    message per poll with the new records (a JSON list)."""
    path = folder / "metrics.jsonl"
    status: dict[str, Any] | None = None
    while request is None or not await request.is_disconnected():
        inode, offset, lines, reset = await asyncio.to_thread(_read_new, path, inode, offset)
        if reset:
            yield "event: reset\ndata: {}\n\n"
        if lines:
            yield f"id: {inode}:{offset}\ndata: [{','.join(lines)}]\n\n"
        now = await asyncio.to_thread(runs.describe, folder)
        if now != status:
            status = now
            yield f"event: status\ndata: {json.dumps(now)}\n\n"
        await asyncio.sleep(POLL_S)


def router(runs: Runs) -> APIRouter:
    r = APIRouter(prefix="/runs")

    @r.get("")
    def list_runs() -> dict[str, Any]:
        return {"runs": runs.list()}

    @r.post("")
    def launch(body: LaunchRequest) -> dict[str, Any]:
        return runs.launch(body.name, with_overrides(body.recipe, body.overrides))

    @r.get("/status")
    def status(run: str) -> dict[str, Any]:
        return runs.describe(runs.folder(run))

    @r.post("/stop")
    def stop(body: RunRequest) -> dict[str, Any]:
        return runs.stop(body.run)

    @r.post("/resume")
    def resume(body: RunRequest) -> dict[str, Any]:
        return runs.resume(body.run)

    @r.get("/log")
    def log(run: str) -> dict[str, Any]:
        from peftkit.studio.runfolders import LOG

        path = runs.folder(run) / LOG
        return {"text": path.read_text(errors="replace")[-20000:] if path.is_file() else ""}

    @r.get("/metrics")
    async def metrics(run: str, request: Request, offset: int = 0) -> StreamingResponse:
        folder = await asyncio.to_thread(runs.folder, run)
        inode, at = _position(request.headers.get("last-event-id"), offset)
        return StreamingResponse(tail_metrics(runs, folder, inode, at, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return r
