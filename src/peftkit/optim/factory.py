"""Building an optimizer by name, and the state-memory figures of any optimizer.

Names (``build_optimizer``):

==================== =========================================================================================
``adamw``            ``torch.optim.AdamW``, fused where torch has a fused kernel for the device, else foreach
``adamw_8bit``       :class:`peftkit.optim.AdamW8bit`: 8-bit m and v, 2 + 8/256 bytes per parameter
``paged_adamw_32bit`` :class:`peftkit.optim.PagedAdamW`: 32-bit state in host pages, device budget
``paged_adamw_8bit`` :class:`peftkit.optim.PagedAdamW8bit`: 8-bit state in host pages, device budget
==================== =========================================================================================
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .adamw import AdamW8bit, PagedAdamW, PagedAdamW8bit

OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")


def _tensors(params: list[Any]) -> list[Tensor]:
    out: list[Tensor] = []
    for item in params:
        out.extend(item["params"] if isinstance(item, dict) else [item])
    return out


def build_optimizer(
    name: str,
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    page_budget_bytes: int | None = None,
    device: torch.device | str | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` (see the module docstring for the names).

    Args:
        name: One of :data:`OPTIMIZERS`.
        params: Parameters or parameter groups.
        lr: Learning rate.
        weight_decay: Decoupled weight decay.
        betas: ``(beta1, beta2)``.
        eps: Denominator epsilon.
        page_budget_bytes: Device bytes for resident state pages (paged optimizers only; ``None``: unlimited).
        device: Compute device of a paged optimizer (default: the parameters' device).

    Returns:
        The optimizer.

    Raises:
        ValueError: On an unknown name (the message lists the known ones), or a page budget for an optimizer that
            does not page.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    paged = name.startswith("paged_")
    if not paged and page_budget_bytes is not None:
        raise ValueError(f"page_budget_bytes is only for paged optimizers, not {name!r}")
    param_list: list[Any] = list(params)
    common: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        tensors = _tensors(param_list)
        try:
            # One kernel per tensor and step; bit-for-bit it differs from the foreach path in the last ulp.
            return torch.optim.AdamW(param_list, fused=bool(tensors), **common)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(param_list, foreach=True, **common)
    if name == "adamw_8bit":
        return AdamW8bit(param_list, **common)
    if name == "paged_adamw_32bit":
        return PagedAdamW(param_list, page_budget_bytes=page_budget_bytes, device=device, **common)
    return PagedAdamW8bit(param_list, page_budget_bytes=page_budget_bytes, device=device, **common)


def loraplus_groups(
    a: Iterable[Tensor],
    b: Iterable[Tensor],
    lr: float,
    lr_ratio: float,
    weight_decay: float = 0.0,
    embedding: Iterable[Tensor] = (),
    embedding_lr: float = 1e-6,
) -> list[dict[str, Any]]:
    """Parameter groups of LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354), as peft's
    ``create_loraplus_optimizer`` builds them: `a` (LoRA's A matrices and everything else trained) at `lr`, `b` (the
    B matrices and 1-D adapter vectors such as DoRA's magnitude) at ``lr * lr_ratio``, LoRA on embeddings at
    `embedding_lr`; empty groups are left out. Pass the result to `build_optimizer` as its `params`."""
    if lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0, got {lr_ratio}")
    groups = [(list(a), 1.0), (list(embedding), embedding_lr / lr), (list(b), lr_ratio)]
    # lr_scale: the group's learning rate over the run's, kept in the optimizer state (a resumed run rescales by it)
    return [{"params": params, "lr": lr * scale, "lr_scale": scale, "weight_decay": weight_decay}
            for params, scale in groups if params]


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state as ``{"device": ..., "host": ...}``, for any optimizer.

    peftkit's optimizers report their own split (:meth:`PagedAdamW.state_bytes`); for others (e.g.
    ``torch.optim.AdamW``) a state tensor counts as ``device`` when it is on its parameter's device, else as
    ``host`` (e.g. torch's CPU step counters of CUDA parameters).
    """
    own = getattr(optimizer, "state_bytes", None)
    if callable(own):
        return own()
    out = {"device": 0, "host": 0}
    seen: set[tuple[torch.device, int]] = set()
    for p, st in optimizer.state.items():
        for t in st.values():
            if not torch.is_tensor(t):
                continue
            key = (t.device, t.data_ptr())
            if key in seen:  # a tensor shared by all parameters' states (bitsandbytes' qmaps) counts once
                continue
            seen.add(key)
            out["device" if t.device == p.device else "host"] += t.numel() * t.element_size()
    return out
