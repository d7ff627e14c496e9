"""The adapters a server serves: read from disk in one place (`AdapterRegistry.load`), checked against the served
base, attached between two steps, and unloaded once their last request has finished.

Adapters are checked against the served base when they are added (`AdapterRegistry.check`): one whose training
recorded another base (weights fingerprint, `peftkit.core.context.fingerprint`) is refused, since it would answer
garbage without saying so; one trained on a base stored differently (QLoRA's NF4 base served in full precision, or
the other way round) is served with a warning, kept in `AdapterRegistry.warnings`.

With an adapter root (``peftkit serve --adapter-root DIR``) adapters load only from folders under it, symlinks
resolved first (the folder's and those of the files in it), and a path outside the root gets the same error as a
missing one, which names neither: a client learns nothing about the files outside. Without a root, clients cannot
load adapters at all (403); adapters named on the command line load from where they are.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
from collections.abc import Callable
from pathlib import Path

from torch import nn

from peftkit.core.context import Quantization, TrainingContext
from peftkit.errors import PeftkitError
from peftkit.serve.lora_batch import LoRABatch, LoRAWeights, read_lora
from peftkit.serve.request import ServeError

__all__ = ["NOT_UNDER_ROOT", "AdapterRegistry", "adapter_folder", "resolve_root"]

NOT_UNDER_ROOT = ("adapter file missing: the path is not an adapter folder under the server's adapter root "
                  "(a relative path starts at the root)")


def resolve_root(path: str | os.PathLike) -> Path:
    """The adapter root `path`, symlinks resolved; an error unless it is a folder."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise PeftkitError(f"--adapter-root {path}: not a folder (give the folder adapters may be loaded from)")
    return root


def adapter_folder(root: Path | None, path: str | os.PathLike) -> Path:
    """The folder to read an adapter from: `path` (relative to `root`) with its symlinks resolved, if it and the
    files in it lie under `root`; `path` as given without a root.

    Raises:
        ServeError: the folder is missing, not a folder, or outside the root: one message for all, naming no path.
    """
    if root is None:
        return Path(path)
    try:
        folder = (root / path).resolve()
        inside = folder.is_relative_to(root) and folder.is_dir()
        inside = inside and all(entry.resolve().is_relative_to(root) for entry in folder.iterdir())
    except (OSError, ValueError):  # unreadable, a loop of links, a NUL byte: the same answer as missing
        inside = False
    if not inside:
        raise ServeError(NOT_UNDER_ROOT, code="adapter_not_found", param="path")
    return folder


class AdapterRegistry:
    """The adapters attached to the served base (`lora`), what their training recorded, and their requests in flight.

    Args:
        model: the served base.
        base_name: the name requests use for it.
        base_fingerprint: its weights' fingerprint before quantizing (None: adapters cannot be checked against it).
        quantization: how its linear layers are stored (None: full precision).
        allow_base_mismatch: serve adapters trained on another base (with a warning) instead of refusing them.
        root: the folder adapters load from (`adapter_folder`); None: anywhere, and clients may not load any.
        lock: the engine's lock (the registry's counts change under it).
        between_steps: runs a function on the engine thread between two steps.
    """

    def __init__(self, model: nn.Module, base_name: str, base_fingerprint: str | None,
                 quantization: Quantization | None, allow_base_mismatch: bool, root: Path | None,
                 lock: threading.Condition, between_steps: Callable[[Callable[[], None]], None]) -> None:
        self.lora = LoRABatch(model)
        self.base_name = base_name
        self.base_fingerprint = base_fingerprint
        self.quantization = quantization
        self.allow_base_mismatch = allow_base_mismatch
        self.root = root
        self.folders: dict[str, str] = {}
        self.contexts: dict[str, TrainingContext | None] = {}
        self.warnings: dict[str, list[str]] = {}  # adapter name -> what `check` said when it was added
        self._lock = lock
        self._between_steps = between_steps
        self._refs: collections.Counter[str] = collections.Counter()  # requests in flight per model name
        self._draining: dict[str, concurrent.futures.Future] = {}
        self._reserved: set[str] = set()

    # ---- names and requests (the caller holds the lock)

    def names(self) -> list[str]:
        """The names requests may use: the base model, then the adapters (those being unloaded left out)."""
        return [self.base_name] + [n for n in self.lora.names if n not in self._draining]

    def serves(self, model: str) -> bool:
        return model == self.base_name or (model in self.lora.names and model not in self._draining)

    def unknown(self, model: str) -> ServeError:
        return ServeError(f"model {model!r} does not exist; available: {', '.join(self.names())}", status=404,
                          code="model_not_found", param="model")

    def slot(self, model: str) -> int:
        """The `LoRABatch` slot of `model` (0: the base)."""
        return 0 if model == self.base_name else self.lora.slot(model)

    def acquire(self, model: str) -> None:
        self._refs[model] += 1

    def release(self, model: str) -> None:
        with self._lock:
            self._refs[model] -= 1

    def drained(self) -> bool:
        """Whether an adapter being unloaded has no request left (the engine thread then detaches it)."""
        return any(self._refs[name] == 0 for name in self._draining)

    def unload_drained(self) -> None:
        for name in [n for n in self._draining if self._refs[n] == 0]:
            future = self._draining.pop(name)
            self.lora.remove(name)
            for facts in (self.folders, self.contexts, self.warnings):
                facts.pop(name, None)
            future.set_result(name)

    # ---- adding and removing

    def load(self, name: str, path: str | os.PathLike, allow_base_mismatch: bool | None = None,
             remote: bool = False) -> concurrent.futures.Future:
        """Read the LoRA adapter folder `path` and attach it as `name` (`add`): the one place the server loads an
        adapter from disk. `remote`: a client asked (refused without a root). Blocks while reading.

        Raises:
            ServeError: loading is off (403), the name is taken (409), the path is not an adapter folder under
                the root (400, naming no path), or the adapter does not fit the base (400).
            PeftkitError: the folder holds no readable LoRA adapter for this model.
        """
        if remote and self.root is None:
            raise ServeError("this server loads no adapters at run time: start it with --adapter-root DIR to load "
                             "them from under DIR", status=403, code="adapter_loading_disabled", param="path")
        self._refuse_taken(name)
        weights = read_lora(adapter_folder(self.root, path), self.lora.model)
        return self.add(name, weights, allow_base_mismatch)

    def add(self, name: str, weights: LoRAWeights,
            allow_base_mismatch: bool | None = None) -> concurrent.futures.Future:
        """Check an adapter already read (`check`: its warnings go to ``warnings[name]``) and attach it between two
        steps; the future resolves once requests can use it.

        Raises:
            ServeError: the name is taken (409), or the adapter was trained on another base (400).
        """
        self._refuse_taken(name)
        warnings = self.check(name, weights, allow_base_mismatch)
        with self._lock:
            self._refuse_taken(name)
            self._reserved.add(name)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def install() -> None:
            try:
                self.lora.add(name, weights)
                self.folders[name] = weights.folder
                self.contexts[name] = weights.context
                self.warnings[name] = warnings
                future.set_result(name)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)
            finally:
                self._reserved.discard(name)

        self._between_steps(install)
        return future

    def _refuse_taken(self, name: str) -> None:
        with self._lock:
            if name == self.base_name or name in self.lora.names or name in self._reserved:
                raise ServeError(f"a model named {name!r} is already served", status=409, code="model_exists")

    def remove(self, name: str) -> concurrent.futures.Future:
        """Stop taking requests for adapter `name`; the future resolves once its last request has finished
        and it is detached."""
        with self._lock:
            if name == self.base_name:
                raise ServeError(f"{name!r} is the base model; only adapters can be unloaded", param="name")
            if name not in self.lora.names:
                raise ServeError(f"no adapter named {name!r} is loaded", status=404, code="model_not_found")
            if name in self._draining:
                return self._draining[name]
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._draining[name] = future
            self._lock.notify_all()
        return future

    def check(self, name: str, weights: LoRAWeights, allow_base_mismatch: bool | None = None) -> list[str]:
        """Check an adapter's recorded training context against the served base; returns the warnings.

        Raises:
            ServeError: its training recorded a base with other weights (400), unless `allow_base_mismatch` (default:
                the registry's) turns that into a warning.
        """
        context = weights.context
        if context is None:
            return []
        warnings = []
        trained = f"{context.base or 'a base'} (fingerprint {context.fingerprint})"
        if context.fingerprint is not None and self.base_fingerprint is None:
            warnings.append(f"adapter {name!r} records the base it was trained on, {trained}, but the served base "
                            "was quantized before its fingerprint was taken: it cannot be checked")
        elif context.fingerprint is not None and context.fingerprint != self.base_fingerprint:
            problem = (f"adapter {name!r} ({weights.folder}) was trained on {trained}, not on the served base "
                       f"{self.base_name} (fingerprint {self.base_fingerprint}): its answers would be garbage")
            allow = self.allow_base_mismatch if allow_base_mismatch is None else allow_base_mismatch
            if not allow:
                raise ServeError(problem + "; serve it on its own base, or allow it (--allow-base-mismatch, or "
                                 '"allow_base_mismatch": true when loading it)', code="base_mismatch", param="path")
            warnings.append(problem + " (served as asked)")
        if not _same_storage(context.quantization, self.quantization):
            warnings.append(f"adapter {name!r} was trained on a {_storage(context.quantization)} base and is served on "
                            f"a {_storage(self.quantization)} one: its answers differ from `peftkit generate`'s "
                            "(start the server with the --quantize it was trained with)")
        return warnings


def quantization_of(model: nn.Module) -> Quantization | None:
    """How the base's linear layers are stored (the first quantized layer's format), None for full precision."""
    from peftkit.quant import QuantLinear

    layer = next((m for m in model.modules() if isinstance(m, QuantLinear)), None)
    return None if layer is None else Quantization(layer.format, layer.block_size, layer.double_quant)


def _same_storage(a: Quantization | None, b: Quantization | None) -> bool:
    """Whether two bases store their weights alike (format, block size and double quantization)."""
    if a is None or b is None:
        return a is b
    return (a.format, a.block_size, a.double_quant) == (b.format, b.block_size, b.double_quant)


def _storage(q: Quantization | None) -> str:
    return "full-precision" if q is None else q.describe()
