"""Reading instruction data: JSON, JSONL, CSV, Parquet files and Hugging Face `datasets` objects.

Every row becomes a conversation (a list of ``{"role", "content"}`` messages) whose assistant turns are the
targets. Recognised layouts:

* Alpaca: ``instruction`` / ``input`` / ``output``;
* Dolly: ``instruction`` / ``context`` / ``response``;
* chat: ``messages`` (a list of role/content dicts, as in OpenAI / HF chat datasets).

Other field names are mapped with `field_map`, e.g. ``{"instruction": "question", "output": "answer"}``.

An instruction row with an input becomes one user message, `INPUT_FORMAT` filled with both. When every row of a
source shares its instruction (or every conversation its system message), `ReadStats` says so: a trained adapter
records it, and generation puts it back in front of a bare user message (`peftkit.core.context`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

__all__ = ["INPUT_FORMAT", "Conversation", "ReadStats", "read_conversations", "read_rows", "row_to_conversation"]

Conversation = list[dict[str, str]]

_INSTRUCTION_KEYS = ("instruction",)
_CONTEXT_KEYS = ("input", "context")
_OUTPUT_KEYS = ("output", "response")
_ROLES = ("system", "user", "assistant")

INPUT_FORMAT = "{instruction}\n\n{input}"
"""The user message of an instruction row with an input (Alpaca's ``input``, Dolly's ``context``)."""


@dataclasses.dataclass
class ReadStats:
    """What reading a data source did: rows read, and rows skipped with the reason for the first few."""

    rows: int = 0
    skipped: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)
    instruction: str | None = None
    """The instruction that every usable row shares, each row with an input (`INPUT_FORMAT`); else None."""
    system: str | None = None
    """The system message that every usable conversation starts with; else None."""


def read_rows(source: str | Path | Any) -> list[dict[str, Any]]:
    """Rows of a data file (by suffix) or of a `datasets.Dataset` / list of dicts."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise PeftkitError(f"data file not found: {path}")
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                rows = []
                for i, line in enumerate(path.read_text().splitlines()):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise PeftkitError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from None
                return rows
            if suffix == ".json":
                data = json.loads(path.read_text())
                if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
                    lists = [v for v in data.values() if isinstance(v, list)]
                    if len(lists) != 1:
                        raise PeftkitError(f"{path}: expected a list of rows (or one list under a key)")
                    data = lists[0]
                if not isinstance(data, list):
                    raise PeftkitError(f"{path}: expected a list of rows")
                return data
            if suffix in (".csv", ".tsv", ".parquet"):
                import pandas as pd

                if suffix == ".parquet":
                    frame = pd.read_parquet(path)
                else:
                    frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False, dtype=str)
                return frame.to_dict(orient="records")
        except json.JSONDecodeError as e:
            raise PeftkitError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
        except (OSError, ValueError) as e:
            if isinstance(e, PeftkitError):
                raise
            raise PeftkitError(f"cannot read {path}: {e}") from None
        raise PeftkitError(f"{path}: unsupported data format {suffix!r} (use .json, .jsonl, .csv, .tsv or .parquet)")
    if isinstance(source, Iterable):
        return [dict(r) for r in source]
    raise PeftkitError(f"cannot read instruction data from a {type(source).__name__}")


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
    return _row_parts(row, field_map or {})[0]


def _row_parts(row: Mapping[str, Any], field_map: Mapping[str, str]) -> tuple[Conversation, str | None]:
    """The row's messages, and its instruction when the row is an instruction with an input (else None)."""
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
        return conv, None
    instruction = _field(row, _INSTRUCTION_KEYS, field_map, "instruction")
    context = _field(row, _CONTEXT_KEYS, field_map, "input")
    output = _field(row, _OUTPUT_KEYS, field_map, "output")
    if instruction is None:
        raise KeyError(f"missing field 'instruction' (fields present: {', '.join(map(str, row))})")
    if output is None:
        raise KeyError(f"missing field 'output' or 'response' (fields present: {', '.join(map(str, row))})")
    prompt = INPUT_FORMAT.format(instruction=instruction, input=context) if context else instruction
    conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return conv, instruction if context else None


def read_conversations(
    source: str | Path | Any,
    field_map: Mapping[str, str] | None = None,
    skip_bad_rows: bool = False,
    stats: ReadStats | None = None,
) -> list[Conversation]:
    """Read a data source into conversations.

    A bad row (missing or non-string field) is an error naming the source and the row number (1-based), or,
    with `skip_bad_rows`, skipped and counted in `stats`. `stats` also gets the instruction and the system
    message that all usable rows share.
    """
    stats = stats if stats is not None else ReadStats()
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    out: list[Conversation] = []
    instructions: set[str | None] = set()
    systems: set[str | None] = set()
    for i, row in enumerate(read_rows(source)):
        stats.rows += 1
        try:
            conv, instruction = _row_parts(row, field_map or {})
            out.append(conv)
            instructions.add(instruction)
            systems.add(conv[0]["content"] if conv[0]["role"] == "system" else None)
        except (KeyError, TypeError) as e:
            reason = f"{name}: row {i + 1}: {e.args[0] if e.args else e}"
            if not skip_bad_rows:
                raise PeftkitError(reason + " (set skip_bad_rows to skip such rows)") from None
            stats.skipped += 1
            if len(stats.reasons) < 5:
                stats.reasons.append(reason)
    if not out:
        raise PeftkitError(f"{name}: no usable rows")
    stats.instruction = instructions.pop() if len(instructions) == 1 else None
    stats.system = systems.pop() if len(systems) == 1 else None
    return out
