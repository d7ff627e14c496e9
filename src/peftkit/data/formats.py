"""Reading instruction data: JSON, JSONL, CSV, Parquet files and Hugging Face `datasets` objects.

Every row becomes a conversation (a list of ``{"role", "content"}`` messages) whose assistant turns are the
targets. Recognised layouts:

* Alpaca: ``instruction`` / ``input`` / ``output``;
* Dolly: ``instruction`` / ``context`` / ``response``;
* chat: ``messages`` (a list of role/content dicts, as in OpenAI / HF chat datasets).

Other field names are mapped with `field_map`, e.g. ``{"instruction": "question", "output": "answer"}``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

__all__ = ["Conversation", "ReadStats", "read_conversations", "read_rows", "row_to_conversation"]

Conversation = list[dict[str, str]]

_INSTRUCTION_KEYS = ("instruction",)
_CONTEXT_KEYS = ("input", "context")
_OUTPUT_KEYS = ("output", "response")
_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class ReadStats:
    """What reading a data source did: rows read, and rows skipped with the reason for the first few."""

    rows: int = 0
    skipped: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)

    def skip(self, reason: str) -> None:
        """Count one row read and skipped (the first five reasons are kept)."""
        self.rows += 1
        self.skipped += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)


def read_rows(source: str | Path | Any, skip_bad_rows: bool = False,
              stats: ReadStats | None = None) -> list[dict[str, Any]]:
    """Rows of a data file (by suffix) or of a `datasets.Dataset` / list of dicts.

    A JSONL line that is not valid JSON is an error naming the file and the line, or, with `skip_bad_rows`, skipped
    and counted in `stats` (as a row read and a row skipped).
    """
    return [row for _, row in _numbered_rows(source, skip_bad_rows, stats)]


def _numbered_rows(source: str | Path | Any, skip_bad_rows: bool, stats: ReadStats | None) -> list[tuple[str, Any]]:
    """`read_rows` with where each row came from: ``"line N"`` in a JSONL file (blank and skipped lines counted),
    else ``"row N"`` (1-based)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise PeftkitError(f"data file not found: {path}")
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                return _jsonl_rows(path, skip_bad_rows, stats)
            if suffix == ".json":
                data = json.loads(path.read_text())
                if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
                    lists = [v for v in data.values() if isinstance(v, list)]
                    if len(lists) != 1:
                        raise PeftkitError(f"{path}: expected a list of rows (or one list under a key)")
                    data = lists[0]
                if not isinstance(data, list):
                    raise PeftkitError(f"{path}: expected a list of rows")
                return _numbered(data)
            if suffix in (".csv", ".tsv", ".parquet"):
                import pandas as pd

                if suffix == ".parquet":
                    frame = pd.read_parquet(path)
                else:
                    frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False, dtype=str)
                return _numbered(frame.to_dict(orient="records"))
        except json.JSONDecodeError as e:
            raise PeftkitError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
        except (OSError, ValueError) as e:
            if isinstance(e, PeftkitError):
                raise
            raise PeftkitError(f"cannot read {path}: {e}") from None
        raise PeftkitError(f"{path}: unsupported data format {suffix!r} (use .json, .jsonl, .csv, .tsv or .parquet)")
    if isinstance(source, Iterable):
        return _numbered([dict(r) for r in source])
    raise PeftkitError(f"cannot read instruction data from a {type(source).__name__}")


def _numbered(rows: list[Any]) -> list[tuple[str, Any]]:
    return [(f"row {i + 1}", row) for i, row in enumerate(rows)]


def _jsonl_rows(path: Path, skip_bad_rows: bool, stats: ReadStats | None) -> list[tuple[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append((f"line {i + 1}", json.loads(line)))
        except json.JSONDecodeError as e:
            reason = f"{path}: line {i + 1} is not valid JSON ({e.msg})"
            if not skip_bad_rows:
                raise PeftkitError(reason + " (set skip_bad_rows to skip such lines)") from None
            if stats is not None:
                stats.skip(reason)
    return rows


def _field(row: Mapping[str, Any], names: tuple[str, ...], field_map: Mapping[str, str], role: str) -> str | None:
    key = field_map.get(role)
    if key is not None:
        if key not in row:
            raise KeyError(f"missing field {key!r} (mapped from {role!r})")
        return _text(row[key], key)
    for name in names:
        if name in row and row[name] is not None:
            return _text(row[name], name)
    return None


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"field {key!r} is a {type(value).__name__}, not a string")
    return value


def row_to_conversation(row: Mapping[str, Any], field_map: Mapping[str, str] | None = None) -> Conversation:
    """Turn one row into messages; raises KeyError/TypeError describing a bad row."""
    field_map = field_map or {}
    if not isinstance(row, Mapping):
        raise TypeError(f"row is a {type(row).__name__}, not an object")
    messages_key = field_map.get("messages", "messages")
    if messages_key in row:
        messages = row[messages_key]
        if not isinstance(messages, list) or not messages:
            raise TypeError(f"field {messages_key!r} must be a non-empty list of messages")
        conv = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise TypeError(f"message {i} must have role in {_ROLES} and string content")
            conv.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in conv):
            raise KeyError("conversation has no assistant message to learn from")
        return conv
    instruction = _field(row, _INSTRUCTION_KEYS, field_map, "instruction")
    context = _field(row, _CONTEXT_KEYS, field_map, "input")
    output = _field(row, _OUTPUT_KEYS, field_map, "output")
    if instruction is None:
        raise KeyError(f"missing field 'instruction' (fields present: {', '.join(map(str, row))})")
    if output is None:
        raise KeyError(f"missing field 'output' or 'response' (fields present: {', '.join(map(str, row))})")
    prompt = f"{instruction}\n\n{context}" if context else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def read_conversations(
    source: str | Path | Any,
    field_map: Mapping[str, str] | None = None,
    skip_bad_rows: bool = False,
    stats: ReadStats | None = None,
) -> list[Conversation]:
    """Read a data source into conversations.

    A bad row (missing or non-string field; in JSONL, a line that is not valid JSON) is an error naming the source
    and the row (1-based; in JSONL, the line), or, with `skip_bad_rows`, skipped and counted in `stats`.
    """
    stats = stats if stats is not None else ReadStats()
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    out: list[Conversation] = []
    for where, row in _numbered_rows(source, skip_bad_rows, stats):
        try:
            out.append(row_to_conversation(row, field_map))
            stats.rows += 1
        except (KeyError, TypeError) as e:
            reason = f"{name}: {where}: {e.args[0] if e.args else e}"
            if not skip_bad_rows:
                raise PeftkitError(reason + " (set skip_bad_rows to skip such rows)") from None
            stats.skip(reason)
    if not out:
        raise PeftkitError(f"{name}: no usable rows")
    return out
