"""Many LoRA adapters on one base model, mixed in one batch (per-row adapter, gathered A and B).

For a linear layer W0 and a batch whose row i asks for adapter a(i) (slot 0: the base model):

    y_i = W0 x_i + s_a(i) * B_a(i) (A_a(i) x_i)

The base product runs once for the whole batch (the layer's own forward); a forward hook adds the LoRA terms.
Each adapted layer stacks its adapters' A (slots x r_max x d_in) and B (slots x d_out x r_max), ranks zero-padded
to the largest, with zeros in slot 0 and in the slots of adapters that do not adapt this layer. A mixed batch
gathers the stacks by row and runs two `torch.bmm` for all of its rows (Punica's gathered LoRA, without custom
kernels): each row's products are its own (M=1 per row), the same in any batch. A prefill (one request) takes
`LoRALayer.forward`'s own path (F.linear, then one ``addmm_`` into the base output), as ``peftkit generate`` does;
a decode step takes the gathered path even when its rows all ask for one adapter (`select(..., per_row=True)`), so
that a row's adapter term never depends on the other rows.

Adapters are read with `check_adapter` (peftkit's or Hugging Face peft's files) and checked against the model
before anything changes. Only LoRA batches this way: the other methods change the input or every row's weights
(prompt and prefix tuning, adapters, selective updates), and are refused by `read_lora` with the method named.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.adapter_io import check_adapter
from peftkit.core.context import TrainingContext, read_context
from peftkit.errors import PeftkitError
from peftkit.methods.lora import is_linear, linear_features

__all__ = ["LoRABatch", "LoRAWeights", "read_lora"]


@dataclasses.dataclass
class LoRAWeights:
    """One LoRA adapter as read from its folder.

    Attributes:
        folder: where it was read from.
        r: its rank.
        scale: alpha / r (alpha / sqrt(r) with rsLoRA).
        layers: module name -> (A (r x d_in), B (d_out x r)), in the dtype the layer computes in.
        context: what its training recorded (`peftkit.core.context`), None for adapters without a record.
    """

    folder: str
    r: int
    scale: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    context: TrainingContext | None = None


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a LoRA branch on `module` holds its weights in (as `LoRALayer.from_module` chooses it)."""
    ref = next(iter(module.parameters()), None)
    if ref is not None and ref.is_floating_point():
        return ref.dtype
    return getattr(module, "compute_dtype", torch.float32)


def read_lora(folder: str | os.PathLike, model: nn.Module) -> LoRAWeights:
    """Read a LoRA adapter folder and check that it fits `model`; `model` is not changed.

    Raises:
        PeftkitError: the folder is missing, corrupt, not a LoRA adapter, or does not fit the model (naming the
            layer and the shapes).
    """
    checked = check_adapter(folder, model)  # whole: no tensor missing or extra, every shape fits
    spec, config, tensors = checked.spec, checked.config, checked.tensors
    if not spec.capabilities.batched_serving:
        raise PeftkitError(
            f"adapter in {folder} uses {spec.name}, which cannot share a batch with other adapters; "
            "peftkit serve serves LoRA adapters (merge it with `peftkit merge` and serve the merged model instead)"
        )
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, sep, kind = key.rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight"):
            raise PeftkitError(f"adapter in {folder}: unexpected tensor {key!r} in a LoRA adapter")
        by_layer.setdefault(layer, {})[kind[0]] = tensor
    if not by_layer:
        raise PeftkitError(f"adapter in {folder} holds no LoRA weights")
    linears = {name: m for name, m in model.named_modules() if is_linear(m)}
    layers = {}
    for name, pair in sorted(by_layer.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise PeftkitError(f"adapter in {folder}: layer {name!r} has no {missing} weight")
        module = linears.get(name)
        if module is None:
            raise PeftkitError(f"adapter in {folder} does not fit this {type(model).__name__}: "
                               f"it has no linear layer {name!r}")
        d_in, d_out = linear_features(module)
        a, b = pair["A"], pair["B"]
        if tuple(a.shape) != (config.r, d_in) or tuple(b.shape) != (d_out, config.r):
            raise PeftkitError(
                f"adapter in {folder} does not fit this model: layer {name!r} has A {tuple(a.shape)} and B "
                f"{tuple(b.shape)}, the model expects {(config.r, d_in)} and {(d_out, config.r)} (r={config.r})"
            )
        dtype, device = _compute_dtype(module), next(itertools.chain(module.parameters(), module.buffers())).device
        layers[name] = (a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous())
    return LoRAWeights(str(folder), config.r, config.scale, layers, read_context(folder))


@dataclasses.dataclass
class _Bank:
    """One layer's adapters: each slot's own (A, B, scale), and the zero-padded stacks a mixed batch gathers."""

    single: dict[int, tuple[torch.Tensor, torch.Tensor, float]]
    a: torch.Tensor  # slots x r_max x d_in
    b: torch.Tensor  # slots x d_out x r_max
    scale: torch.Tensor  # slots


class LoRABatch:
    """LoRA adapters attached to one base model by forward hooks, chosen per batch row with `select`.

    The model itself is not modified: no module is replaced, no weight is touched; `close()` removes the hooks.
    Adapters are added and removed between forward passes (`add`, `remove`), never during one.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._linears = {name: m for name, m in model.named_modules() if is_linear(m)}
        self._adapters: dict[str, LoRAWeights] = {}
        self._slots: dict[str, int] = {}
        self._banks: dict[str, _Bank] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._rows: torch.Tensor | None = None
        self._uniform: int | None = 0
        self.version = 0  # bumped by every add and remove (`adapters`)

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def slot(self, name: str) -> int:
        """The slot of adapter `name` (0 is the base model)."""
        return self._slots[name]

    def add(self, name: str, weights: LoRAWeights) -> int:
        """Attach an adapter under `name` and return its slot."""
        if name in self._slots:
            raise PeftkitError(f"an adapter named {name!r} is already loaded")
        used = set(self._slots.values())
        slot = next(s for s in range(1, len(used) + 2) if s not in used)
        self._adapters[name], self._slots[name] = weights, slot
        self._rebuild()
        return slot

    def remove(self, name: str) -> None:
        """Detach adapter `name`; its slot may be given to the next adapter added."""
        del self._adapters[name], self._slots[name]
        self._rebuild()

    def select(self, slots: Iterable[int], per_row: bool = False) -> None:
        """Set the adapter slot of every row of the next forward passes; `per_row`: compute every row's adapter term
        on its own (gathered ``bmm``, M=1 per row), even when all rows ask for one adapter, so that a row's result
        does not depend on the others (batch-invariant decoding, `peftkit.serve.rows`)."""
        slots = list(slots)
        self._uniform = slots[0] if len(set(slots)) == 1 and not (per_row and slots[0]) else None
        self._rows = torch.tensor(slots, dtype=torch.long)

    def adapters(self, layer: str) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
        """Each slot's (A, B, scale) of `layer` (empty when no adapter targets it); for callers that add the terms
        themselves (`peftkit.serve.fast`). `version` changes whenever this may have changed."""
        bank = self._banks.get(layer)
        return {} if bank is None else dict(bank.single)

    def close(self) -> None:
        """Remove every hook: the model is the plain base model again."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._banks.clear()

    def _rebuild(self) -> None:
        targets: dict[str, list[tuple[int, LoRAWeights]]] = {}
        for name, weights in self._adapters.items():
            for layer in weights.layers:
                targets.setdefault(layer, []).append((self._slots[name], weights))
        n_slots = max(self._slots.values(), default=0) + 1
        banks = {}
        for layer, adapters in targets.items():
            d_in, d_out = linear_features(self._linears[layer])
            a0, _ = adapters[0][1].layers[layer]
            r_max = max(w.r for _, w in adapters)
            a = a0.new_zeros(n_slots, r_max, d_in)
            b = a0.new_zeros(n_slots, d_out, r_max)
            scale = a0.new_zeros(n_slots)
            single = {}
            for slot, weights in adapters:
                wa, wb = weights.layers[layer]
                a[slot, : weights.r], b[slot, :, : weights.r], scale[slot] = wa, wb, weights.scale
                single[slot] = (wa, wb, weights.scale)
            banks[layer] = _Bank(single, a, b, scale)
        for layer in set(self._hooks) - set(banks):
            self._hooks.pop(layer).remove()
        for layer in set(banks) - set(self._hooks):
            self._hooks[layer] = self._linears[layer].register_forward_hook(functools.partial(self._hook, layer))
        self._banks = banks
        self.version += 1

    def _hook(self, layer: str, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self._uniform == 0:
            return None
        bank = self._banks[layer]
        x = args[0]
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(bank.a.dtype)  # under autocast the matmuls pick their own dtype (as in LoRALayer)
        if self._uniform is not None:  # one adapter for every row: LoRALayer.forward's own arithmetic
            own = bank.single.get(self._uniform)
            if own is None:
                return None
            a, b, scale = own
            h = F.linear(x, a) * scale
            if out.is_contiguous():
                out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]).to(out.dtype), b.t().to(out.dtype))
                return out
            return out.add_(F.linear(h, b).to(out.dtype))
        return self._gathered(layer, bank, x, out)

    def _gathered(self, layer: str, bank: _Bank, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        rows = self._rows
        if rows is None or x.dim() != 3 or x.shape[0] != rows.numel():
            n = None if rows is None else rows.numel()
            raise PeftkitError(f"layer {layer}: a batch of {tuple(x.shape)} for {n} selected rows")
        h = torch.bmm(x, bank.a.index_select(0, rows).transpose(1, 2)) * bank.scale.index_select(0, rows)[:, None, None]
        delta = torch.bmm(h.to(out.dtype), bank.b.index_select(0, rows).transpose(1, 2).to(out.dtype))
        return out.add_(delta.view(out.shape))
