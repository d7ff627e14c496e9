"""Data: a training file as training sees it.

Read by `peftkit.data.formats` (bad rows skipped with their reason, as ``skip_bad_rows`` does), tokenized by
`peftkit.data.sequences` through the chat template with the loss on the assistant turns (the labels training uses),
and packed into rows as `peftkit.train.pipeline.TrainData` packs them (shared prefixes stored once).
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from peftkit.data.formats import HubDataset, ReadStats, read_conversations
from peftkit.data.sequences import IGNORE, Example, TokenizeStats, make_rows, shared_prefix, tokenize_conversations
from peftkit.studio.workspace import StudioError, Workspace

__all__ = ["DataRequest", "inspect", "router", "tokenizer_for"]


class DataRequest(BaseModel):
    path: str = Field(min_length=1)  # a file or folder under the workspace, or hub:OWNER/NAME
    model: str = "smollm2-135m-instruct"
    template: str | None = None
    field_map: dict[str, str] = {}
    max_length: int = Field(512, ge=8, le=1 << 20)
    overlong: str = "truncate"
    packing: bool = True
    share_prefix: bool = True
    show: int = Field(8, ge=0, le=200)  # rows rendered token by token
    limit: int = Field(5000, ge=1, le=1_000_000)  # rows read at most


_TOKENIZERS: dict[str, Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def tokenizer_for(ws: Workspace, model: str) -> Any:
    """The tokenizer of `model` (a path must lie under the workspace), loaded once."""
    from peftkit.models import load_tokenizer

    source = str(ws.existing(model, "model")) if ws.is_path_like(model) else model
    with _TOKENIZERS_LOCK:
        if source not in _TOKENIZERS:
            _TOKENIZERS[source] = load_tokenizer(source)
        return _TOKENIZERS[source]


def _source(ws: Workspace, path: str) -> str:
    if path.startswith("hub:") and HubDataset.parse(path) is not None:
        return path
    return str(ws.existing(path, "data"))


def _tokens(tokenizer: Any, example: Example) -> list[list[Any]]:
    """[text, carries loss] per token."""
    pieces = tokenizer.convert_ids_to_tokens(example.input_ids)
    texts = [tokenizer.convert_tokens_to_string([p]) for p in pieces]
    return [[t, label != IGNORE] for t, label in zip(texts, example.labels, strict=True)]


def _packing(examples: list[Example], body: DataRequest) -> dict[str, Any]:
    rows = make_rows(examples, body.max_length, body.packing, body.share_prefix)
    prefixes = [shared_prefix(row) if body.share_prefix and body.packing else 0 for row in rows]
    lengths = [p + sum(len(e.input_ids) - p for e in row) for p, row in zip(prefixes, rows, strict=True)]
    saved = sum(p * (len(row) - 1) for p, row in zip(prefixes, rows, strict=True))
    shown = [{"prefix": p, "examples": [len(e.input_ids) - p for e in row]}
             for p, row in zip(prefixes[:12], rows[:12], strict=False)]
    fill = sum(lengths) / (len(rows) * body.max_length) if rows else 0.0
    return {"rows": len(rows), "fill": fill, "prefix_tokens_saved": saved, "first_rows": shown}


def inspect(ws: Workspace, body: DataRequest) -> dict[str, Any]:
    """Rows rendered token by token, token counts and lengths, packing, and the bad rows with their reason."""
    if body.overlong not in ("truncate", "drop"):
        raise StudioError(f"overlong must be 'truncate' or 'drop', got {body.overlong!r}")
    source = _source(ws, body.path)
    tokenizer = tokenizer_for(ws, body.model)
    read = ReadStats()
    convs = read_conversations(source, body.field_map or None, True, read, body.limit)
    stats = TokenizeStats()
    examples = tokenize_conversations(tokenizer, convs, body.max_length, body.template, body.overlong, stats,
                                      where=read.where, skip_rejected=True)
    shown = []
    for i, conv in enumerate(convs[:body.show]):
        one = tokenize_conversations(tokenizer, [conv], body.max_length, body.template, body.overlong,
                                     TokenizeStats(), skip_rejected=True)
        shown.append({"where": read.where(i), "messages": conv,
                      "tokens": _tokens(tokenizer, one[0]) if one else None})
    return {
        "source": body.path, "rows_read": read.rows, "examples": stats.examples,
        "prompt_tokens": stats.prompt_tokens, "target_tokens": stats.target_tokens,
        "truncated": stats.truncated, "dropped": stats.dropped, "rejected": stats.rejected,
        "bad_rows": read.skipped, "bad_reasons": list(read.reasons), "shared_instruction": read.instruction,
        "lengths": [len(e.input_ids) for e in examples], "rows": shown, "packing": _packing(examples, body),
    }


def router(ws: Workspace) -> APIRouter:
    r = APIRouter(prefix="/data")

    @r.post("")
    def post_data(body: DataRequest) -> dict[str, Any]:  # sync: reading and tokenizing run in the thread pool
        return inspect(ws, body)

    @r.get("/files")
    def files() -> dict[str, Any]:
        """Data files in the workspace (for the file picker)."""
        found = []
        for suffix in ("jsonl", "json", "csv", "tsv", "parquet"):
            found += [p for p in ws.root.rglob(f"*.{suffix}")
                      if not _hidden(ws, p) and p.resolve().is_relative_to(ws.root)]
        return {"files": sorted(ws.relative(p) for p in found)[:500]}

    return r


def _hidden(ws: Workspace, path: Any) -> bool:
    """Inside a hidden folder or a run's own files (metrics, checkpoints, adapters)."""
    parts = path.relative_to(ws.root).parts
    return any(p.startswith(".") or p.startswith("checkpoint-") or p in ("adapter", "best") for p in parts) or \
        path.name in ("metrics.jsonl", "run.json", "best.json", "results.json", "demo_results.json")
