"""Compare: chosen runs' loss curves overlaid and their final metrics in one table, and the tables ``peftkit compare``
wrote in the workspace (``results.json``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from peftkit.studio.runfolders import Runs
from peftkit.studio.workspace import StudioError

__all__ = ["CompareRequest", "router", "run_summary"]

_CURVE_KEYS = ("step", "loss", "eval_loss")


class CompareRequest(BaseModel):
    runs: list[str] = Field(min_length=1, max_length=32)


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def _estimated_peak(runs: Runs, recipe: dict[str, Any]) -> int | None:
    """The estimator's peak for the run's recipe (None when the recipe or the model's geometry is unknown)."""
    from peftkit import memory as M
    from peftkit.studio.plan import model_arch

    if not recipe.get("model"):
        return None
    try:
        quant = recipe.get("quantize")
        setup = M.TrainSetup(method=recipe.get("method", "lora"), method_args=recipe.get("method_config") or {},
                             precision=recipe.get("precision", "auto"), quant=None if quant == "none" else quant,
                             double_quant=bool(quant not in (None, "none") and recipe.get("double_quant", True)
                                               and quant != "int8"),
                             optimizer=recipe.get("optimizer", "adamw"), batch_size=recipe.get("batch_size", 2),
                             seq_len=recipe.get("max_length", 512),
                             gradient_checkpointing=bool(recipe.get("gradient_checkpointing")))
        return M.estimate(model_arch(runs.ws, recipe["model"]), setup).peak_bytes
    except ValueError:
        return None


def run_summary(runs: Runs, run_id: str) -> dict[str, Any]:
    """One run's curve (step, loss, eval loss), its final metrics, and its estimated memory."""
    folder = runs.folder(run_id)
    records = _records(folder / "metrics.jsonl")
    last = records[-1] if records else {}
    evals = {k: v for r in records for k, v in r.items() if k.startswith("eval_")}  # the latest of each
    speeds = [r["target_tokens_per_s"] for r in records if isinstance(r.get("target_tokens_per_s"), (int, float))]
    recipe = runs.recipe(folder)
    return {
        "id": runs.ws.relative(folder), "status": runs.describe(folder)["status"],
        "curve": [{k: r[k] for k in _CURVE_KEYS if k in r} for r in records],
        "final": {"steps": last.get("step", 0), "loss": last.get("loss"), **evals,
                  "tokens_per_s": statistics.median(speeds) if speeds else None,
                  "mfu": last.get("mfu"), "method": recipe.get("method"),
                  "estimated_peak_bytes": _estimated_peak(runs, recipe)},
    }


def compare_results(runs: Runs) -> list[dict[str, Any]]:
    """Every ``results.json`` of ``peftkit compare`` under the workspace, with its rows."""
    out = []
    for path in sorted(runs.ws.root.rglob("results.json")):
        if not path.resolve().is_relative_to(runs.ws.root):
            continue
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
            out.append({"path": runs.ws.relative(path), "rows": rows})
    return out


def router(runs: Runs) -> APIRouter:
    r = APIRouter(prefix="/compare")

    @r.post("")
    def compare(body: CompareRequest) -> dict[str, Any]:
        if len(set(body.runs)) != len(body.runs):
            raise StudioError("runs: each run once")
        return {"runs": [run_summary(runs, run) for run in body.runs]}

    @r.get("/results")
    def results() -> dict[str, Any]:
        return {"tables": compare_results(runs)}

    return r
