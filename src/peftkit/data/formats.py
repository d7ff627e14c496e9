"""Reading instruction data: local files and folders, Hugging Face Hub datasets, `datasets` objects.

Every row becomes a conversation (a list of ``{"role", "content"}`` messages) whose assistant turns are the
targets. Recognised layouts:

* Alpaca: ``instruction`` / ``input`` / ``output``;
* Dolly: ``instruction`` / ``context`` / ``response``;
* OpenAI chat: ``messages``, a list of ``{"role": system | user | assistant, "content"}``;
* ShareGPT: ``conversations``, a list of ``{"from": system | human | gpt, "value"}``.

Other field names are mapped with `field_map`, e.g. ``{"instruction": "question", "output": "answer"}`` or
``{"messages": "dialog"}``.

Where the rows come from (`read_rows`), for a string or path:

* a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.tsv`` / ``.parquet`` file is read by peftkit itself, so that a
  bad line is named by its number; JSONL is read line by line, and CSV / TSV / Parquet files above
  `STREAM_BYTES` stream through `datasets` (rows are read only as far as they are used);
* a local ``.arrow`` file or a folder of data files streams through ``datasets.load_dataset`` (its ``train``
  split; a folder's files are split by their names, as on the Hub);
* anything else of the form ``[hub:]OWNER/NAME[/SUBSET][@REVISION][:SPLIT]`` is a Hub dataset, loaded with
  ``datasets.load_dataset`` (its split downloaded whole, once, into the datasets cache, which later runs and
  offline runs reuse), split ``train`` unless given; e.g. ``HuggingFaceH4/no_robots:test``,
  ``openai/gsm8k/main@refs/convert/parquet``. ``hub:`` forces the Hub where a local path of that name exists.

An instruction row with an input becomes one user message, `INPUT_FORMAT` filled with both. When every row of a
source shares its instruction (or every conversation its system message), `ReadStats` says so: a trained adapter
records it, and generation puts it back in front of a bare user message (`peftkit.core.context`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from peftkit.core.context import INPUT_FORMAT, Conversation  # what an adapter records of the prompt layout
from peftkit.errors import PeftkitError

__all__ = [
    "INPUT_FORMAT",
    "STREAM_BYTES",
    "Conversation",
    "HubDataset",
    "ReadStats",
    "check_source",
    "iter_rows",
    "parse_rows",
    "read_conversations",
    "read_rows",
    "row_to_conversation",
]

T = TypeVar("T")
_INSTRUCTION_KEYS = ("instruction",)
_CONTEXT_KEYS = ("input", "context")
_OUTPUT_KEYS = ("output", "response")
_ROLES = ("system", "user", "assistant")
# ShareGPT speaker names (and the OpenAI ones, which some ShareGPT exports use) -> chat roles
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_OWN_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
_DATASETS_SUFFIXES = (".arrow",)

STREAM_BYTES = 64 << 20
"""CSV / TSV / Parquet files larger than this stream through `datasets` instead of being read whole by pandas."""



@dataclasses.dataclass
class ReadStats:
    """What reading a data source did: rows read, rows skipped with the reason for the first few, and the source
    row (1-based) of each conversation returned, to name it in later errors (`where`)."""

    rows: int = 0
    skipped: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)
    instruction: str | None = None
    """The instruction that every usable row shares, each row with an input (`INPUT_FORMAT`); else None."""
    system: str | None = None
    """The system message that every usable conversation starts with; else None."""
    source: str = ""
    kept: list[int] = dataclasses.field(default_factory=list)
    unit: str = "row"  # what `kept` counts: rows, or lines of a JSONL file

    def skip(self, reason: str, read: bool = True) -> None:
        """Count one skipped row (and, with `read`, one row read: a line that never became a row); the first five
        reasons are kept."""
        self.rows += read
        self.skipped += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)

    def where(self, index: int) -> str:
        """``"<source>: row <n>"`` for the `index`-th conversation returned."""
        if index >= len(self.kept):
            return f"conversation {index + 1}"
        return f"{self.source}: {self.unit} {self.kept[index]}"


@dataclasses.dataclass(frozen=True)
class HubDataset:
    """A Hub dataset reference: ``[hub:]OWNER/NAME[/SUBSET][@REVISION][:SPLIT]``."""

    repo: str
    subset: str | None = None
    revision: str | None = None
    split: str = "train"

    _PATTERN = re.compile(
        r"(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<subset>[\w.-]+))?(?:@(?P<revision>[\w./-]+?))?(?::(?P<split>\S+))?"
    )

    @classmethod
    def parse(cls, spec: str) -> HubDataset | None:
        """The reference `spec` spells, or None when it is not one."""
        match = cls._PATTERN.fullmatch(spec.removeprefix("hub:"))
        if match is None:
            return None
        return cls(match["repo"], match["subset"], match["revision"], match["split"] or "train")

    def __str__(self) -> str:
        subset = f"/{self.subset}" if self.subset else ""
        revision = f"@{self.revision}" if self.revision else ""
        return f"{self.repo}{subset}{revision}:{self.split}"


def iter_rows(source: str | Path | Any, on_bad_line: Callable[[str], None] | None = None,
              lines: list[int] | None = None) -> Iterator[Any]:
    """Rows of a data source, lazily: a local file or folder, a Hub dataset (see the module notes), or an
    iterable of rows (a `datasets.Dataset`, a list of dicts).

    A JSONL line that is not valid JSON is an error naming the file and the line, or, with `on_bad_line`, passed
    to it (that message) and skipped. From a JSONL file, the line number of each row is appended to `lines`."""
    if isinstance(source, (str, Path)):
        where = _local_or_hub(source)
        if isinstance(where, HubDataset):
            return _datasets_rows(str(where), hub=True, path=where.repo, name=where.subset, split=where.split,
                                  revision=where.revision)
        if where.is_file():
            return _file_rows(where, on_bad_line, lines)
        return _datasets_rows(str(where), path=str(where), split="train", streaming=True)
    if isinstance(source, Iterable):
        return (dict(r) if isinstance(r, Mapping) else r for r in source)
    raise PeftkitError(f"cannot read instruction data from a {type(source).__name__}")


def _local_or_hub(source: str | Path) -> Path | HubDataset:
    """What a data source names: a local file or folder that exists, else a Hub dataset; neither is one line."""
    path, forced_hub = Path(source), str(source).startswith("hub:")
    if (path.is_file() or path.is_dir()) and not forced_hub:
        return path
    looks_like_a_file = path.suffix.lower() in _OWN_SUFFIXES + _DATASETS_SUFFIXES
    hub = None if looks_like_a_file else HubDataset.parse(str(source))
    if hub is None:
        raise PeftkitError(f"data file not found: {path}")
    return hub


def check_source(source: str | Path) -> None:
    """Check, in a moment, that a data source can be read: a local file or folder exists and is readable (a Hub
    dataset is only parsed; it is fetched when read). Callers run it before anything slow, such as loading a model.

    Raises:
        PeftkitError: one line naming the path.
    """
    where = _local_or_hub(source)
    if isinstance(where, Path):
        kind, mode = ("folder", os.R_OK | os.X_OK) if where.is_dir() else ("file", os.R_OK)
        if not os.access(where, mode):
            raise PeftkitError(f"data {kind} not readable: {where} (permission denied; check its permissions)")


def read_rows(source: str | Path | Any) -> list[Any]:
    """All rows of a data source (`iter_rows`)."""
    return list(iter_rows(source))


def _file_rows(path: Path, on_bad_line: Callable[[str], None] | None = None,
               lines: list[int] | None = None) -> Iterator[Any]:
    suffix = path.suffix.lower()
    if (suffix in (".csv", ".tsv", ".parquet") and path.stat().st_size > STREAM_BYTES) or suffix in _DATASETS_SUFFIXES:
        return _datasets_rows(str(path), path="csv" if suffix == ".tsv" else suffix[1:], data_files=str(path),
                              split="train", streaming=True, **_csv_options(path))
    if suffix == ".jsonl":
        return _jsonl_rows(path, on_bad_line, lines)
    if suffix not in _OWN_SUFFIXES:
        raise PeftkitError(
            f"{path}: unsupported data format {suffix!r} (use .json, .jsonl, .csv, .tsv, .parquet or .arrow, "
            "or a folder of such files)"
        )
    try:
        if suffix == ".json":
            return iter(_json_rows(path))
        import pandas as pd

        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False, dtype=str)
        return iter(frame.to_dict(orient="records"))
    except json.JSONDecodeError as e:
        raise PeftkitError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except UnicodeDecodeError as e:  # from pandas: find the line in the file itself
        _read_text(path)
        raise PeftkitError(f"cannot read {path}: {e}") from None
    except (OSError, ValueError) as e:
        if isinstance(e, PeftkitError):
            raise
        raise PeftkitError(f"cannot read {path}: {e}") from None


def _json_rows(path: Path) -> list[Any]:
    """The rows of a .json file: a list, or one list under a key (``{"train": [...]}``)."""
    data = json.loads(_read_text(path))
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise PeftkitError(f"{path}: expected a list of rows (or one list under a key)")
        data = lists[0]
    if not isinstance(data, list):
        raise PeftkitError(f"{path}: expected a list of rows")
    return data


def _not_utf8(path: Path, data: bytes, e: UnicodeDecodeError, first_line: int = 1) -> str:
    """One line: where in `path` (whose bytes from line `first_line` on are `data`) the text is not UTF-8."""
    line = first_line + data[:e.start].count(b"\n")
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return (f"{path}: line {line} is not UTF-8 (byte {data[e.start]:#04x} at column {column}); save the file as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _read_text(path: Path) -> str:
    """A whole file as text: UTF-8, a leading byte-order mark dropped; other bytes are an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PeftkitError(_not_utf8(path, data, e)) from None


def _jsonl_rows(path: Path, on_bad_line: Callable[[str], None] | None = None,
                lines: list[int] | None = None) -> Iterator[Any]:
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")  # a byte-order mark is accepted, as in CSV
            except UnicodeDecodeError as e:
                if on_bad_line is None:
                    raise PeftkitError(_not_utf8(path, raw, e, i + 1) + " (or set skip_bad_rows to skip such "
                                       "lines)") from None
                on_bad_line(_not_utf8(path, raw, e, i + 1))
                continue
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    reason = f"{path}: line {i + 1} is not valid JSON ({e.msg})"
                    if on_bad_line is None:
                        raise PeftkitError(reason + " (set skip_bad_rows to skip such lines)") from None
                    on_bad_line(reason)
                    continue
                if lines is not None:
                    lines.append(i + 1)
                yield row


def _csv_options(path: Path) -> dict[str, Any]:
    """For CSV / TSV through `datasets`: every column a string, empty cells empty strings (as the pandas path)."""
    if path.suffix.lower() not in (".csv", ".tsv"):
        return {}
    import pandas as pd
    from datasets import Features, Value

    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    columns = pd.read_csv(path, sep=sep, nrows=0).columns
    return {"sep": sep, "keep_default_na": False, "features": Features({c: Value("string") for c in columns})}


def _datasets_rows(label: str, hub: bool = False, **load_args: Any) -> Iterator[Any]:
    """Rows through ``datasets.load_dataset(**load_args)``, its errors turned into one line naming `label`."""
    import datasets
    from datasets.exceptions import DatasetsError

    where = f"the Hub dataset {label} (no local file or folder has that name)" if hub else label
    try:
        data = datasets.load_dataset(**load_args)
    except ConnectionError:
        if not hub:
            raise
        raise PeftkitError(
            f"cannot load {where}: offline (HF_HUB_OFFLINE) or the Hub is unreachable, and it is not in the "
            f"datasets cache ({datasets.config.HF_DATASETS_CACHE}); load it once with network access, or download "
            "its files and set the data to that local file or folder"
        ) from None
    except (OSError, ValueError, DatasetsError) as e:
        raise PeftkitError(f"cannot load {where}: {_first_line(e)}") from None
    return _guarded(data, label)


def _guarded(data: Iterable[Any], name: str) -> Iterator[Any]:
    from datasets.exceptions import DatasetsError

    read = 0
    try:
        for row in data:
            yield row
            read += 1
    except (OSError, ValueError, DatasetsError) as e:
        raise PeftkitError(f"{name}: cannot read past row {read}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


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


def _turns(messages: Any, key: str, sharegpt: bool) -> Conversation:
    """Validate a list of chat turns (OpenAI ``role`` / ``content`` or ShareGPT ``from`` / ``value``)."""
    if not isinstance(messages, list) or not messages:
        raise TypeError(f"field {key!r} must be a non-empty list of messages")
    roles, (role_key, content_key) = (_SHAREGPT_ROLES, ("from", "value")) if sharegpt else (_ROLES, ("role", "content"))
    conv = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"{key}[{i}] is a {type(m).__name__}, not a message object")
        role = m.get(role_key)
        if role not in roles:
            raise KeyError(f"{key}[{i}]: unknown {role_key} {role!r} (known: {', '.join(roles)})")
        role = _SHAREGPT_ROLES[str(role)] if sharegpt else str(role)
        content = m.get(content_key)
        if not isinstance(content, str):
            raise TypeError(f"{key}[{i}] ({role}): {content_key!r} is a {type(content).__name__}, not a string")
        if not content.strip():
            raise ValueError(f"{key}[{i}] ({role}): empty {content_key!r}")
        conv.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in conv):
        raise KeyError(f"field {key!r} has no assistant turn to learn from")
    return conv


def row_to_conversation(row: Mapping[str, Any], field_map: Mapping[str, str] | None = None) -> Conversation:
    """Turn one row into messages; raises KeyError/TypeError/ValueError describing a bad row."""
    return _row_parts(row, field_map or {})[0]


def _row_parts(row: Mapping[str, Any], field_map: Mapping[str, str]) -> tuple[Conversation, str | None]:
    """The row's messages, and its instruction when the row is an instruction with an input (else None)."""
    if not isinstance(row, Mapping):
        raise TypeError(f"row is a {type(row).__name__}, not an object")
    for layout, sharegpt in (("messages", False), ("conversations", True)):
        key = field_map.get(layout, layout)
        if key in row:
            return _turns(row[key], key, sharegpt), None
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


def parse_rows(source: str | Path | Any, parse: Callable[[Any], T], skip_bad_rows: bool = False,
               stats: ReadStats | None = None, limit: int | None = None, what: str = "rows") -> list[T]:
    """Each row of a data source (`iter_rows`) through `parse`, for `read_conversations` and the preference reader.

    A row `parse` refuses (KeyError, TypeError or ValueError naming the key) is an error naming the source and the
    row (a JSONL file's line), or, with `skip_bad_rows`, skipped and counted in `stats` (whose `where` names the kept
    rows for later errors). With `limit`, reading stops after that many parsed rows.
    """
    stats = stats if stats is not None else ReadStats()
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    stats.source = name
    out: list[T] = []
    lines: list[int] = []  # a JSONL file's rows are named by their line
    for i, row in enumerate(iter_rows(source, stats.skip if skip_bad_rows else None, lines)):
        stats.rows += 1
        stats.unit, number = ("line", lines[i]) if lines else ("row", i + 1)
        try:
            out.append(parse(row))
            stats.kept.append(number)
        except (KeyError, TypeError, ValueError) as e:
            reason = f"{name}: {stats.unit} {number}: {e.args[0] if e.args else e}"
            if not skip_bad_rows:
                raise PeftkitError(reason + " (set skip_bad_rows to skip such rows)") from None
            stats.skip(reason, read=False)
        if len(out) == limit:
            break
    if not out:
        raise PeftkitError(f"{name}: no usable {what}")
    return out


def read_conversations(
    source: str | Path | Any,
    field_map: Mapping[str, str] | None = None,
    skip_bad_rows: bool = False,
    stats: ReadStats | None = None,
    limit: int | None = None,
) -> list[Conversation]:
    """Read a data source into conversations.

    A bad row (missing or non-string field, malformed turn; in JSONL, a line that is not valid JSON) is an error
    naming the source and the row number (1-based; a bad JSONL line by its line number), or, with `skip_bad_rows`,
    skipped and counted in `stats` (`parse_rows`). With `limit`, reading stops after that many conversations (the
    rest of the source is never read). `stats` also gets the instruction and the system message that all usable rows
    share.
    """
    stats = stats if stats is not None else ReadStats()
    parts = parse_rows(source, lambda row: _row_parts(row, field_map or {}), skip_bad_rows, stats, limit)
    out = [conv for conv, _ in parts]
    instructions = {instruction for _, instruction in parts}
    systems = {conv[0]["content"] if conv[0]["role"] == "system" else None for conv in out}
    stats.instruction = instructions.pop() if len(instructions) == 1 else None
    stats.system = systems.pop() if len(systems) == 1 else None
    return out
