"""The estimator: the memory of one training step from the model geometry (`peftkit.memory.arch`), the trainable
tensors of the method and the activations (`peftkit.memory.activations`).

Trainable parameters by method (`count_trainable`): counted by the method's own registry entry
(``MethodSpec.count``, in its file under ``peftkit/methods``) from its config class and defaults, so the estimate
trains what `peftkit train` trains with the same settings (a contract test applies every method to tiny models and
compares). The method names and settings are the registry's (``peftkit info --list-methods``), and so are its presets:
``qlora`` is ``lora`` over an NF4 + double-quantized base (QLoRA, Dettmers et al. 2023). What a method adds to a step
beyond its trainable tensors (virtual tokens, activations of its own modules, rebuilt weights, fixed buffers) is its
registry entry's memory model (``MethodSpec.memory``); nothing here branches on a method's name.

Bytes per parameter (SPECS section 4): fp32 4, fp16/bf16 2, int8 1, NF4/FP4/INT4 0.5; 4-bit quantization constants:
one fp32 absmax per block of 64 = 0.5 bit/param, with double quantization ``8/64 + 32/(64*256)`` = 0.127 bit/param
(4.127 bits/param in all). Only the linear layers inside the blocks are quantized; embeddings, the head, norms and
biases stay in the 16-bit compute dtype, as bitsandbytes/QLoRA do.

Precisions are those of training (``TrainConfig.precision``, `peftkit.hardware.PRECISIONS`), accounted as
`peftkit.train.model.prepare_model` stores the weights: trainable parameters are fp32 in every precision (weight 4
+ gradient 4 + AdamW m, v 4 + 4 = 16 bytes, the mixed-precision figure of Rajbhandari et al. 2020); frozen weights
are 16-bit in ``bf16`` / ``fp16`` and fp32 in ``fp32`` / ``bf16-autocast``; activations are in the compute dtype (16
bits but in ``fp32``). ``auto`` is what `peftkit.hardware.resolve_precision` picks on this machine.

Optimizer states: AdamW keeps two fp32 states per trainable element. 8-bit AdamW (Dettmers et al. 2022): 1 byte per
state + an fp32 absmax per block of 256; tensors under 4096 elements keep 32-bit states. Paged optimizers
(bitsandbytes) page tensors of >= 1e5 elements: their states are counted as host memory, with the largest paged
tensor's states as the device working set.

Activations: see `peftkit.memory.activations`.

Logits / loss buffers: ``b*s*V * e`` bytes for the logits in the compute dtype, twice that when they are 16-bit and
trained through (their 16-bit gradient beside them): peftkit's loss (`peftkit.train.loss.SummedCrossEntropy`)
keeps no vocabulary-sized fp32 temporary, and fp32 logits become their own gradient in place. For a 135M model with
a 49k vocabulary this is often the largest item.

Temporary weights: a quantized base dequantizes one linear at a time (the largest block weight, 16-bit); autocast
keeps a 16-bit cast of every fp32 matmul weight for backward (all of them in ``bf16-autocast``, the trainable ones in
``bf16`` / ``fp16``); SAID materialises a full copy of the weights.

The total (``total_bytes``) is the sum of all device components: an upper bound of the true peak, since not all of
them coexist. ``peak_bytes`` models when they do (validated against measured peaks on the bundled model by
``bench/memory_validation.py``): the weights, optimizer states and temporary weights stay through the step; on top
of them the larger of two moments of the backward pass:

* the loss backward: every activation kept at the end of the forward (with checkpointing the block inputs only: no
  block is being recomputed yet) plus the logits / loss buffers; no weight gradient exists yet;
* the block backward: all weight gradients (an upper bound: the last ones appear as the first blocks' activations
  are freed) plus one block's activations (with checkpointing: the block inputs and the recomputed block).

Summing instead overestimates full fine-tuning of the bundled model at batch 2 x 256 (weight gradients as large as
the activations plus the logits) by 16%, and checkpointed runs by up to 20% (a recomputed block counted at the loss
backward). What ``peak_bytes`` still leaves in: the logits term keeps the model's ``e`` bytes
of logits through the loss backward, as a loop holding the model output does (Hugging Face's Trainer); peftkit's
`sequence_loss` drops them first, so its peak is ``12 * b*s*V`` there (measured), ``e`` bytes per logit less.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from peftkit import hardware
from peftkit.core.config import Config
from peftkit.core.registry import MethodSpec, Preset, has_quantized_preset, list_methods, list_presets, resolve_method
from peftkit.errors import PeftkitError
from peftkit.memory.activations import activation_bytes, sequence_lengths
from peftkit.memory.arch import Arch, load_arch

__all__ = ["ALIASES", "METHODS", "OPTIMIZERS", "PRECISIONS", "QUANTS", "Breakdown", "TrainSetup", "compare",
           "count_trainable", "estimate", "method_config", "parse_bytes", "trainable_tensors"]


ALIASES = {name: resolve_method(name)[0].name for name in list_presets()}
"""The registry's presets and the method each trains: ``qlora`` is ``lora`` over an NF4 + double-quantized base
(unless `TrainSetup.quant` says otherwise)."""

METHODS = (*list_methods(), *ALIASES)


def method_config(method: str, settings: Mapping[str, Any] | None = None) -> Config:
    """The method's own config (its registry class, its defaults) with `settings` on top.

    Raises:
        PeftkitError: unknown method, or a key or value its config refuses (the message names it).
    """
    spec, _ = resolve_method(method)
    return spec.config_cls.from_dict(dict(settings or {}))


def trainable_tensors(arch: Arch, method: str, settings: Mapping[str, Any] | Config | None = None
                      ) -> list[tuple[str, int]]:
    """(name, numel) of every tensor `method` trains on `arch`, counted by the method's registry entry; names follow
    `Arch.param_tensors` (used for the 8-bit / paging thresholds and what trains in place)."""
    config = settings if isinstance(settings, Config) else method_config(method, settings)
    return resolve_method(method)[0].count(arch, config)


def count_trainable(arch: Arch | str | Mapping[str, Any], method: str, **settings: Any) -> int:
    """Number of trainable parameters of `method` on `arch`, from the architecture alone.

    Args:
        arch: an `Arch`, or anything `load_arch` accepts.
        method: one of `METHODS`.
        **settings: keys of the method's config class (``r``, ``target_modules``, ``reduction_factor``,
            ``num_virtual_tokens``, ``encoder_hidden_size``, ``k``, ``d``, ...); its defaults fill the rest.

    Raises:
        PeftkitError: unknown method or key, settings the method refuses on this model (a rank above a layer's
            size, a target that matches nothing, BitFit without biases).
    """
    return sum(k for _, k in trainable_tensors(load_arch(arch), method, settings))


PRECISIONS = hardware.PRECISIONS  # the training names
_RENAMED = {"mixed": "bf16", "autocast": "bf16-autocast"}  # names the estimator does not use, and the training name
QUANTS = (None, "nf4", "fp4", "int4", "int8")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "sgd")
_PAGE_MIN = 100_000  # bitsandbytes pages buffers of >= 1e5 elements
_8BIT_MIN = 4096  # smaller tensors keep 32-bit states in 8-bit optimizers


@dataclass(frozen=True)
class TrainSetup:
    """What is trained and how. Flat and validated on construction.

    Attributes:
        method: one of `METHODS`; ``"qlora"`` is LoRA over an NF4 + double-quantized base unless ``quant`` says
            otherwise.
        method_args: the method's settings (see `count_trainable`).
        precision: a training precision (`peftkit.hardware.PRECISIONS`): ``bf16`` / ``fp16`` (frozen weights 16-bit,
            trainable ones fp32, 16-bit autocast), ``bf16-autocast`` (every weight fp32, bf16 autocast), ``fp32``, or
            ``auto`` (resolved on construction by `peftkit.hardware.resolve_precision` for this machine).
        quant: base weight format of the frozen block linears: None, ``nf4``, ``fp4``, ``int4``, ``int8``.
        double_quant: quantize the 4-bit formats' absmax constants (QLoRA).
        quant_block: block size of the 4-bit formats.
        optimizer: ``adamw``, ``adamw_8bit``, ``paged_adamw_32bit``, ``paged_adamw_8bit`` or ``sgd`` (no state).
        batch_size: sequences per step (micro-batch).
        seq_len: tokens per sequence.
        gradient_checkpointing: recompute each block's activations in backward.
        attention: ``sdpa`` (memory-efficient kernels, no s*s matrix kept) or ``eager``.
        activation_model: ``hf`` (measured HF Llama forward) or ``korthikanti``.
        world_size, sharding: processes and ``TrainConfig.sharding``; the figures are per process (`_per_rank`).
    """

    method: str = "lora"
    method_args: Mapping[str, Any] = field(default_factory=dict)
    precision: str = "bf16"
    quant: str | None = None
    double_quant: bool = False
    quant_block: int = 64
    optimizer: str = "adamw"
    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    activation_model: str = "hf"
    world_size: int = 1
    sharding: str = "none"

    def __post_init__(self) -> None:
        method_config(self.method, self.method_args)  # an unknown method or key is an error naming it
        if self.precision in _RENAMED:
            raise PeftkitError(f"precision {self.precision!r} is not a training precision: use "
                               f"{_RENAMED[self.precision]!r} (precisions: {', '.join(PRECISIONS)})")
        if self.precision == "auto":
            object.__setattr__(self, "precision", hardware.resolve_precision("auto").name)
        for fname, value, allowed in (("precision", self.precision, PRECISIONS), ("quant", self.quant, QUANTS),
                                      ("optimizer", self.optimizer, OPTIMIZERS),
                                      ("attention", self.attention, ("sdpa", "eager")),
                                      ("activation_model", self.activation_model, ("hf", "korthikanti")),
                                      ("sharding", self.sharding, SHARDINGS)):
            if value not in allowed:
                raise ValueError(f"{fname} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        for fname in ("batch_size", "seq_len", "quant_block", "world_size"):
            value = getattr(self, fname)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{fname} must be a positive integer, got {value!r}")
        if self.double_quant and self.effective_quant not in ("nf4", "fp4", "int4"):
            raise ValueError("double_quant applies to the 4-bit formats nf4, fp4, int4")

    @property
    def config(self) -> Config:
        """The method's config: its defaults with `method_args` on top."""
        return method_config(self.method, self.method_args)

    @property
    def spec(self) -> MethodSpec:
        """The registry entry of the method (of the preset's method for a preset)."""
        return resolve_method(self.method)[0]

    @property
    def preset(self) -> Preset | None:
        return resolve_method(self.method)[1]

    @property
    def effective_quant(self) -> str | None:
        """`quant`, or the preset's base format when the setup names none."""
        preset = self.preset
        return preset.quant if preset is not None and self.quant is None else self.quant

    @property
    def effective_double_quant(self) -> bool:
        preset = self.preset
        return self.double_quant or (preset is not None and self.quant is None and preset.double_quant)


_COMPONENTS = ("weights_frozen", "quant_constants", "weights_trainable", "gradients", "optimizer_device",
               "activations", "logits_loss", "temp_weights")


@dataclass
class Breakdown:
    """Memory of one training step, in bytes, component by component.

    Attributes:
        arch: architecture name.
        setup: the `TrainSetup` used.
        params_total: parameters of the base model.
        params_trainable: trainable parameters.
        weights_frozen: frozen weights (quantized data for quantized layers).
        quant_constants: absmax / scale constants of quantized weights.
        weights_trainable: trainable weights (fp32 in every precision).
        gradients: weight gradients (+ the full-size gradient SAID routes through).
        optimizer_device: optimizer states on the device (for paged optimizers: the working set).
        optimizer_host: optimizer states paged out to host memory (not in ``total_bytes``).
        activations: tensors kept for backward.
        activations_no_ckpt: activations without gradient checkpointing.
        activations_ckpt: activations with gradient checkpointing.
        activations_korthikanti: the Korthikanti et al. formula for the same setting (for comparison).
        logits_loss: logits and loss buffers.
        temp_weights: dequantized / cast weight copies alive at the same time.
        peak_bytes: the modelled peak (components that coexist; see the module docstring), at most ``total_bytes``.
        notes: caveats that apply to this estimate.
    """

    arch: str
    setup: TrainSetup
    params_total: int
    params_trainable: int
    weights_frozen: int = 0
    quant_constants: int = 0
    weights_trainable: int = 0
    gradients: int = 0
    optimizer_device: int = 0
    optimizer_host: int = 0
    activations: int = 0
    activations_no_ckpt: int = 0
    activations_ckpt: int = 0
    activations_korthikanti: int = 0
    logits_loss: int = 0
    temp_weights: int = 0
    peak_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def components(self) -> dict[str, int]:
        """The device components that make up ``total_bytes``."""
        return {c: getattr(self, c) for c in _COMPONENTS}

    @property
    def total_bytes(self) -> int:
        """Device memory: the sum of all device components (an upper bound of the peak)."""
        return sum(self.components.values())

    @property
    def host_bytes(self) -> int:
        return self.optimizer_host

    def fits(self, device_bytes: int | str) -> bool:
        """Whether ``total_bytes`` fits in `device_bytes` (an int or a string such as ``"24GB"``)."""
        return self.total_bytes <= parse_bytes(device_bytes)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict: components, totals, counts, the setup and notes."""
        setup = asdict(self.setup)
        setup["method_args"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.setup.method_args.items()}
        return {
            "arch": self.arch, "setup": setup, "params_total": self.params_total,
            "params_trainable": self.params_trainable, **self.components, "total_bytes": self.total_bytes,
            "optimizer_host": self.optimizer_host, "activations_no_ckpt": self.activations_no_ckpt,
            "activations_ckpt": self.activations_ckpt, "activations_korthikanti": self.activations_korthikanti,
            "peak_bytes": self.peak_bytes,
            "notes": list(self.notes),
        }


def parse_bytes(value: int | float | str) -> int:
    """``"24GB"`` -> 24e9, ``"24GiB"`` -> 24 * 2**30, ``"512MiB"``, ``"80G"`` (= GB), plain numbers are bytes.

    Raises:
        ValueError: unparseable or non-positive.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", str(value).lower())
    if not m or (m.group(3) and not m.group(2)):
        raise ValueError(f"cannot parse memory size {value!r} (examples: 24GB, 24GiB, 80G, 512MiB)")
    base = 1024 if m.group(3) else 1000
    n = float(m.group(1)) * base ** " kmgt".index(m.group(2) or " ")
    if n <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return int(n)


def _quant_bytes(numel: int, quant: str, block: int, double_quant: bool, d_out: int) -> tuple[int, int]:
    """(data bytes, constant bytes) of one quantized weight tensor."""
    if quant == "int8":  # LLM.int8-style: int8 data, one fp32 scale per output row
        return numel, 4 * d_out
    data = (numel + 1) // 2  # two 4-bit codes per byte
    nblocks = math.ceil(numel / block)
    if not double_quant:
        return data, 4 * nblocks
    # 8-bit first-level constants, one fp32 scale per 256 of them, one fp32 offset per tensor
    return data, nblocks + 4 * math.ceil(nblocks / 256) + 4


def _state_bytes(numel: int, optimizer: str, state_dtype_bytes: int) -> int:
    if optimizer == "sgd":
        return 0
    if optimizer.endswith("8bit") and numel >= _8BIT_MIN:
        return 2 * (numel + 4 * math.ceil(numel / 256))
    return 2 * numel * (4 if optimizer.endswith("8bit") else state_dtype_bytes)


def _matmul_weights(arch: Arch, tensors: list[tuple[str, int]]) -> int:
    """Elements of the weight matrices among `tensors` that a matmul reads (not norms, not embedding lookups)."""
    lookups = {"pos_embed.weight"} | (set() if arch.tied_embeddings else {"embed.weight"})
    return sum(k for n, k in tensors if n.endswith(".weight") and "norm" not in n and n not in lookups
               and not n.endswith("embedding.weight"))


def _frozen_weights(bd: Breakdown, arch: Arch, setup: TrainSetup, trainable: list[tuple[str, int]],
                    w16: int) -> None:
    """Frozen base weights (the base tensors not trained in place), quantized block linears with their constants,
    and the one dequantized weight a quantized base needs at a time."""
    quant = setup.effective_quant
    if quant and not setup.spec.capabilities.quantized_base:
        raise ValueError(f"{setup.spec.name} trains every weight and cannot train quantized weights; drop --quant "
                         "or pick a PEFT method")
    trained_base = {n for n, _ in trainable} & {n for n, _ in arch.param_tensors()}
    lin_by_name = {lin.name: lin for lin in arch.linears}
    for n, k in arch.param_tensors():
        if n in trained_base:
            continue
        lin = None
        if n.startswith("layers.") and n.endswith(".weight"):
            lin = lin_by_name.get(n.split(".", 2)[-1][: -len(".weight")])
        if quant and lin is not None:
            data, const = _quant_bytes(k, quant, setup.quant_block, setup.effective_double_quant, lin.d_out)
            bd.weights_frozen += data
            bd.quant_constants += const
        else:
            bd.weights_frozen += k * w16
    if quant:
        bd.temp_weights += max(lin.weight_numel for lin in arch.linears) * 2  # one dequantized 16-bit weight


def _method_state(bd: Breakdown, arch: Arch, setup: TrainSetup, config: Config, trainable: list[tuple[str, int]],
                  e: int, w16: int) -> None:
    """Trainable weights and their gradients (fp32 in every precision), and what the method's memory model adds:
    rebuilt weights (a compute-dtype copy, a full-size gradient) and fixed buffers."""
    memory = setup.spec.memory
    bd.weights_trainable = 4 * bd.params_trainable
    bd.gradients = 4 * bd.params_trainable
    rebuilt = memory.rebuilt_weights(arch, config)
    bd.gradients += rebuilt * w16
    bd.temp_weights += rebuilt * e
    buffers = memory.buffers(arch, config, trainable)
    bd.weights_frozen += buffers
    if memory.note:
        bd.notes.append(memory.note.format(buffers_gib=buffers / 2**30))


def _optimizer_states(bd: Breakdown, setup: TrainSetup, trainable: list[tuple[str, int]]) -> None:
    """Optimizer states (torch's AdamW keeps them in the parameter dtype: fp32); a paged optimizer keeps the
    large tensors' states on the host, the largest of them on the device as its working set."""
    paged = setup.optimizer.startswith("paged")
    working = 0
    for _, k in trainable:
        st = _state_bytes(k, setup.optimizer.replace("paged_", "").replace("_32bit", ""), 4)
        if paged and k >= _PAGE_MIN:
            bd.optimizer_host += st
            working = max(working, st)
        else:
            bd.optimizer_device += st
    bd.optimizer_device += working


def _activations_and_logits(bd: Breakdown, arch: Arch, setup: TrainSetup, config: Config,
                            trainable: list[tuple[str, int]], e: int) -> int:
    """Activations, logits / loss buffers and autocast's weight casts; returns one block's activations."""
    memory = setup.spec.memory
    no_ckpt, ckpt, korth, one_block, notes = activation_bytes(arch, setup, memory, config, trainable, e)
    bd.notes += notes
    bd.activations_no_ckpt, bd.activations_ckpt, bd.activations_korthikanti = no_ckpt, ckpt, korth
    if setup.activation_model == "korthikanti":
        bd.activations = korth
    else:
        bd.activations = ckpt if setup.gradient_checkpointing else no_ckpt
    seq, _ = sequence_lengths(setup, memory, config)
    # peftkit's loss (`SummedCrossEntropy`) keeps the logits as they come out of the head and no vocabulary-sized
    # temporary: fp32 logits become their own gradient in place, 16-bit ones get a 16-bit gradient beside them
    logits = setup.batch_size * seq * arch.vocab * e
    n_trainable = bd.params_trainable
    bd.logits_loss = logits * (2 if n_trainable and e < 4 else 1)
    if setup.precision == "bf16-autocast" and n_trainable:
        # torch.autocast keeps the 16-bit cast of each fp32 matmul weight for backward (all linears + head)
        bd.temp_weights += 2 * (arch.block_linear_params + arch.vocab * arch.hidden)
    elif setup.precision in ("bf16", "fp16"):  # only the trainable weights are fp32
        bd.temp_weights += 2 * _matmul_weights(arch, trainable)
    return one_block


SHARDINGS = ("none", "full", "grad_op")


def _per_rank(bd: Breakdown, arch: Arch, setup: TrainSetup) -> None:
    """The memory of one process of `setup.world_size` under `setup.sharding` (FSDP2, `peftkit.train.sharding`).

    ``none`` (DDP): every process holds everything, and DDP's gradient buckets (a second copy of the gradients).
    ``full``: the stored weights (frozen, quantized with their constants, trainable), the gradients and the optimizer
    states (a paged optimizer's host pages too) are split over the processes; on top, as temporary weights, the
    gathered root unit (embeddings, final norm, head: kept from the forward through the backward) and two gathered
    blocks (the one computing and the one prefetched), and as gradients the unsharded gradients of the root and of
    one block before their reduce-scatter. ``grad_op``: the gathered weights of every
    block stay from the forward through the backward (a whole copy beside the shards). Activations, logits and the
    dequantized temporary are per process as without sharding.

    Note:
        A unit's share of the bytes is its share of the parameters: exact when every weight has one dtype; a
        quantized base stores blocks in 4 bits and the root in 16, so the blocks' share is then overstated
        (conservative).
    """
    n = setup.world_size
    if n == 1:
        return
    if setup.sharding == "none":
        # DDP's reducer keeps its buckets beside the gradients: a second copy of every one (measured at 2 processes,
        # full fine-tuning: +589 MiB over one process for 513 MiB of gradients, `bench/memory_validation.py --ranks`)
        bd.gradients *= 2
        bd.notes.append(f"per process of {n} with DDP: the reducer's gradient buckets counted as a second copy of "
                        "the gradients")
        return
    root = sum(k for _, k in arch.outer_tensors()) / arch.num_params
    block = (1.0 - root) / arch.layers
    stored = bd.weights_frozen + bd.quant_constants + bd.weights_trainable
    gathered = stored if setup.sharding == "grad_op" else int(stored * (root + 2 * block))
    unsharded_grads = int(bd.gradients * (root + block))
    for name in ("weights_frozen", "quant_constants", "weights_trainable", "gradients", "optimizer_device",
                 "optimizer_host"):
        setattr(bd, name, getattr(bd, name) // n)
    bd.temp_weights += gathered
    bd.gradients += unsharded_grads
    bd.notes.append(f"per process of {n} with sharding {setup.sharding}: weights, gradients and optimizer states "
                    f"split {n} ways; gathered weights {gathered / 2**20:.0f} MiB counted as temporary weights")


def _peak(bd: Breakdown, setup: TrainSetup, one_block: int) -> int:
    """The modelled peak: what coexists (module docstring). The sum counts the weight gradients together with every
    activation and the logits buffers, and, with checkpointing, a recomputed block during the loss backward; on the
    bundled model that overestimated measured peaks by up to 20%."""
    ckpt_on = setup.gradient_checkpointing
    if setup.activation_model == "hf" and ckpt_on:
        at_loss, in_blocks = bd.activations - one_block, bd.activations
    else:
        at_loss, in_blocks = bd.activations, bd.activations if ckpt_on else one_block
    static = bd.weights_frozen + bd.quant_constants + bd.weights_trainable + bd.optimizer_device + bd.temp_weights
    return min(static + max(at_loss + bd.logits_loss, bd.gradients + in_blocks), bd.total_bytes)


def estimate(arch_or_name: Arch | str | Mapping[str, Any], setup: TrainSetup | None = None) -> Breakdown:
    """Estimate the memory of one training step.

    Args:
        arch_or_name: an `Arch`, a preset name, a ``config.json`` path or model folder, or a config dict.
        setup: the training setup (defaults: LoRA with `LoRAConfig`'s defaults, bf16, AdamW, batch 1,
            512 tokens).

    Returns:
        The `Breakdown`; ``total_bytes`` is the device total, ``optimizer_host`` what paged optimizers keep on the
        host.

    Raises:
        ValueError: unknown model or method, impossible settings (e.g. training quantized weights).
    """
    arch = load_arch(arch_or_name)
    setup = setup or TrainSetup()
    config = setup.config
    trainable = trainable_tensors(arch, setup.method, config)
    bd = Breakdown(arch.name, setup, arch.num_params, sum(k for _, k in trainable))
    e = 4 if setup.precision == "fp32" else 2  # compute dtype (activations)
    w16 = 2 if setup.precision in ("bf16", "fp16") else 4  # storage of frozen weights
    if bd.params_trainable == 0:
        bd.notes.append(f"{arch.name} has nothing to train with {setup.method}")
    _frozen_weights(bd, arch, setup, trainable, w16)
    _method_state(bd, arch, setup, config, trainable, e, w16)
    _optimizer_states(bd, setup, trainable)
    _per_rank(bd, arch, setup)
    one_block = _activations_and_logits(bd, arch, setup, config, trainable, e)
    bd.peak_bytes = _peak(bd, setup, one_block)
    return bd


def compare(arch_or_name: Arch | str | Mapping[str, Any], base: TrainSetup | None = None,
            methods: Sequence[str] | None = None) -> dict[str, Breakdown]:
    """The same model and training setup under several methods, side by side.

    Each method uses its own config's defaults, overridden by those keys of ``base.method_args`` its config has;
    quantization is applied only to preset rows (``qlora``) and to the rows of methods with a quantized preset
    (``lora``) if ``base.quant`` is set.
    """
    arch = load_arch(arch_or_name)
    base = base or TrainSetup()
    rows: dict[str, Breakdown] = {}
    for method in methods or METHODS:
        spec, preset = resolve_method(method)
        keys = spec.config_cls.keys()
        args = {k: v for k, v in base.method_args.items() if k in keys}
        quant = base.quant if preset is not None or has_quantized_preset(method) else None
        dq = base.double_quant and quant is not None
        try:
            setup = replace(base, method=method, method_args=args, quant=quant, double_quant=dq)
            rows[method] = estimate(arch, setup)
        except ValueError as err:
            if methods:  # asked for explicitly: report
                raise
            rows[method] = Breakdown(arch.name, replace(base, method=method, method_args={}, quant=None,
                                                        double_quant=False), arch.num_params, 0,
                                     notes=[f"not applicable: {err}"])
    return rows
