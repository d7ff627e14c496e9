"""`inject()`: walk a model, replace the modules that match the targets, report what changed.

Targets are exact module-name suffixes (``q_proj`` matches ``model.layers.0.self_attn.q_proj``) or, when given
as one string, a regular expression matched against the full module name. A requested target that matches
nothing is an error listing close matches, never silently skipped.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterator, Sequence

from torch import nn

from peftkit.errors import PeftkitError

__all__ = [
    "AdapterModule",
    "InjectReport",
    "adapter_parameters",
    "freeze_all",
    "get_submodule_parent",
    "inject",
    "match_modules",
]


class AdapterModule:
    """Marker mixin for modules that add trainable parameters: `adapter_params()` names them (structure,
    not substring matching, decides what is trainable)."""

    def adapter_params(self) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield ``(full name, parameter)`` for every parameter owned by an `AdapterModule` in `model`."""
    for mod_name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            for pname in module.adapter_params():
                full = f"{mod_name}.{pname}" if mod_name else pname
                yield full, model.get_parameter(full)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


@dataclasses.dataclass
class InjectReport:
    """What `inject()` (or a method's `apply()`) did.

    Attributes:
        method: registry name of the method.
        adapted: names of the modules that were replaced or adapted.
        originals: the replaced modules, by name, so that the change can be undone.
        notes: human-readable remarks (e.g. what a method chose to train).
    """

    method: str
    adapted: list[str] = dataclasses.field(default_factory=list)
    originals: dict[str, nn.Module] = dataclasses.field(default_factory=dict, repr=False)
    notes: list[str] = dataclasses.field(default_factory=list)

    def restore(self, model: nn.Module) -> None:
        """Put the original modules back (used to leave a model unchanged after a failed load)."""
        for name, module in self.originals.items():
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, module)
        self.originals.clear()


def match_modules(
    model: nn.Module,
    targets: str | Sequence[str],
    candidate: Callable[[str, nn.Module], bool],
) -> list[str]:
    """Names of the candidate modules matching `targets` (suffix list or one regex).

    Raises:
        PeftkitError: a target matches no candidate module; the message lists close matches.
    """
    names = [n for n, m in model.named_modules() if n and candidate(n, m)]
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise PeftkitError(f"target_modules regex {targets!r} is invalid: {e}") from None
        matched = [n for n in names if pattern.fullmatch(n)]
        if not matched:
            raise PeftkitError(f"target_modules regex {targets!r} matches no module; candidates look like: "
                               f"{', '.join(names[:5])}")
        return matched
    found: list[str] = []
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            close = difflib.get_close_matches(target, suffixes, n=5, cutoff=0.4) or suffixes[:8]
            raise PeftkitError(f"target module {target!r} matches nothing in {type(model).__name__}; "
                               f"close matches: {', '.join(close)}")
        found += [h for h in hits if h not in found]
    return [n for n in names if n in found]  # model order


def inject(
    model: nn.Module,
    method: str,
    targets: str | Sequence[str],
    candidate: Callable[[str, nn.Module], bool],
    build: Callable[[str, nn.Module], nn.Module],
) -> InjectReport:
    """Replace every matching module by ``build(name, module)`` on its parent.

    Args:
        model: the model, changed in place.
        method: method name, for the report.
        targets: module-name suffixes, or one regex over full names.
        candidate: which modules may be targeted at all (e.g. linear layers).
        build: makes the replacement module from the original.
    """
    report = InjectReport(method)
    for name in match_modules(model, targets, candidate):
        parent, child = get_submodule_parent(model, name)
        original = getattr(parent, child)
        setattr(parent, child, build(name, original))
        report.adapted.append(name)
        report.originals[name] = original
    return report
