"""Intrinsic dimension / SAID (Aghajanyan et al., 2020, https://arxiv.org/abs/2012.13255; Li et al., 2018).

    theta_i = theta0_i + lambda_i * P_i(theta_d),     theta_d in R^d shared by all tensors, init 0
    P(x) = (H G Pi H B pad(x))[:D] / (sqrt(L * sum(G^2)) * sqrt(D / L))

per projected tensor of D entries: L the next power of two >= max(D, d), H the unnormalised Walsh-Hadamard
transform (O(L log L), never materialised), B a random +-1 diagonal, G an N(0, 1) diagonal, Pi a random
permutation. The scaling gives the columns of P unit norm in expectation (exactly when D = L). SAID adds the
per-tensor scale lambda_i (init 1, trainable); plain intrinsic dimension (``said=false``) fixes lambda_i = 1.

Each projected layer rebuilds its weight ``W0 + P_i(lambda_i * theta_d)`` (= ``W0 + lambda_i * P_i(theta_d)``, P
being linear) in its forward (memory O(L) for the projection: G and Pi are stored as fp32 / int32 buffers of L
entries, B as d int8 signs (only those reach the zero-padded input), regenerated from the seed rather than saved).
The trainable parameters, ``theta_d`` and ``said_lambda``, live in one module attached to the model
(``peftkit_said``); adapter files hold just those. `merge` / `unmerge` / `merge_and_unload` fold the update into
the base weights (shared with sparse updates).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.core import delta
from peftkit.core.config import Config
from peftkit.core.delta import DeltaWeightLayer, is_plain_linear, linear_targets, merge, unmerge
from peftkit.core.hooks import HookReport
from peftkit.core.inject import AdapterModule, freeze_all, inject, match_modules
from peftkit.core.registry import MemoryModel, Merging, register_method
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.memory import Arch

__all__ = ["Fastfood", "IntrinsicSAID", "IntrinsicSAIDConfig", "SAIDLayer", "fwht", "merge", "merge_and_unload",
           "unmerge"]

ATTRIBUTE = "peftkit_said"


class _FWHT(torch.autograd.Function):
    """Unnormalised Walsh-Hadamard transform over the last dimension; H is symmetric, so backward is H too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return _fwht(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _fwht(grad)


FACTOR_BITS = 5  # H_L is applied as Kronecker factors of at most 2**5 x 2**5 (see `_fwht`)


@functools.lru_cache(maxsize=64)
def _hadamard(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The k x k Sylvester Hadamard matrix, entries +-1 (k a power of two)."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < k:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """H_L over the last dimension as Kronecker factors: H_L = H_k1 (x) H_k2 (x) ... (x) H_kt.

    Viewing the L entries as a k1 x ... x kt array, each factor is a k x k matmul along one axis. Each round
    multiplies the last axis by its factor and moves it to the front (one transpose), so after t rounds the axes
    are back in order. With k <= 32 that is ~log2(L) / 5 passes over memory instead of log2(L) butterfly passes.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length, got {n}")
    bits = n.bit_length() - 1
    rounds = max(-(-bits // FACTOR_BITS), 1)
    y = x.reshape(-1, n)
    rows = y.shape[0]
    for r in range(rounds):
        k = 1 << (bits // rounds + (1 if r < bits % rounds else 0))
        y = (y.reshape(-1, k) @ _hadamard(k, x.dtype, x.device)).view(rows, n // k, k).transpose(1, 2)
        y = y.contiguous()
    return y.reshape(x.shape)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """``H x`` for the unnormalised (Sylvester-ordered) Hadamard matrix H, in O(L log L), differentiable."""
    return _FWHT.apply(x)


class Fastfood(nn.Module):
    """The Fastfood projection R^d -> R^D of SPECS section 2; B, G and Pi are (non-persistent) buffers.

    Two exact shortcuts, both from pad(x) being zero past d. With m the next power of two >= d, the Sylvester
    Hadamard matrix is H_L = H_(L/m) (x) H_m and pad(x) = e_0 (x) x', so H_L B pad(x) = ones(L/m) (x) H_m B x':
    the first transform is one of length m, tiled. The permutation then reads entry Pi(i) of that tiling, i.e.
    entry Pi(i) mod m of H_m B x', so the buffer `Pi` holds Pi mod m and the tiling is never built. Only the
    second transform is of length L. B keeps its first d signs (the others multiply zeros).
    """

    def __init__(self, d: int, D: int, generator: torch.Generator) -> None:
        super().__init__()
        self.d, self.D = d, D
        self.L = L = 1 << (max(D, d) - 1).bit_length()  # next power of two >= max(D, d)
        self.m = 1 << (d - 1).bit_length()  # next power of two >= d (<= L)
        signs = (torch.randint(0, 2, (L,), generator=generator) * 2 - 1).to(torch.int8)
        self.register_buffer("B", signs[:d].clone(), persistent=False)
        G = torch.randn(L, generator=generator)
        self.register_buffer("G", G, persistent=False)
        permutation = torch.randperm(L, generator=generator)
        self.register_buffer("Pi", (permutation % self.m).to(torch.int32), persistent=False)
        self.scale = 1.0 / (math.sqrt(L * float(G.square().sum())) * math.sqrt(D / L))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = fwht(torch.nn.functional.pad(x * self.B.to(x.dtype), (0, self.m - self.d)))  # H_m B x'
        v = head.index_select(-1, self.Pi) * self.G.to(x.dtype)  # Pi H_L B pad(x), scaled by G
        return fwht(v)[..., : self.D] * self.scale


@dataclasses.dataclass
class IntrinsicSAIDConfig(Config):
    """Intrinsic-dimension fine-tuning settings.

    Attributes:
        d: the intrinsic dimension (length of the shared theta_d).
        said: one trainable scale lambda per projected tensor (SAID); False: plain intrinsic dimension (DID).
        target_modules: which weights are projected: module-name suffixes, one regex, or ``"all-linear"`` (the
            weights of every linear layer except the output head, i.e. the linear weights in the blocks).
        seed: seed of the random projections (saved in the config, so the adapter file holds only theta_d).
    """

    d: int = 1000
    said: bool = True
    target_modules: list[str] | str = "all-linear"
    seed: int = 0

    def validate(self) -> None:
        if self.d <= 0:
            raise PeftkitError(f"d must be a positive integer, got {self.d}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise PeftkitError("target_modules is empty")


class IntrinsicSAID(nn.Module, AdapterModule):
    """The trainable part: ``theta_d`` (d) and, for SAID, ``said_lambda`` (one per projected tensor)."""

    def __init__(self, d: int, n_tensors: int, said: bool, device: torch.device) -> None:
        super().__init__()
        self.theta_d = nn.Parameter(torch.zeros(d, device=device))
        self.said_lambda = nn.Parameter(torch.ones(n_tensors, device=device)) if said else None

    def adapter_params(self) -> list[str]:
        return ["theta_d"] + (["said_lambda"] if self.said_lambda is not None else [])


class SAIDLayer(DeltaWeightLayer):
    """A linear layer running with ``W0 + lambda_i * P_i(theta_d)``."""

    said_index: int
    fastfood: Fastfood

    @classmethod
    def from_module(cls, base: nn.Module, shared: IntrinsicSAID, index: int, generator: torch.Generator
                    ) -> SAIDLayer:
        layer = cls.wrap(base)
        layer.fastfood = Fastfood(shared.theta_d.numel(), base.weight.numel(), generator).to(base.weight.device)
        layer.said_index = index
        object.__setattr__(layer, "_said", shared)  # a reference, not a submodule: theta_d is owned once
        return layer

    def adapter_params(self) -> list[str]:
        return []  # the trainable parameters live in the shared IntrinsicSAID module

    def delta_inputs(self) -> list[torch.Tensor]:
        return [*super().delta_inputs(), *self.__dict__["_said"].parameters()]

    def delta(self) -> torch.Tensor:
        shared: IntrinsicSAID = self.__dict__["_said"]
        theta = shared.theta_d
        if shared.said_lambda is not None:
            # P is linear: lambda * P(theta) = P(lambda * theta). Scaling the d-vector, autograd keeps theta
            # for lambda's gradient instead of a weight-sized copy of P(theta) per layer.
            theta = theta * shared.said_lambda[self.said_index]
        return self.fastfood(theta).view_as(self.weight)

    def to_base(self) -> nn.Module:
        plain = super().to_base()
        plain.__dict__["_modules"] = {k: v for k, v in plain._modules.items() if k != "fastfood"}
        for attr in ("_said", "said_index"):
            plain.__dict__.pop(attr, None)
        return plain


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every projected update into its base weight; return the model with plain layers and without theta_d."""
    delta.merge_and_unload(model, dtype)
    if ATTRIBUTE in model._modules:
        delattr(model, ATTRIBUTE)
    return model


def count(arch: Arch, config: IntrinsicSAIDConfig) -> list[tuple[str, int]]:
    """theta_d (d), + one lambda per projected weight for SAID."""
    projected = arch.block_linears(config.target_modules)
    lambdas = [(f"{ATTRIBUTE}.said_lambda", len(projected))] if config.said else []
    return [(f"{ATTRIBUTE}.theta_d", config.d), *lambdas]


def _projected(arch: Arch, config: IntrinsicSAIDConfig) -> int:
    """Elements of the projected weights: each is rebuilt as ``W0 + P theta_d`` every step."""
    return sum(lin.weight_numel for _, lin in arch.block_linears(config.target_modules))


def _projections(arch: Arch, config: IntrinsicSAIDConfig, trainable: list[tuple[str, int]]) -> int:
    """Bytes of the fixed Fastfood projections: per projected matrix, Gaussian scales (fp32) and a permutation
    (int32) over the matrix size rounded up to a power of two (the d signs are negligible)."""
    return sum(8 * (1 << (lin.weight_numel - 1).bit_length()) for _, lin in arch.block_linears(config.target_modules))


MEMORY = MemoryModel(trains_block_linears=True, rebuilt_weights=_projected, buffers=_projections,
                     note="SAID: a full weight copy and full-size gradients pass through the projection; its fixed "
                          "random projections ({buffers_gib:.2f} GiB) are counted with the frozen weights")


@register_method("intrinsic_said", IntrinsicSAIDConfig, count=count,
                 merging=Merging(merge_and_unload, merge=merge, unmerge=unmerge), memory=MEMORY)
def apply(model: nn.Module, config: IntrinsicSAIDConfig) -> HookReport:
    """Project the target weights from one shared d-dimensional theta_d; freeze everything else."""
    if ATTRIBUTE in model._modules:
        raise PeftkitError("this model already has an intrinsic SAID adapter")
    targets = linear_targets(model, config.target_modules)
    # resolve the names first: the shared module needs the tensor count before the layers are built
    names = match_modules(model, targets, lambda _, m: is_plain_linear(m))
    device = model.get_input_embeddings().weight.device
    shared = IntrinsicSAID(config.d, len(names), config.said, device)
    generator = torch.Generator().manual_seed(config.seed)
    index = {name: i for i, name in enumerate(names)}
    freeze_all(model)
    report = inject(model, "intrinsic_said", names, lambda _, m: is_plain_linear(m),
                    lambda name, m: SAIDLayer.from_module(m, shared, index[name], generator))
    setattr(model, ATTRIBUTE, shared)
    for p in shared.parameters():
        p.requires_grad_(True)
    projected = sum(model.get_submodule(n).weight.numel() for n in names)
    hook_report = HookReport("intrinsic_said", adapted=report.adapted, originals=report.originals,
                             attribute=ATTRIBUTE)
    hook_report.notes.append(f"{projected:,} weights projected from d={config.d}")
    return hook_report
