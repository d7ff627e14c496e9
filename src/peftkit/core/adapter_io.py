"""Adapter files in the Hugging Face ``peft`` layout.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors``; tensor keys are
``base_model.model.<parameter name>`` (e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``).
Methods that peft knows (LoRA, prompt and prefix tuning) write peft's config fields and load in peft; the
others use the same layout with ``peft_type`` set to peftkit's method name.

Adapter modules whose file form differs from their trainable parameters implement `AdapterFileState`
(prompt and prefix tuning write peft's single ``prompt_embeddings`` tensor, with the prefix MLP folded away;
sparse updates write values and indices). Configs may define ``peft_fields(model)`` (extra peft config fields),
``peft_unsupported`` (peft options with their neutral values: a file setting one otherwise is refused) and
``for_loading()`` (the config to rebuild the adapter with before its weights are loaded, e.g. without an
initialisation that needs a tokenizer).

A model trained by `Trainer` carries a `TrainingContext` (``model.peftkit_context``: base, quantization, chat
template, prompt); it is written to its own file, ``peftkit.json`` (peft then loads the folder without a warning
about unknown config keys; older folders with the record under the ``peftkit`` key of ``adapter_config.json`` still
read), and its base name replaces the resolved (machine-local) path in ``base_model_name_or_path``. Loading an
adapter sets it on the model again.

Loading validates the file before touching the model (`check_adapter`, the one check every command runs: files,
record version, no tensor missing or extra, every shape), and restores the model if applying the adapter fails.
Saving writes to a temporary folder and renames it into place, so an interrupted save never leaves a
half-written adapter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.core.config import Config
from peftkit.core.context import RECORD_NAME, TrainingContext, read_config_json, read_context
from peftkit.core.inject import InjectReport
from peftkit.core.registry import MethodSpec, get_method, method_for_peft_type
from peftkit.errors import PeftkitError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # what older peft wrote (torch.save): refused, never unpickled
PREFIX = "base_model.model."
# peft's prompt-learning methods store one tensor under this key, outside the ``base_model.model.`` namespace.
TOP_LEVEL_KEYS = ("prompt_embeddings",)

__all__ = [
    "AdapterFileState",
    "CheckedAdapter",
    "apply_method",
    "atomic_dir",
    "check_adapter",
    "is_disk_full",
    "load_adapter",
    "read_adapter",
    "save_adapter",
    "trainable_state_dict",
    "write_atomic_dir",
    "writing",
]


@runtime_checkable
class AdapterFileState(Protocol):
    """An adapter module that writes and reads its own tensors in the adapter file.

    Keys are file keys without the ``base_model.model.`` prefix (model names such as ``x.sparse_values``, or a
    top-level peft key such as ``prompt_embeddings``). The module's parameters are then left out of the default
    "trainable parameters under their names" layout.
    """

    def adapter_file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors to save for this module, which sits at `name` in the model."""
        ...

    def load_adapter_file_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Load this module's tensors, popping its keys from `tensors`; raise `PeftkitError` if they do not fit."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The module's parameters (every implementer is an `nn.Module`)."""
        ...


def _file_state_modules(model: nn.Module) -> list[tuple[str, AdapterFileState]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterFileState)]


def _file_key(key: str) -> str:
    return key if key in TOP_LEVEL_KEYS else PREFIX + key


def apply_method(model: nn.Module, method: str, config: Config | dict[str, Any] | None = None) -> InjectReport:
    """Adapt `model` in place with a registered method and return the report."""
    spec = get_method(method)
    if config is None:
        config = spec.config_cls()
    elif isinstance(config, dict):
        config = spec.config_cls.from_dict(config)
    report = spec.apply(model, config)
    # torch types Module.__setattr__ for tensors and modules only; it sets any other value as a plain attribute
    model.peftkit_method = (spec.name, config)  # type: ignore[assignment]  # what save_adapter() writes
    return report


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (what an adapter file holds), under their model names."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the adapter file holds, under file keys without the ``base_model.model.`` prefix."""
    custom = _file_state_modules(model)
    owned = {id(p) for _, m in custom for p in m.parameters()}
    tensors = {n: p for n, p in trainable_state_dict(model).items() if id(model.get_parameter(n)) not in owned}
    for name, module in custom:
        tensors.update({k: v.detach() for k, v in module.adapter_file_tensors(name).items()})
    return tensors


def _peft_config(spec: MethodSpec, config: Config, model: nn.Module) -> dict[str, Any]:
    data: dict[str, Any] = {
        "peft_type": spec.peft_type or spec.name,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "inference_mode": True,
        # peft's own record of the architecture; checked on load
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
    }
    if spec.peft_type is None:
        data["peftkit_method"] = spec.name
    data.update(config.to_dict())
    if hasattr(config, "peft_fields"):
        data.update(config.peft_fields(model))
    for key in getattr(config, "peftkit_only_fields", ()):  # fields peft does not know: left out when unset
        if data.get(key) is None:
            data.pop(key, None)
    context: TrainingContext | None = getattr(model, "peftkit_context", None)
    if context is not None and context.base:
        data["base_model_name_or_path"] = context.base
    return data


def current_umask() -> int:
    """The process umask (read by setting it, then setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from or during, says the disk (or quota) is full.

    torch.save reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:...]``, with the
    `OSError` as its context when it wrote to a Python file object; safetensors as a `SafetensorError` whose
    message carries the OS error.
    """
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current) or f"os error {errno.ENOSPC})" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while writing `path` into one line naming it (any other error passes through)."""
    try:
        yield
    except Exception as e:
        if not isinstance(e, PeftkitError) and is_disk_full(e):
            raise PeftkitError(f"no space left on device while writing {path}; nothing was replaced (free some "
                               "space and try again)") from None
        raise


@contextlib.contextmanager
def atomic_dir(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `folder`, on error it is removed.

    A crash mid-write leaves the previous `folder` intact (at worst a hidden ``.name.tmp-*`` folder remains); a
    full disk is a `PeftkitError` naming `folder`.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700: the folder follows the umask like any other
    try:
        with writing(folder):
            yield tmp
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic_dir(folder: str | os.PathLike, files: dict[str, Any]) -> Path:
    """Write a folder atomically; `files` maps file names to bytes, str, or a callable ``f(path)``."""
    with atomic_dir(folder) as tmp:
        for name, content in files.items():
            path = tmp / name
            with writing(Path(folder) / name):
                if callable(content):
                    content(path)
                elif isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(content)
    return Path(folder)


def save_adapter(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Save the adapter of `model` (adapted with `apply_method`) in the peft layout."""
    if not hasattr(model, "peftkit_method"):
        raise PeftkitError("this model has no peftkit adapter (adapt it with apply_method first)")
    method: Any = model.peftkit_method  # (name, config), set by apply_method
    name, config = method
    spec = get_method(name)
    tensors = {_file_key(k): v.contiguous() for k, v in _adapter_tensors(model).items()}
    files: dict[str, Any] = {
        CONFIG_NAME: json.dumps(_peft_config(spec, config, model), indent=2, sort_keys=True),
        WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
    }
    context: TrainingContext | None = getattr(model, "peftkit_context", None)
    if context is not None:  # its own file: peft warns about keys it does not know in adapter_config.json
        files[RECORD_NAME] = json.dumps(context.to_json(), indent=2, sort_keys=True)
    return write_atomic_dir(folder, files)


def read_adapter(
    folder: str | os.PathLike, model: nn.Module | None = None
) -> tuple[MethodSpec, Config, dict[str, torch.Tensor]]:
    """Read and validate an adapter folder (peftkit's or peft's) without touching any model.

    With `model`, also check that the adapter was saved for the same architecture.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    pickled = folder / PICKLE_WEIGHTS_NAME
    if not w_path.is_file() and pickled.is_file():
        raise PeftkitError(f"{pickled} is a pickle file; peftkit loads only {WEIGHTS_NAME}, since loading a pickle "
                           f"can run code (convert it with: {_convert_command(pickled)})")
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise PeftkitError(f"adapter file missing: {path}")
    raw = read_config_json(cfg_path)
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise PeftkitError(f"{cfg_path} has no peft_type")
    saved_for = (raw.get("auto_mapping") or {}).get("base_model_class")
    if model is not None and saved_for and saved_for != type(model).__name__:
        raise PeftkitError(f"adapter in {folder} was saved for a {saved_for}, not a {type(model).__name__}")
    spec = get_method(raw["peftkit_method"]) if "peftkit_method" in raw else method_for_peft_type(raw["peft_type"], raw)
    config = _config_from_json(spec, raw, cfg_path)
    read_context(folder)  # validated before the weights are read: a bad record fails early
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PeftkitError(f"{w_path} is corrupt or truncated: {e}") from None
    bad = [k for k in tensors if not k.startswith(PREFIX) and k not in TOP_LEVEL_KEYS]
    if bad:
        raise PeftkitError(f"{w_path}: unexpected tensor names (not under {PREFIX!r}): {', '.join(bad[:3])}")
    return spec, config, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def _convert_command(pickled: Path) -> str:
    """A one-line command that rewrites a peft ``adapter_model.bin`` as safetensors (``weights_only``: tensors and
    plain containers only, so even this one load runs no code from the file)."""
    out = pickled.with_name(WEIGHTS_NAME)
    script = (f"import torch, safetensors.torch as st; st.save_file(torch.load({str(pickled)!r}, weights_only=True), "
              f"{str(out)!r}, metadata={{'format': 'pt'}})")
    return "python -c " + shlex.quote(script)  # quoted whole: a folder named $(...) stays a name when pasted


def _config_from_json(spec: MethodSpec, raw: dict[str, Any], where: Path) -> Config:
    """Keep the fields peftkit's config has; refuse peft features it does not implement."""
    for key, neutral in getattr(spec.config_cls, "peft_unsupported", {}).items():
        if raw.get(key, neutral) not in (neutral, None, {}, False, "none"):
            raise PeftkitError(f"{where}: peft option {key}={raw[key]!r} is not supported by peftkit")
    fields = {k: raw[k] for k in spec.config_cls.keys() if k in raw}
    return spec.config_cls.from_dict(fields, where=f"{where}: ")


@dataclasses.dataclass(frozen=True)
class CheckedAdapter:
    """An adapter folder that `check_adapter` found whole and fitting its model.

    Attributes:
        folder: where it was read from.
        spec: its method.
        config: its method config.
        tensors: its tensors under model names (file keys without ``base_model.model.``).
        context: what its training recorded (`peftkit.core.context`), None for adapters without a record.
    """

    folder: Path
    spec: MethodSpec
    config: Config
    tensors: dict[str, torch.Tensor]
    context: TrainingContext | None


def check_adapter(folder: str | os.PathLike, model: nn.Module) -> CheckedAdapter:
    """The validation every command runs before it uses an adapter (generate, merge, export, serve).

    Checks the files (present, not a pickle, JSON, safetensors not corrupt), the ``peftkit`` record (its version
    and fields), the architecture it was saved for, and that its tensors are exactly the ones its method and
    config make on `model`: none missing (a partial file, or a target module named in the config without
    tensors), none extra, every shape as the model has it. `model` is not changed: the method is applied to a
    skeleton of it on the meta device (no weights).

    Raises:
        PeftkitError: one line naming the file and the problem.
    """
    folder = Path(folder)
    spec, config, tensors = read_adapter(folder, model)
    skeleton = _skeleton(model)
    spec.apply(skeleton, _loading(config))
    _fit(skeleton, folder, config, dict(tensors))
    return CheckedAdapter(folder, spec, config, tensors, read_context(folder))


def _loading(config: Config) -> Config:
    return config.for_loading() if hasattr(config, "for_loading") else config


def _skeleton(model: nn.Module) -> nn.Module:
    """`model`'s structure on the meta device (parameters without storage): what a method's ``apply`` needs to
    say which tensors an adapter must hold. A transformers model is rebuilt from its config (no hooks or other
    state of the live model copied); another module is deep-copied with every tensor replaced by a meta one."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        with torch.device("meta"):
            return type(model)(copy.deepcopy(model.config))
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _fit(model: nn.Module, folder: Path, config: Config, tensors: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """Check that `tensors` are exactly what the adapted `model` holds, with its shapes; modules with their own
    file form (`AdapterFileState`) load and pop their keys. Returns the model's parameters by name."""
    custom = _file_state_modules(model)
    for name, module in custom:  # these pop their own keys
        module.load_adapter_file_tensors(name, tensors)
    owned = {id(p) for _, m in custom for p in m.parameters()}
    own = {n: p for n, p in model.named_parameters() if id(p) not in owned}
    expected = {n for n, p in own.items() if p.requires_grad}
    missing, unexpected = expected - set(tensors), set(tensors) - set(own)
    where = folder / WEIGHTS_NAME
    if missing:
        raise PeftkitError(_missing_message(folder, config, expected, missing))
    if unexpected:
        raise PeftkitError(f"{where} holds {len(unexpected)} tensor(s) this {type(model).__name__} has no place for "
                           f"(e.g. {sorted(unexpected)[0]}): saved for another model or config; use the adapter's "
                           "own base (--model) or re-save it")
    for name, value in tensors.items():
        if own[name].shape != value.shape:
            raise PeftkitError(f"{where}: {name} has shape {tuple(value.shape)}, this {type(model).__name__} expects "
                               f"{tuple(own[name].shape)} (saved for another base model; use its own with --model)")
    return own


def _missing_message(folder: Path, config: Config, expected: set[str], missing: set[str]) -> str:
    """One line: which tensors an incomplete adapter lacks, and the way out."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, (list, tuple)):
        for target in targets:
            wanted = {n for n in expected if f".{target}." in f".{n}"}
            if wanted and wanted <= missing:
                return (f"{folder / CONFIG_NAME}: target_modules names {target!r}, but {WEIGHTS_NAME} holds no "
                        f"{target} tensors; remove {target!r} from target_modules if it was not trained, else "
                        "re-save the adapter from its run")
    return (f"{folder / WEIGHTS_NAME} is incomplete: {len(missing)} of {len(expected)} tensors missing (e.g. "
            f"{sorted(missing)[0]}): cut or edited after training? use the adapter folder as its run wrote it")


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> InjectReport:
    """Adapt `model` with the adapter saved in `folder` and load its weights.

    The adapter is checked first (`check_adapter`); the model is left unchanged if it does not pass.
    """
    checked = check_adapter(folder, model)
    spec, config = checked.spec, checked.config
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    report = None
    try:
        report = spec.apply(model, _loading(config))
        tensors = dict(checked.tensors)
        own = _fit(model, checked.folder, config, tensors)
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value.to(own[name].dtype))
    except BaseException:
        if report is not None:
            report.restore(model)
        for n, p in model.named_parameters():  # apply() froze the base: put the flags back as they were
            p.requires_grad_(requires_grad.get(n, p.requires_grad))
        raise
    # torch types Module.__setattr__ for tensors and modules only; it sets any other value as a plain attribute
    model.peftkit_method = (spec.name, config)  # type: ignore[assignment]
    if checked.context is not None:
        model.peftkit_context = checked.context  # type: ignore[assignment]  # as above
    return report
