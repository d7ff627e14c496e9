"""Selective fine-tuning: train a chosen subset of the existing parameters.

* **Top-k layers** (the classic "freeze the bottom" baseline; Lee et al. 2019, https://arxiv.org/abs/1911.03090):
  theta = (theta_frozen, theta_top), only the last k transformer blocks (+ final norm / head by option) train.
* **BitFit** (Ben Zaken et al., 2021, https://arxiv.org/abs/2106.10199): only the bias terms train,
  ``y = W0 x + b``, b trainable. Models without biases (Llama) have nothing to train: peftkit says so and offers
  the documented fallback, the norm weights (method ``norms`` or ``include_norms=true``).
* **Norms**: only the normalisation weights (and biases) train, ``y = g * norm(x) (+ beta)``, g trainable.
* **Sparse updates** (FISH mask, Sung et al. 2021, https://arxiv.org/abs/2111.09839; diff pruning, Guo et al.
  2020): ``W' = W0 + S``, S zero outside a fixed set of entries I with ``|I| = density * numel(W)`` per tensor.
  I is chosen by a score over a few batches (`calibrate`): the empirical Fisher ``sum_n (dL_n/dW)^2`` (per
  example) or the gradient magnitude ``sum_b |dL_b/dW|`` (per batch); the top entries per tensor are kept.
  The update is stored as a sparse delta (values + int32 flat indices), so the adapter file is about
  ``8 * density`` bytes per adapted weight entry instead of 4.

Sparse updates run on the weight-delta layers of `peftkit.core.delta` (shared with intrinsic SAID).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from peftkit.core.config import Config
from peftkit.core.delta import DeltaWeightLayer, is_plain_linear, linear_targets, merge, merge_and_unload, unmerge
from peftkit.core.inject import InjectReport, freeze_all, inject
from peftkit.core.registry import MemoryModel, Merging, register_method
from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.memory import Arch

__all__ = [
    "BitFitConfig",
    "NormsConfig",
    "SparseConfig",
    "SparseDeltaLayer",
    "TopKLayersConfig",
    "calibrate_sparse",
    "decoder_blocks",
    "merge",
    "merge_and_unload",
    "norm_modules",
    "sparse_layers",
    "unmerge",
]

# --- model structure ------------------------------------------------------------------------------------------


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The `ModuleList` holding the transformer blocks (``model.layers``, ``transformer.h`` ...)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n_layers is not None:
        lists = [(n, m) for n, m in lists if len(m) == n_layers]
    if not lists:
        raise PeftkitError(f"cannot find the transformer blocks of {type(model).__name__}")
    return min(lists, key=lambda item: item[0].count("."))  # the outermost list


def is_norm(module: nn.Module) -> bool:
    """LayerNorm and the RMSNorm classes of transformers (``LlamaRMSNorm`` ...)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("Norm", "RMSNorm"))


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and is_norm(m) and any(True for _ in m.parameters(False))]


def _train(model: nn.Module, names: Iterable[str]) -> None:
    for name in names:
        model.get_parameter(name).requires_grad_(True)


# --- top-k layers ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TopKLayersConfig(Config):
    """Train the last `k` transformer blocks.

    Attributes:
        k: how many blocks, counted from the top.
        include_norm: also train the norm after the last block.
        include_head: also train the output head (tied to the input embedding in GPT-2: then that trains too).
    """

    k: int = 2
    include_norm: bool = True
    include_head: bool = False

    def validate(self) -> None:
        if self.k <= 0:
            raise PeftkitError(f"k must be a positive integer, got {self.k}")


def count_top_k(arch: Arch, config: TopKLayersConfig) -> list[tuple[str, int]]:
    """Every tensor of the last k blocks, + the final norm, + the head (the embedding when tied)."""
    if config.k > arch.layers:
        raise PeftkitError(f"k={config.k} but {arch.name} has only {arch.layers} blocks")
    out = [(f"layers.{i}.{n}", c) for i in range(arch.layers - config.k, arch.layers) for n, c in arch.block_tensors()]
    if config.include_norm:
        out += [(n, c) for n, c in arch.outer_tensors() if n.startswith("final_norm")]
    if config.include_head:
        out.append(("embed.weight" if arch.tied_embeddings else "lm_head.weight", arch.vocab * arch.hidden))
    return out


@register_method("top_k_layers", TopKLayersConfig, count=count_top_k, merging=Merging.in_place(),
                 memory=MemoryModel(trains_block_linears=True, active_blocks=lambda arch, config, _: config.k,
                                    trains_head=lambda config: config.include_head))
def apply_top_k(model: nn.Module, config: TopKLayersConfig) -> InjectReport:
    """Freeze everything except the last `k` blocks (and the final norm / head by option)."""
    blocks_name, blocks = decoder_blocks(model)
    if config.k > len(blocks):
        raise PeftkitError(f"k={config.k} but {type(model).__name__} has only {len(blocks)} blocks")
    freeze_all(model)
    report = InjectReport("top_k_layers")
    chosen = [f"{blocks_name}.{i}" for i in range(len(blocks) - config.k, len(blocks))]
    if config.include_norm:
        inside = tuple(f"{blocks_name}.{i}." for i in range(len(blocks)))
        finals = [n for n, _ in norm_modules(model) if not n.startswith(inside)]
        if not finals:
            raise PeftkitError(f"{type(model).__name__} has no final norm; set include_norm=false")
        chosen.append(finals[-1])
    if config.include_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise PeftkitError(f"{type(model).__name__} has no output head; set include_head=false")
        chosen += [n for n, m in model.named_modules() if m is head]
    for name in chosen:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    report.adapted = chosen
    return report


# --- BitFit and norms -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class BitFitConfig(Config):
    """Train only the bias terms.

    Attributes:
        include_norms: also train the norm weights (the documented fallback for models without biases).
    """

    include_norms: bool = False


@dataclasses.dataclass
class NormsConfig(Config):
    """Train only the normalisation layers' weights (and their biases, where they have them)."""


def _bias_names(model: nn.Module) -> list[str]:
    names = []
    for mod_name, module in model.named_modules():
        bias = module._parameters.get("bias")
        if isinstance(bias, nn.Parameter):
            names.append(f"{mod_name}.bias" if mod_name else "bias")
    return names


def _norm_param_names(model: nn.Module) -> list[str]:
    return [f"{n}.{p}" for n, m in norm_modules(model) for p, _ in m.named_parameters(recurse=False)]


def _no_biases(model_name: str) -> PeftkitError:
    return PeftkitError(
        f"{model_name} has no bias terms, so BitFit has nothing to train. The documented "
        "alternative is to train the norm weights: use method 'norms', or bitfit with include_norms=true"
    )


def _norm_tensors(arch: Arch) -> list[tuple[str, int]]:
    return [(n, k) for n, k in arch.param_tensors() if "norm" in n]


def count_bitfit(arch: Arch, config: BitFitConfig) -> list[tuple[str, int]]:
    """Every bias (LayerNorm biases included), + the norm weights with ``include_norms``."""
    biases = [(n, k) for n, k in arch.param_tensors() if n.endswith(".bias")]
    if not biases and not config.include_norms:
        raise _no_biases(arch.name)
    return biases + ([t for t in _norm_tensors(arch) if t not in biases] if config.include_norms else [])


def count_norms(arch: Arch, config: NormsConfig) -> list[tuple[str, int]]:
    """Every parameter of every normalisation layer."""
    return _norm_tensors(arch)


def _from_first_trained(arch: Arch, config: Any, trainable: list[tuple[str, int]]) -> int:
    """Gradients flow through the blocks from the first one with a trained tensor up."""
    first = min((int(n.split(".")[1]) for n, _ in trainable if n.startswith("layers.")), default=arch.layers)
    return arch.layers - first


_IN_BLOCKS = MemoryModel(active_blocks=_from_first_trained)


@register_method("bitfit", BitFitConfig, count=count_bitfit, merging=Merging.in_place(), memory=_IN_BLOCKS)
def apply_bitfit(model: nn.Module, config: BitFitConfig) -> InjectReport:
    """Freeze everything except the bias terms (and the norm weights with ``include_norms``)."""
    biases = _bias_names(model)
    if not biases and not config.include_norms:
        raise _no_biases(type(model).__name__)
    names = biases + ([n for n in _norm_param_names(model) if n not in biases] if config.include_norms else [])
    freeze_all(model)
    _train(model, names)
    return InjectReport("bitfit", adapted=names, notes=[f"{len(biases)} bias tensors"])


@register_method("norms", NormsConfig, count=count_norms, merging=Merging.in_place(), memory=_IN_BLOCKS)
def apply_norms(model: nn.Module, config: NormsConfig) -> InjectReport:
    """Freeze everything except the normalisation layers."""
    names = _norm_param_names(model)
    if not names:
        raise PeftkitError(f"{type(model).__name__} has no normalisation layers with parameters")
    freeze_all(model)
    _train(model, names)
    return InjectReport("norms", adapted=names)


# --- sparse updates -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SparseConfig(Config):
    """Sparse updates on a fixed subset of weight entries.

    Attributes:
        density: fraction of the entries of each target weight that train (per tensor).
        score: ``fisher`` (sum of squared per-example gradients) or ``grad`` (sum of per-batch |gradient|).
        target_modules: module-name suffixes, one regex, or ``"all-linear"`` (every linear layer but the head).
        num_calibration_batches: how many batches `calibrate` reads at most.
        seed: seed of the random subset used until `calibrate` replaces it (and when it is never called).
    """

    density: float = 0.01
    score: Literal["fisher", "grad"] = "fisher"
    target_modules: list[str] | str = "all-linear"
    num_calibration_batches: int = 4
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise PeftkitError(f"density must be in (0, 1], got {self.density}")
        if self.num_calibration_batches <= 0:
            raise PeftkitError(f"num_calibration_batches must be positive, got {self.num_calibration_batches}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise PeftkitError("target_modules is empty")


class SparseDeltaLayer(DeltaWeightLayer):
    """``W' = W0 + scatter(sparse_values at sparse_index)``; the index is a flat index into the weight."""

    sparse_values: nn.Parameter
    sparse_index: torch.Tensor

    @classmethod
    def from_module(cls, base: nn.Module, config: SparseConfig, generator: torch.Generator) -> SparseDeltaLayer:
        layer = cls.wrap(base)
        n = base.weight.numel()
        k = sparse_size(n, config.density)
        # until calibrate() chooses by score, a seeded random subset (so an uncalibrated adapter still reloads)
        index = torch.randperm(n, generator=generator)[:k].sort().values.to(base.weight.device)
        layer.register_buffer("sparse_index", index)
        layer.sparse_values = nn.Parameter(torch.zeros(k, dtype=base.weight.dtype, device=base.weight.device))
        return layer

    def adapter_params(self) -> list[str]:
        return ["sparse_values"]

    def delta(self) -> torch.Tensor:
        flat = torch.zeros(self.weight.numel(), dtype=self.sparse_values.dtype, device=self.weight.device)
        return flat.index_add(0, self.sparse_index, self.sparse_values).view_as(self.weight)

    def effective_weight(self) -> torch.Tensor:
        # index_add on a flat copy of W0 costs one weight-sized tensor, no separate dense delta
        flat = self.weight.reshape(-1).index_add(0, self.sparse_index, self.sparse_values.to(self.weight.dtype))
        return flat.view_as(self.weight)

    def select(self, scores: torch.Tensor) -> None:
        """Train the entries with the highest scores from now on (values reset to zero)."""
        k = self.sparse_values.numel()
        index = torch.topk(scores.reshape(-1), k).indices.sort().values
        with torch.no_grad():
            self.sparse_index.copy_(index)
            self.sparse_values.zero_()

    # adapter file: values and int32 indices (file size tracks the density)
    def adapter_file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        index = self.sparse_index.to(torch.int32 if self.weight.numel() < 2**31 else torch.int64)
        return {f"{name}.sparse_values": self.sparse_values, f"{name}.sparse_index": index}

    def load_adapter_file_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        keys = (f"{name}.sparse_values", f"{name}.sparse_index")
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise PeftkitError(f"adapter file lacks {missing[0]}")
        values, index = (tensors.pop(k) for k in keys)
        k = self.sparse_values.numel()
        if values.shape != (k,) or index.shape != (k,):
            raise PeftkitError(f"{name}: the adapter holds {values.numel()} sparse entries, this layer expects {k}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.weight.numel()):
            raise PeftkitError(f"{name}: sparse indices out of range for a weight of shape {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.sparse_index.copy_(index.long())
            self.sparse_values.copy_(values.to(self.sparse_values.dtype))


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseDeltaLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLayer):
            yield name, module


def _calibration_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if batch.get(k) is not None}
    inputs.setdefault("labels", batch["input_ids"])
    return inputs


def calibrate_sparse(model: nn.Module, config: SparseConfig, batches: Iterable[dict[str, Any]]) -> None:
    """Score every entry of the target weights on a few batches and keep the top `density` fraction per tensor.

    Note:
        The Fisher score needs per-example gradients, so each batch is run one example at a time; the
        gradient-magnitude score uses one backward per batch. Gradients are taken with `torch.autograd.grad`, so
        no ``.grad`` of the model is touched and the base weights stay frozen afterwards.
    """
    layers = [layer for _, layer in sparse_layers(model)]
    if not layers:
        raise PeftkitError("calibrate: the model has no sparse layers (apply the 'sparse' method first)")
    weights = [layer.weight for layer in layers]
    scores = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    was_training = model.training
    model.eval()  # no dropout noise in the scores
    for w in weights:
        w.requires_grad_(True)
    seen = 0
    try:
        for batch in batches:
            if seen >= config.num_calibration_batches:
                break
            inputs = _calibration_inputs(batch)
            rows = range(len(inputs["input_ids"])) if config.score == "fisher" else [None]
            for i in rows:
                part = inputs if i is None else {k: v[i : i + 1] for k, v in inputs.items()}
                loss = model(**part).loss
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for s, g in zip(scores, grads, strict=True):
                    if g is not None:
                        s += g.float().square() if config.score == "fisher" else g.float().abs()
            seen += 1
    finally:
        for w in weights:
            w.requires_grad_(False)
        model.train(was_training)
    if seen == 0:
        raise PeftkitError("calibrate: no batches to score the sparse entries with")
    for layer, s in zip(layers, scores, strict=True):
        layer.select(s)


def sparse_size(numel: int, density: float) -> int:
    """Entries of a weight of `numel` elements that train (at least one)."""
    return max(1, round(density * numel))


def count_sparse(arch: Arch, config: SparseConfig) -> list[tuple[str, int]]:
    """``density`` of the entries of each target weight."""
    return [(f"layers.{i}.{lin.name}.sparse_values", sparse_size(lin.weight_numel, config.density))
            for i, lin in arch.block_linears(config.target_modules)]


def _sparse_weights(arch: Arch, config: SparseConfig) -> int:
    """Elements of the target weights: each is rebuilt as ``W0 + scatter(values)`` every step."""
    return sum(lin.weight_numel for _, lin in arch.block_linears(config.target_modules))


_SPARSE_MEMORY = MemoryModel(trains_block_linears=True, rebuilt_weights=_sparse_weights,
                             buffers=lambda arch, config, trainable: 8 * sum(k for _, k in trainable))  # int64 index


@register_method("sparse", SparseConfig, count=count_sparse, calibrate=calibrate_sparse,
                 merging=Merging(merge_and_unload, merge=merge, unmerge=unmerge), memory=_SPARSE_MEMORY)
def apply_sparse(model: nn.Module, config: SparseConfig) -> InjectReport:
    """Wrap the target linear layers with sparse deltas (random subset until `calibrate` picks by score)."""
    targets = linear_targets(model, config.target_modules)
    freeze_all(model)
    generator = torch.Generator().manual_seed(config.seed)
    report = inject(model, "sparse", targets, lambda _, m: is_plain_linear(m),
                    lambda _, m: SparseDeltaLayer.from_module(m, config, generator))
    for _, layer in sparse_layers(model):
        layer.sparse_values.requires_grad_(True)
    n = sum(layer.sparse_values.numel() for _, layer in sparse_layers(model))
    report.notes.append(f"{n:,} sparse entries; call spec.calibrate(model, config, batches) to choose them by score")
    return report
