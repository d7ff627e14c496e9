"""Plan: a model and a training setup -> trainable parameters and the estimator's memory, beside every method.

The numbers are `peftkit.memory`'s (what ``peftkit memory`` and ``peftkit info`` print): computed from the model's
``config.json`` alone, so a 70B hub model plans in milliseconds without its weights.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from peftkit import memory as M
from peftkit.core.config import parse_override
from peftkit.core.registry import resolve_method
from peftkit.memory.arch import Arch, arch_from_config
from peftkit.studio.workspace import StudioError, Workspace

__all__ = ["PlanRequest", "machine_memory", "model_arch", "plan", "router"]


class PlanRequest(BaseModel):
    model: str = "smollm2-135m-instruct"
    method: str = "lora"
    settings: str = ""  # the method's keys as on the command line: "r=16 target_modules=[q_proj,v_proj]"
    precision: str = "auto"
    quant: str | None = None
    double_quant: bool = False
    optimizer: str = "adamw"
    batch_size: int = Field(2, ge=1, le=65536)
    seq_len: int = Field(512, ge=1, le=1 << 20)
    gradient_checkpointing: bool = False
    device_memory: str | None = None  # e.g. "24GB"; default: this machine's


_ARCHS: dict[str, Arch] = {}
_ARCHS_LOCK = threading.Lock()


def model_arch(ws: Workspace, model: str) -> Arch:
    """The geometry of `model`: a preset or the bundled name, a model folder or ``.gguf`` under the workspace, or a
    hub id (its ``config.json`` only). Blocking (a ``.gguf`` converts once, a hub id downloads its config).

    Raises:
        StudioError: 404 for a model that is none of these, 403 for a path outside the workspace.
    """
    key = model.strip()
    with _ARCHS_LOCK:
        if key in _ARCHS:
            return _ARCHS[key]
    arch = _resolve_arch(ws, key)
    with _ARCHS_LOCK:
        _ARCHS[key] = arch
    return arch


def _resolve_arch(ws: Workspace, model: str) -> Arch:
    from peftkit.models import resolve_model_path

    if not model:
        raise StudioError("model: give a model (a folder or .gguf in the workspace, a hub id, or a preset)")
    if ws.is_path_like(model):
        path = ws.existing(model, "model")
        folder = resolve_model_path(path) if path.suffix == ".gguf" else path
        try:
            return M.load_arch(folder)
        except ValueError as e:
            raise StudioError(f"model {model!r}: {e}") from None
    try:
        return M.load_arch(model)  # a preset (the bundled model is one)
    except ValueError:
        pass
    if model.count("/") == 1 and not model.startswith("/"):
        from transformers import AutoConfig

        try:
            resolve_model_path(model)  # fails fast, in one line, when offline and not cached
            return arch_from_config(AutoConfig.from_pretrained(model).to_dict(), name=model)
        except (OSError, ValueError) as e:
            raise StudioError(f"model {model!r}: {str(e).splitlines()[0]}", 404) from None
    raise StudioError(f"unknown model {model!r}: not a folder or .gguf in the workspace, not a hub id (owner/name), "
                      f"and not a preset ({', '.join(M.PRESETS)})", 404)


def machine_memory() -> tuple[int, str]:
    """(bytes, label) of the memory training would use here: the first GPU's, else the machine's RAM."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), f"GPU {props.name}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def _setup(body: PlanRequest) -> M.TrainSetup:
    try:
        settings = dict(parse_override(s) for s in body.settings.split())
        return M.TrainSetup(method=body.method, method_args=settings, precision=body.precision, quant=body.quant,
                            double_quant=body.double_quant, optimizer=body.optimizer, batch_size=body.batch_size,
                            seq_len=body.seq_len, gradient_checkpointing=body.gradient_checkpointing)
    except ValueError as e:
        raise StudioError(str(e).splitlines()[0]) from None


def _row(name: str, bd: M.Breakdown) -> dict[str, Any]:
    return {"method": name, "trainable": bd.params_trainable, "components": bd.components,
            "total_bytes": bd.total_bytes, "peak_bytes": bd.peak_bytes, "host_bytes": bd.optimizer_host,
            "notes": list(bd.notes)}


def plan(ws: Workspace, body: PlanRequest) -> dict[str, Any]:
    """The estimate of `body`'s setup, the device it is measured against, and every method on the same setup."""
    arch = model_arch(ws, body.model)
    setup = _setup(body)
    try:
        chosen = M.estimate(arch, setup)
    except ValueError as e:  # a setting this model cannot take: a rank above a layer's width, no such target
        raise StudioError(f"{body.method} on {arch.name}: {str(e).splitlines()[0]}") from None
    if body.device_memory:
        try:
            device, label = M.parse_bytes(body.device_memory), body.device_memory
        except ValueError as e:
            raise StudioError(f"device_memory: {e}") from None
    else:
        device, label = machine_memory()
    rows = M.compare(arch, setup)  # each method with its defaults and the keys of `settings` it has
    return {"model": {"name": arch.name, "params": arch.num_params, "layers": arch.layers, "hidden": arch.hidden},
            "precision": setup.precision, "chosen": _row(body.method, chosen),
            "device": {"bytes": device, "label": label, "fits": chosen.peak_bytes <= device},
            "methods": [_row(name, bd) for name, bd in rows.items()]}


def options() -> dict[str, Any]:
    """What the plan form offers: methods (with each one's default settings), precisions, formats, optimizers."""
    methods = {}
    for name in M.METHODS:
        spec, preset = resolve_method(name)
        defaults = dataclasses.asdict(spec.config_cls())
        methods[name] = {"defaults": {k: v for k, v in defaults.items() if not k.startswith("_")},
                         "preset_of": spec.name if preset is not None else None}
    return {"methods": methods, "precisions": list(M.PRECISIONS), "quants": [q for q in M.QUANTS if q],
            "optimizers": list(M.OPTIMIZERS), "presets": list(M.PRESETS)}


def router(ws: Workspace) -> APIRouter:
    r = APIRouter(prefix="/plan")

    @r.get("/options")
    def get_options() -> dict[str, Any]:
        return options()

    @r.post("")
    def post_plan(body: PlanRequest) -> dict[str, Any]:  # sync: FastAPI runs it in its thread pool
        return plan(ws, body)

    return r
