"""LoRA initialisations from the base weight: PiSSA and OLoRA (peft's ``init_lora_weights`` values).

PiSSA (Meng et al., 2024, https://arxiv.org/abs/2404.02948): with ``W0 = U S V^T`` (W0: d_out x d_in),

    B = U_r sqrt(S_r / s)        A = sqrt(S_r / s) V_r^T        W_res = W0 - s B A

(``"pissa"``: exact SVD; ``"pissa_niter_K"``: randomized SVD with K power iterations, Halko et al. 2011).
OLoRA (Büyükakyüz, 2024, https://arxiv.org/abs/2406.01775): ``W0 = Q R``, ``B = Q[:, :r]``, ``A = R[:r]``,
``W_res = W0 - s B A``. Either way the adapted layer starts equal to the base layer (up to rounding) and trains the
principal (PiSSA) or leading orthogonal (OLoRA) directions of W0.

The residual is a new tensor owned by the adapted layer: the base layer given to `from_module` keeps W0.

Adapter files stay portable as peft's ``path_initial_model_for_weight_conversion`` makes them: saved, such an
adapter is a plain LoRA of rank 2r on the original W0,

    A' = [A; A0]      B' = [B, -B0]      alpha' = 2 alpha (sqrt(2) alpha with rsLoRA, so the scale is unchanged)

since ``W0 + s (B A - B0 A0) = W_res + s B A`` (`ResidualInit`); peft and peftkit load it on the unchanged base.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from peftkit.errors import PeftkitError

INIT_VALUES = "True, 'pissa', 'pissa_niter_<K>' or 'olora'"
_NITER = re.compile(r"pissa_niter_(\d+)")


def check_init(value: bool | str) -> None:
    """Refuse an ``init_lora_weights`` value peftkit does not implement, naming the ones it does."""
    if value is True or value in ("pissa", "olora") or (isinstance(value, str) and _NITER.fullmatch(value)):
        return
    raise PeftkitError(f"init_lora_weights={value!r} is not supported; use {INIT_VALUES}")


def randomized_svd(m: torch.Tensor, q: int, niter: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``(U, S, V)`` with ``m ~ U diag(S) V^T`` of rank `q` (as ``torch.svd_lowrank``, but drawing its Gaussian test
    matrix from `generator`, not from the global random state)."""
    probe = torch.randn(m.shape[1], q, generator=generator, device=m.device, dtype=m.dtype)
    basis = torch.linalg.qr(m @ probe).Q
    for _ in range(niter):
        basis = torch.linalg.qr(m @ torch.linalg.qr(m.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return basis @ u, s, vh.T


def init_from_weight(weight: torch.Tensor, r: int, scale: float, how: str,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` (r x d_in, d_out x r, fp32) from W0 = `weight` (d_out x d_in, fp32) by `how` (see the module
    docstring); `generator` draws the randomized SVD's test matrix (a fixed seed when None)."""
    if how == "olora":
        q, rr = torch.linalg.qr(weight)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if how == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        niter = int(_NITER.fullmatch(how).group(1))
        u, s, v = randomized_svd(weight, r, niter, generator or torch.Generator(weight.device).manual_seed(0))
        vh = v.T
    root = (s / scale).sqrt()
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()


class ResidualInit:
    """Mixin for a `LoRALayer` whose base weight is the residual ``W0 - s B0 A0``: its adapter file holds the
    equivalent rank-2r LoRA on W0 (see the module docstring), as an `peftkit.core.adapter_io.AdapterFileState`."""

    lora_init: tuple[torch.Tensor, torch.Tensor]  # (A0, B0)

    def adapter_file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        a0, b0 = self.lora_init
        a, b = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        return {f"{name}.lora_A.weight": torch.cat([a, a0.to(a.dtype)], dim=0),
                f"{name}.lora_B.weight": torch.cat([b, -b0.to(b.dtype)], dim=1)}

    def load_adapter_file_tensors(self, name: str, tensors: dict[str, Any]) -> None:
        """A file saved with this initialisation unconverted (as peft saves it without
        ``path_initial_model_for_weight_conversion``): A and B of rank r, for the residual recomputed here."""
        for key in ("lora_A", "lora_B"):
            value, param = tensors.pop(f"{name}.{key}.weight", None), getattr(self, key).weight
            if value is None or value.shape != param.shape:
                raise PeftkitError(f"adapter does not fit {name}.{key}.weight: expected shape {tuple(param.shape)}, "
                                   f"got {None if value is None else tuple(value.shape)}")
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
