"""Run an adapted model as its base model, for a while: the reference model of preference tuning (DPO), with no
second copy of the weights.

What "the adapter off" means follows from how a method adapted the model (its `InjectReport`), not from its name:

* a method that swapped layers (LoRA, QLoRA, DoRA, (IA)^3, bottleneck adapters, sparse updates, intrinsic SAID)
  reported the original layers; they share the frozen tensors with the adapted ones, so putting them back on their
  parents runs the base model itself (for PiSSA / OLoRA too: the original layer keeps W0, not the residual);
* a method that adds inputs through hooks (prompt and prefix tuning) has an encoder with an ``enabled`` switch;
* a method that trains the base weights themselves (full fine-tuning, BitFit, norms, top-k layers) has nothing to
  switch off: `check_disable` says so in one line.

`adapter_disabled` always puts the adapter back, an exception included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

from torch import nn

from peftkit.core.inject import AdapterModule, InjectReport, get_submodule_parent
from peftkit.errors import PeftkitError

__all__ = ["adapter_disabled", "check_disable"]


def _switches(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, AdapterModule) and isinstance(getattr(m, "enabled", None),
                                                                                      bool)]


def check_disable(model: nn.Module, report: InjectReport) -> None:
    """Raise unless the base model can be run from `model` with its adapter off (see the module notes)."""
    if report.originals or _switches(model):
        return
    raise PeftkitError(f"method {report.method!r} trains the base weights themselves, so there is no adapter to "
                       "switch off for the reference model; use an adapter method (lora, qlora, dora, ia3, ...)")


@contextlib.contextmanager
def adapter_disabled(model: nn.Module, report: InjectReport) -> Iterator[nn.Module]:
    """Within the block, `model` computes its base model (the original layers back, hook encoders off); afterwards,
    and after an exception, the adapted model again. Yields `model`.

    Raises:
        PeftkitError: the method trains the base weights (`check_disable`).
    """
    check_disable(model, report)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    switches = [m for m in _switches(model) if m.enabled]
    try:
        for name, original in report.originals.items():
            parent, child = get_submodule_parent(model, name)
            swapped.append((parent, child, getattr(parent, child)))
            setattr(parent, child, original)
        for module in switches:
            cast(Any, module).enabled = False  # the encoder's own switch (prompt, prefix tuning)
        yield model
    finally:
        for parent, child, adapted in reversed(swapped):
            setattr(parent, child, adapted)
        for module in switches:
            cast(Any, module).enabled = True
