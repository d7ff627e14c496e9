"""The resume check: may this run continue that checkpoint? (settings that shape the run must not change)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

__all__ = ["RESUME_MAY_CHANGE", "check_resumable"]

RESUME_MAY_CHANGE = frozenset({"lr", "scheduler", "warmup_ratio", "max_steps", "epochs", "eval_data",
                               "eval_every", "eval_metric", "eval_samples", "eval_max_new_tokens", "save_best",
                               "save_every", "keep_checkpoints", "log_every", "progress", "skip_bad_steps",
                               "report_to", "output_dir", "dist_timeout"})
"""Keys a resumed run may change (they then take effect); any other change is refused."""


def check_resumable(ckpt: Path, config: dict[str, Any], world: int) -> None:
    """Refuse to resume `ckpt` with `config` (`TrainConfig.to_dict()`) on `world` processes when the run's settings
    or its process count changed; called before loading (a changed r would otherwise fail on shapes)."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        saved, saved_world = state.get("config"), state.get("world", world)
    except (OSError, ValueError, AttributeError) as e:
        raise PeftkitError(f"checkpoint {ckpt} is unreadable: {e}") from None
    if saved is None:
        return  # a checkpoint without its run's config: nothing to compare
    if saved_world != world:
        raise PeftkitError(f"cannot resume {ckpt}: the run had {saved_world} process(es), this one has {world} "
                           "(the data order, the batch and each rank's random state depend on it); resume with "
                           f"{saved_world}, or start a new run")
    changed = [k for k in config if k not in RESUME_MAY_CHANGE and saved.get(k, config[k]) != config[k]]
    if changed:
        listed = "; ".join(f"{k}: {saved[k]!r} -> {config[k]!r}" for k in changed)
        raise PeftkitError(f"cannot resume {ckpt}: the run's settings changed ({listed}). Only "
                           f"{', '.join(sorted(RESUME_MAY_CHANGE - {'output_dir'}))} may change on resume; "
                           "start a new run (--overwrite or another output_dir) to change the others")
