"""What a resumed run must find unchanged: its settings, and the contents of what it read.

A checkpoint records `run_inputs`: each data file's size and SHA-256 (read in 1 MiB chunks), the base weights'
`peftkit.core.context.fingerprint`, the tokenizer's and the chat template's hashes. Data is compared by contents, not
by the path's spelling: ``data/x.jsonl``, its absolute path and a symlink to it are the same data. A Hub dataset id
has no local bytes and is compared by name. Checkpoints of an older peftkit (no record) resume with the settings
compared as written, path strings included, and one line saying the contents were not checked.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.paths import file_sha256

__all__ = ["DATA_KEYS", "RESUME_MAY_CHANGE", "check_resumable", "data_fingerprint", "run_inputs",
           "tokenizer_fingerprint"]

RESUME_MAY_CHANGE = frozenset({"lr", "scheduler", "warmup_ratio", "max_steps", "epochs", "eval_data",
                               "eval_every", "eval_metric", "eval_samples", "eval_max_new_tokens", "save_best",
                               "save_every", "keep_checkpoints", "log_every", "progress", "skip_bad_steps",
                               "report_to", "output_dir", "dist_timeout"})
"""Keys a resumed run may change (they then take effect); any other change is refused."""

DATA_KEYS = ("data", "replay_data")  # compared by contents (eval_data may change on resume)


def _file_digest(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def data_fingerprint(spec: str | None) -> dict[str, Any] | None:
    """``{"files": {name: {size, sha256}}}`` of a data file ("" names it) or of a folder's files (by their path in
    it, hidden ones left out); ``{"source": spec}`` for what is not local (a Hub dataset id); None without data."""
    if not spec:
        return None
    path = Path(spec)
    if str(spec).startswith("hub:") or not path.exists():
        return {"source": str(spec)}
    if path.is_file():
        return {"files": {"": _file_digest(path)}}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))
    return {"files": {str(p.relative_to(path)): _file_digest(p) for p in files}}


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """SHA-256 of the tokenizer's full definition (a fast tokenizer's JSON, else its vocabulary) and special tokens."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return hashlib.sha256((text + special).encode()).hexdigest()


def run_inputs(cfg: Any, tokenizer: Any, context: Any) -> dict[str, Any]:
    """What a checkpoint records of the run's inputs (`check_resumable` compares it)."""
    template = context.template_text
    return {"data": {key: data_fingerprint(getattr(cfg, key)) for key in DATA_KEYS},
            "base": context.fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer),
            "chat_template": None if template is None else hashlib.sha256(template.encode()).hexdigest()}


def _data_change(key: str, spec: str, was: dict[str, Any] | None, now: dict[str, Any] | None) -> str | None:
    """What changed in data setting `key` (now `spec`), or None."""
    if was == now:
        return None
    if not was or not now or "files" not in was or "files" not in now:
        return f"{key} changed ({(was or {}).get('source', 'local files')!r} -> {spec!r})"
    old, new = was["files"], now["files"]
    for name in sorted(set(old) | set(new)):
        where = str(Path(spec) / name) if name else spec
        if name not in new:
            return f"data file {where} is gone"
        if name not in old:
            return f"data file {where} is new"
        if old[name] != new[name]:
            return (f"data file {where} changed since the run started ({old[name]['size']:,} -> "
                    f"{new[name]['size']:,} bytes, other contents)")
    return None


def check_resumable(ckpt: Path, now: dict[str, Any], world: int, inputs: dict[str, Any],
                    may_change: frozenset[str] = RESUME_MAY_CHANGE) -> None:
    """Refuse (one line) to resume `ckpt` when its settings or the contents of its inputs differ from this run's:
    `now` is the config as a dict, `inputs` this run's `run_inputs`."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        saved, was_world, recorded = state.get("config"), state.get("world", world), state.get("inputs")
    except (OSError, ValueError, AttributeError) as e:
        raise PeftkitError(f"checkpoint {ckpt} is unreadable: {e}") from None
    if saved is None:
        return  # a checkpoint without its run's config: nothing to compare
    if was_world != world:
        may_change = may_change | _world_change(ckpt, saved, now, was_world, world)
    by_contents = set(DATA_KEYS) if isinstance(recorded, dict) else set()
    changed = [k for k in now if k not in may_change | by_contents and saved.get(k, now[k]) != now[k]]
    if changed:
        listed = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise PeftkitError(f"cannot resume {ckpt}: the run's settings changed ({listed}). Only "
                           f"{', '.join(sorted(may_change - {'output_dir'}))} may change on resume; "
                           "start a new run (--overwrite or another output_dir) to change the others")
    if not isinstance(recorded, dict):
        print(f"peftkit: note: {ckpt} was written by an older peftkit that recorded no fingerprint of its data, "
              "tokenizer or chat template: their contents are not checked on this resume", file=sys.stderr)
        return
    _check_inputs(ckpt, now, recorded, inputs)


def _world_change(ckpt: Path, saved: dict[str, Any], now: dict[str, Any], was_world: int,
                  world: int) -> frozenset[str]:
    """A sharded run continues on another number of processes when the global batch (``batch_size`` x processes)
    stays: the same micro-batch positions then hold the same rows, and its checkpoint holds whole tensors. The keys
    this lets change (``batch_size``); a refusal naming the way out otherwise."""
    rows = saved.get("batch_size", now.get("batch_size", 0)) * was_world
    sharded = saved.get("sharding", "none") != "none" and now.get("sharding", "none") != "none"
    if sharded and now.get("batch_size", 0) * world == rows:
        return frozenset({"batch_size"})
    if sharded:
        fit = f"batch_size={rows // world}" if rows % world == 0 else f"a number of processes dividing {rows}"
        raise PeftkitError(f"cannot resume {ckpt} on {world} process(es): its global batch is {rows} rows "
                           f"(batch_size x {was_world} processes); resume with {fit} to keep it")
    raise PeftkitError(f"cannot resume {ckpt}: the run had {was_world} process(es), this one has {world} "
                       "(the data order, the batch and each rank's random state depend on it); resume with "
                       f"{was_world}, or start a new run (a run with sharding: full or grad_op may change it)")


def _check_inputs(ckpt: Path, now: dict[str, Any], recorded: dict[str, Any], inputs: dict[str, Any]) -> None:
    way_out = ("restore what the run trained on, or start a new run with this one (another output_dir, or "
               "--overwrite)")
    for key in DATA_KEYS:
        change = _data_change(key, now.get(key) or "", recorded.get("data", {}).get(key), inputs["data"][key])
        if change:
            raise PeftkitError(f"cannot resume {ckpt}: {change}; {way_out}")
    names = {"base": "the base model's weights", "tokenizer": "the tokenizer", "chat_template": "the chat template"}
    for key, what in names.items():
        if key in recorded and recorded[key] != inputs[key]:
            raise PeftkitError(f"cannot resume {ckpt}: {what} changed since the run started "
                               f"({recorded[key]} -> {inputs[key]}); {way_out}")
