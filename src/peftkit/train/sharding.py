"""Sharded training with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), chosen by ``TrainConfig.sharding``.

``full``: every parameter (trainable and frozen), every gradient and every optimizer state is split across the
ranks along its first dimension; a transformer block's parameters are gathered for its forward and backward and
freed after each (ZeRO-3). ``grad_op``: the gathered parameters stay through the backward
(``reshard_after_forward=False``: one gather per step instead of two; ZeRO-2's memory for gradients and optimizer
states). One FSDP unit per transformer block plus the root (embeddings, final norm, head; gathered from the forward
through the backward in both modes, since peftkit's loss applies the head after the model's forward).

A 4-bit base is sharded with its block: the packed codes and their quantization state (`peftkit.quant.QuantLinear`
buffers) become frozen parameters of the same names, so FSDP splits and gathers them like any weight (gathered as
bytes: the all-gather of a unit with several dtypes runs on uint8). No mixed-precision policy is given to FSDP
(peftkit's autocast is its own), so nothing ever casts the packed codes, and only one linear is dequantized at a time,
as without sharding.

A model the trainer loads itself is read by rank 0 alone (loaded, quantized and adapted as one process does it);
the other ranks build the same modules on the meta device and receive their shards from it (`shard_model`,
``from_first_rank``), so no rank but the first ever holds the whole model. A model given to the trainer is sharded
from each rank's own copy.

Without a distributed launch a sharded run is a 1-rank group (gloo in this process): the same code and the same
checkpoints, so a run can continue on another number of processes (`peftkit.train.resume.check_resumable`).

Checkpoints stay world-size independent and pickle-free: the trainable weights and the optimizer state are gathered
as full tensors on rank 0 (``torch.distributed.checkpoint.state_dict`` with ``full_state_dict``) and written as
safetensors + JSON (`peftkit.train.state_files`); each rank takes its own shard back on resume. (DCP's own format
keeps its ``.metadata`` as a pickle, loaded with ``pickle.load``: never loaded here.)
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.quant import QuantLinear
from peftkit.train.config import TrainConfig

__all__ = ["ShardedOptimizer", "all_finite", "check_sharding", "first_rank_object", "full_parameters",
           "global_norm", "prepared_on_first_rank", "shard_model", "shard_targets", "transformer_blocks"]

def check_sharding(cfg: TrainConfig) -> None:
    """Refuse (one line) what a sharded run cannot do yet; nothing for ``sharding: none``."""
    if cfg.sharding == "none":
        return
    if cfg.ewc_lambda > 0:
        raise PeftkitError("ewc_lambda > 0 does not run with sharding yet (the EWC anchor holds whole parameters): "
                           "set ewc_lambda: 0 or sharding: none")
    if cfg.objective != "sft":
        raise PeftkitError(f"objective: {cfg.objective} does not run with sharding yet (its reference pass switches "
                           "the adapter off layer by layer, which sharded blocks do not allow): use objective: sft "
                           "or sharding: none")
    if cfg.eval_metric:
        raise PeftkitError("eval_metric does not run with sharding yet (generation runs on rank 0 alone, a sharded "
                           "model needs every rank): leave eval_metric unset (eval_loss works) or sharding: none")


def _ensure_process_group() -> None:
    """A 1-rank group for a sharded run started without torchrun (FSDP needs a process group)."""
    if dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the classes transformers names in ``_no_split_modules``, else the children of
    its largest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists: list[nn.ModuleList] = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise PeftkitError(f"sharding: {type(model).__name__} has no transformer blocks to shard (no "
                           "_no_split_modules, no nn.ModuleList)")
    sizes = [len(m) for m in lists]
    return list(lists[sizes.index(max(sizes))])


def _quantized_as_parameters(model: nn.Module) -> int:
    """Turn the packed codes and quantization state of every `QuantLinear` into frozen parameters (same names, same
    tensors): FSDP shards parameters, not buffers. The number of layers changed."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        for key, tensor in list(layer._buffers.items()):
            # a scalar (the double-quantization offset, 4 bytes) stays a buffer: FSDP splits along a dimension
            if (key == "weight" or key.startswith("weight_")) and tensor is not None and tensor.dim() > 0:
                del layer._buffers[key]
                layer.register_parameter(key, nn.Parameter(tensor, requires_grad=False))
    return len(layers)


def shard_model(model: nn.Module, sharding: str, from_first_rank: bool = False) -> int:
    """Shard `model` in place with FSDP2 (one unit per transformer block, then the root); the number of units.

    Call it after the method adapted the model and the dtypes are set, before the optimizer is built (FSDP
    replaces the parameters by sharded ones).

    ``from_first_rank``: only rank 0 holds values (its model was loaded, quantized and adapted as one process does
    it); the other ranks built the same modules on the meta device (`peftkit.train.model.prepare_model`,
    ``weights=False``) and receive their shards from it, one tensor at a time (each rank its own rows), so they
    never hold the whole model (`_receive_from_first_rank`).
    """
    from torch.distributed.fsdp import fully_shard

    if sharding not in ("full", "grad_op"):
        raise PeftkitError(f"sharding: expected one of 'none', 'full', 'grad_op', got {sharding!r}")
    _ensure_process_group()
    _quantized_as_parameters(model)
    # rank 0's whole tensors, each kept until sent (FSDP keeps only rank 0's shard of it); the others' are meta
    sources = _named_tensors(model) if from_first_rank else None
    if sources is not None:
        rng_state = _agree_on_layout(sources)
        if dist.get_rank() != 0:
            torch.set_rng_state(rng_state)
    reshard = sharding == "full"
    blocks = transformer_blocks(model)
    names = {id(m): name for name, m in model.named_modules()}
    units = []
    for block in blocks:
        units.append(fully_shard(block, reshard_after_forward=reshard))
        if sources is not None:  # block by block: rank 0 never holds the whole model and all its shards at once
            _receive_from_first_rank(block, sources, names[id(block)] + ".")
    # the root's parameters (embeddings, final norm, head) stay gathered from the forward through the backward:
    # peftkit's loss applies the head to the hidden states after the model's forward (`peftkit.train.loss`)
    units.append(fully_shard(model, reshard_after_forward=False))
    if sources is not None:
        in_blocks = {id(m) for block in blocks for m in block.modules()}
        _receive_from_first_rank(model, sources, "", [m for m in model.modules() if id(m) not in in_blocks])
        if sources:  # never expected: a tensor no unit holds would keep the garbage `to_empty` left on the others
            raise PeftkitError(f"sharding: {len(sources)} tensor(s) of the model were not sent from rank 0, "
                               f"e.g. {next(iter(sources))!r}")
    for unit in units:
        _sum_gradients(unit)
    _prefetch(units[:-1], asynchronous=next(model.parameters()).device.type == "cpu")
    return len(units)


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` by name (a tied one once)."""
    return {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _receive_from_first_rank(unit: nn.Module, sources: dict[str, torch.Tensor], prefix: str,
                             own: list[nn.Module] | None = None) -> None:
    """Give every rank rank 0's values of a unit FSDP just sharded, one tensor at a time: a sharded parameter's
    shards scattered (each rank receives its own only), a buffer broadcast whole. The tensors are found in
    `sources` (model-level names, taken out once sent) under `prefix`; `own`: the modules whose tensors are the
    unit's (the root: all but the blocks'), else all of `unit`'s."""
    rank, device = dist.get_rank(), _mesh_device(unit)
    if rank != 0:  # the meta tensors get memory: this rank's shards only
        for module in own if own is not None else [unit]:
            module.to_empty(device=device, recurse=own is None)
    targets = {prefix + n: t for n, t in _named_tensors(unit).items()}
    with torch.no_grad():
        for name in [n for n in sources if n in targets]:
            source = sources.pop(name)  # rank 0 lets go of each whole tensor once it is sent
            target: Any = targets[name]
            if _is_dtensor(target) and _by_rows(target):
                _scatter_rows(source, target.to_local(), rank, device)
                continue
            if rank == 0:
                whole = source.to(device).contiguous()
            else:
                whole = torch.empty(source.shape, dtype=source.dtype, device=device)
            dist.broadcast(_as_bytes(whole), src=0)
            (_Shard(target) if _is_dtensor(target) else target).copy_(whole)


def _agree_on_layout(sources: dict[str, torch.Tensor]) -> torch.Tensor:
    """Check that every rank built rank 0's tensors (names, shapes, dtypes); rank 0's random number generator state
    (where the others' would be had they drawn the method's initial values themselves).

    Raises:
        PeftkitError: on every rank, when one differs.
    """
    layout = [(n, tuple(t.shape), str(t.dtype)) for n, t in sources.items()]
    first: list[Any] = [layout, torch.get_rng_state()]
    dist.broadcast_object_list(first, src=0)
    agreed: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(agreed, first[0] == layout)
    if not all(agreed):
        ranks = [r for r, same in enumerate(agreed) if not same]
        raise PeftkitError(f"sharding: rank(s) {ranks} built a model different from rank 0's (names, shapes or "
                           "dtypes of their tensors): every rank must load the same model with the same settings")
    return first[1]


def _by_rows(param: Any) -> bool:
    """`param` is split as FSDP2 splits by default: along dimension 0, in ``torch.chunk``'s pieces."""
    from torch.distributed.tensor import Shard

    return param.dim() > 0 and tuple(param.placements) == (Shard(0),)


def _scatter_rows(source: torch.Tensor, local: torch.Tensor, rank: int, device: torch.device) -> None:
    """Rank 0 sends each rank its rows of `source` (``torch.chunk``'s pieces, padded to one size for the collective;
    the last ranks' may be short or empty); each writes them into its `local` shard."""
    world = dist.get_world_size()
    rows = -(-source.shape[0] // world)
    piece = torch.empty((rows, *source.shape[1:]), dtype=source.dtype, device=device)
    pieces = None
    if rank == 0:
        pieces = [torch.zeros_like(piece) for _ in range(world)]
        for i, part in enumerate(source.split(rows)):
            pieces[i][:len(part)].copy_(part)
        pieces = [_as_bytes(p) for p in pieces]
    dist.scatter(_as_bytes(piece), pieces, src=0)
    local.copy_(piece[:local.shape[0]])


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as flat bytes: any dtype goes through gloo or NCCL the same way."""
    return t.reshape(-1).view(torch.uint8)


LOADING_TIMEOUT = datetime.timedelta(hours=2)
"""How long the other ranks wait for rank 0 to load, quantize and adapt the model (`prepared_on_first_rank`)."""


def prepared_on_first_rank(prepare: Callable[[bool], Any]) -> Any:
    """``prepare(weights)`` on every rank: with the weights on rank 0, without them (the meta device) on the others,
    which then wait for rank 0 up to `LOADING_TIMEOUT`, in a group of their own: the run's collectives give up after
    ``dist_timeout`` (10 minutes by default), and reading and quantizing a large model can take longer. (A rank that
    fails ends the launch: torchrun stops the others.)"""
    waiting = dist.new_group(backend="gloo", timeout=LOADING_TIMEOUT)  # every rank, before rank 0 starts loading
    prepared = prepare(dist.get_rank() == 0)
    dist.barrier(group=waiting)
    dist.destroy_process_group(waiting)
    return prepared


def first_rank_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (pickled between the processes of this run, never written)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _mesh_device(model: nn.Module) -> torch.device:
    """Where FSDP keeps `model`'s shards: the device of its mesh (this process's GPU, or the CPU)."""
    p: Any = next(model.parameters())
    kind = p.device_mesh.device_type if _is_dtensor(p) else p.device.type
    return torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)


def _prefetch(blocks: list[Any], asynchronous: bool) -> None:
    """Each block's all-gather starts as the one before it (forward) or after it (backward) begins computing, so the
    transfer overlaps that block's work instead of running between blocks.

    On CPU the collective itself must also run in the background (gloo's own thread): FSDP2 waits for a blocking
    all-gather otherwise, since CPU has no side streams. On 2 cores (`bench/sharding.py`, SmolLM2-135M, LoRA, steps of
    1x128 tokens) the sharded / DDP tokens/s went from 0.46 to 0.54 (full) and 0.61 (grad_op)."""
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1:i + 2])
        block.set_modules_to_backward_prefetch(blocks[i - 1:i] if i else [])
        if asynchronous and hasattr(block, "_set_unshard_async_op"):  # private in torch 2.13: absent later, skipped
            block._set_unshard_async_op(True)


def _sum_gradients(unit: Any) -> None:
    """The gradients of the ranks are summed, not averaged: each rank's loss is already its share of the global
    mean (`peftkit.train.step.TrainStep`, ``loss_scale``).

    Note: averaging needs the loss scaled by the world size first; x3 changes the mantissa of every
    gradient that low precision (bf16 autocast) then rounds, so 3 ranks would round otherwise than one process and
    Adam's sign-like first steps turn those roundings into whole-step differences (x2 is exact, x3 is not)."""
    unit.set_gradient_divide_factor(1.0)
    unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (no PREMUL_SUM, which gloo lacks), no division


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """Within: the trainable parameters of a sharded `model` are whole tensors on every rank (a collective: every
    rank enters it), yielded by name. Unsharded models are yielded as they are."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    whole: dict[int, nn.Parameter] = {}  # by the sharded parameter: a tied one (embeddings = head) stays one tensor
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and _is_dtensor(p):
                if id(p) not in whole:
                    whole[id(p)] = nn.Parameter(p.detach().full_tensor(), requires_grad=True)  # type: ignore
                module._parameters[name] = whole[id(p)]
                swapped.append((module, name, p))
    try:
        yield {n: p for n, p in model.named_parameters() if p.requires_grad}
    finally:
        for module, name, sharded in swapped:
            module._parameters[name] = sharded


def _whole(local: torch.Tensor, param: Any) -> torch.Tensor:
    """A tensor laid out over `param`'s shard (this rank's part), whole: gathered from every rank."""
    if not _is_dtensor(param):
        return local.clone()
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                              stride=param.stride()).full_tensor()


def _mine(whole: torch.Tensor, param: Any) -> torch.Tensor:
    """This rank's part of `whole`, cut as `param` is (no communication)."""
    if not _is_dtensor(param):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()


class _Shard:
    """A sharded parameter as a checkpoint loads it: ``copy_(whole)`` keeps this rank's part (no communication)."""

    def __init__(self, param: torch.Tensor) -> None:
        self.param = param

    def copy_(self, whole: torch.Tensor) -> None:
        p: Any = self.param
        p.to_local().copy_(_mine(whole.to(p.dtype), p))


def shard_targets(params: dict[str, nn.Parameter]) -> dict[str, Any]:
    """`params` as `peftkit.train.checkpoint.load_checkpoint` writes into them: a sharded one keeps its own part of
    the whole tensor it is given."""
    return {n: _Shard(p) if _is_dtensor(p) else p for n, p in params.items()}


def all_finite(params: Iterable[torch.Tensor]) -> bool:
    """Every element of every tensor is finite (for shards: on every rank, agreed by all of them)."""
    params = list(params)
    local = all(bool(torch.isfinite(p.to_local() if _is_dtensor(p) else p).all()) for p in params)  # type: ignore
    if not any(_is_dtensor(p) for p in params):
        return local
    flag = torch.tensor([0.0 if local else 1.0])
    dist.all_reduce(flag)
    return float(flag.item()) == 0.0


def global_norm(norm: torch.Tensor) -> torch.Tensor:
    """The gradient norm as a plain tensor (`torch.nn.utils.clip_grad_norm_` returns a DTensor for shards)."""
    return norm.full_tensor() if _is_dtensor(norm) else norm  # type: ignore[attr-defined]


class ShardedOptimizer:
    """The optimizer of a sharded model as a checkpoint sees it: its state as full tensors keyed by parameter name
    (`state_dict` is a collective: every rank calls it, rank 0 gets the state, the others an empty dict), loaded back
    into each rank's shards (`load_state_dict`, every rank with the same full state). Every optimizer computes on
    the shards: torch's AdamW on the DTensors, peftkit's 8-bit and paged AdamW on each rank's local part, their
    state laid out over it (`peftkit.optim.adamw`); the checkpoint holds theirs as 32-bit moments."""

    collective = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def _options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if hasattr(self.optimizer, "moments"):
            return self._peftkit_state()
        return get_optimizer_state_dict(self.model, self.optimizer, options=self._options())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if hasattr(self.optimizer, "moments"):
            self._load_peftkit_state(state)
            return
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

    def _names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.model.named_parameters()}

    def _peftkit_state(self) -> dict[str, Any]:
        """peftkit's 8-bit / paged AdamW state as torch's AdamW keeps it, whole: each shard's moments (8-bit ones
        dequantized) gathered, keyed by parameter name as `get_optimizer_state_dict` keys torch's (a collective)."""
        names, state, groups = self._names(), {}, []
        for group in self.optimizer.param_groups:
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [names[id(p)] for p in group["params"]]})
            for p in group["params"]:
                moments = self.optimizer.moments(p)  # type: ignore[attr-defined]
                if moments:
                    state[names[id(p)]] = {k: _whole(v, p) if k != "step" else v.clone() for k, v in moments.items()}
        return {"state": state, "param_groups": groups} if dist.get_rank() == 0 else {}

    def _load_peftkit_state(self, state: dict[str, Any]) -> None:
        """A whole state (`_peftkit_state`'s, or torch AdamW's from `get_optimizer_state_dict`) into each rank's
        shards; the 8-bit variants quantize the moments again, over the shards' blocks."""
        names = self._names()
        params = {names[id(p)]: p for group in self.optimizer.param_groups for p in group["params"]}
        index = {name: i for i, name in enumerate(params)}  # torch's ids: the parameters in group order
        local: dict[int, dict[str, Any]] = {}
        for name, saved in state["state"].items():
            if name not in index:
                raise PeftkitError(f"optimizer state names {name!r}, which this run does not train")
            local[index[name]] = {k: _mine(v, params[name]) if k != "step" else v for k, v in saved.items()}
        groups = [{**saved, "params": [index[n] for n in saved["params"]]} for saved in state["param_groups"]]
        self.optimizer.load_state_dict({"state": local, "param_groups": groups})
