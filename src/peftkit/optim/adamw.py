"""AdamW with 8-bit and/or paged optimizer state: ``AdamW8bit``, ``PagedAdamW``, ``PagedAdamW8bit``.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019), per element at step ``t``::

    p <- p * (1 - lr * wd)                                        (decoupled weight decay)
    m <- lerp(m, g, 1 - b1)            = b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The ops and their order are those of ``torch.optim.AdamW(foreach=False)`` (``lerp_``, ``mul_().addcmul_()``,
``sqrt() / bias_correction2_sqrt + eps``, ``addcdiv_`` with ``-lr / bias_correction1``; the bias corrections in
Python floats), so a 32-bit optimizer here is bit-identical to it. The ops run as ``torch._foreach_*`` calls over
batches of pages; on CPU these compute exactly the single-tensor path's per-element results, whatever the slicing
(tested). On CUDA the foreach kernels are torch's own and equal to its foreach AdamW, not checked here bit for bit.

8-bit state (Dettmers et al., 2022): ``m`` and ``v`` are stored as uint8 indices into the signed / unsigned dynamic
map with one fp32 absmax per block of 256 (``dynamic8.py``): 2 + 8/256 bytes per parameter instead of 8. Each step
dequantizes them, runs the update above in fp32 (the parameter update uses the fresh fp32 moments), and
re-quantizes. Tensors under ``min_8bit_size`` (4096) elements keep 32-bit state, where 8 bits save little and cost
accuracy.

Paged state: the state lives in host memory, in pages of a contiguous range of the flattened parameter; a
:class:`~peftkit.optim.pager.Pager` brings the pages a batch needs into device memory bounded by
``page_budget_bytes`` and evicts the least recently used ones (see ``pager.py``). Paging moves bytes, never changes
them, so a paged optimizer is bit-identical to the same optimizer unpaged.

Sharded parameters (FSDP2's DTensors, `peftkit.train.sharding`) are updated through this rank's shard: the state
is laid out over the shard, so each rank holds its part of it. Whether a parameter gets 8-bit state is decided by its
whole size, as unsharded; the 256-element blocks run over the shard, so they are the unsharded blocks only where a
shard starts at a multiple of 256 elements.

Note:
    Besides the (budgeted) state, a step uses scratch buffers on the device of at most ~17 bytes per element of
    one batch (``_BATCH_ELEMS`` = 4M elements, ~70 MiB): the ``sqrt(v)`` denominator, and for 8-bit pages the
    dequantized moments and the quantizer's work buffers. They are allocated once and reused, because allocating
    big temporaries every step costs page faults that are slower than the update itself on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._device import Transfer
from .dynamic8 import BLOCK_SIZE, DynamicCodebook
from .pager import Page, Pager, contiguous_ranges, page_numel

_BATCH_ELEMS = 1 << 22  # elements per update batch: bounds the scratch memory
_SCRATCH_MIN = 1 << 15  # pages this large take the sqrt(v) denominator from scratch instead of allocating it
_BYTES_8BIT_BLOCK = 2 * BLOCK_SIZE + 2 * 4  # two uint8 codes per element + two fp32 absmax per block
_PAGE_SLACK = 64  # alignment padding of the pieces inside a page buffer
_KEYS_32 = ("exp_avg", "exp_avg_sq")
_KEYS_8 = ("state1", "state2", "absmax1", "absmax2")


def adamw_foreach_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    denoms: Sequence[Tensor | None] | None = None,
) -> None:
    """One AdamW update of many tensors in place, in ``torch.optim.AdamW``'s single-tensor op order.

    Args:
        params: Parameters (or views of them), updated in place.
        grads: Gradients, shaped like ``params``.
        exp_avgs: First moments, updated in place.
        exp_avg_sqs: Second moments, updated in place.
        steps: The step count ``t`` (already incremented) of each tensor.
        lr: Learning rate.
        beta1: First-moment decay.
        beta2: Second-moment decay.
        eps: Denominator epsilon.
        weight_decay: Decoupled weight decay.
        denoms: Optional preallocated buffers for ``sqrt(v)`` (``None`` entries allocate).
    """
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    # Same Python-float arithmetic as torch: bias_correction2 ** 0.5 and -(lr / bias_correction1).
    bias_correction2_sqrt = [(1 - beta2**s) ** 0.5 for s in steps]
    neg_step_size = [-(lr / (1 - beta1**s)) for s in steps]
    if denoms is None:
        denom = list(torch._foreach_sqrt(exp_avg_sqs))
    else:
        small = [i for i, d in enumerate(denoms) if d is None]
        denom = list(denoms)  # type: ignore[arg-type]
        for i, d in enumerate(denoms):
            if d is not None:
                torch.sqrt(exp_avg_sqs[i], out=d)
        if small:
            for i, d in zip(small, torch._foreach_sqrt([exp_avg_sqs[i] for i in small]), strict=True):
                denom[i] = d
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, neg_step_size)


def _is_sharded(t: Tensor) -> bool:
    return hasattr(t, "to_local")  # a DTensor (`torch.distributed.tensor`), without importing torch.distributed


def _local(t: Tensor) -> Tensor:
    """A DTensor's local part (detached: a plain tensor sharing its storage); any other tensor as it is."""
    return t.detach().to_local() if _is_sharded(t) else t  # type: ignore[attr-defined]


def _state_dtype(p: Tensor) -> torch.dtype:
    # Full-precision state follows the parameter when that is fp32/fp64 (as torch does); 16-bit parameters get
    # fp32 state ("32-bit" optimizer) and an fp32 update of an upcast copy.
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


def _dequantize_pages_(
    pages: list[Page], offsets: list[int], qi: int, ai: int, book: DynamicCodebook,
    out: Tensor, idx: Tensor, absmax: Tensor,
) -> None:
    """Dequantize piece ``qi`` (codes) / ``ai`` (absmax) of 8-bit pages into ``out`` at block-aligned offsets.

    Padding between pages decodes to exactly 0 (the zero code), so it never raises a block's absmax when the
    batch is re-quantized.
    """
    if any(pg.numel % BLOCK_SIZE for pg in pages):
        idx.fill_(book.zero_index)
    torch._foreach_copy_([idx[o : o + pg.numel] for pg, o in zip(pages, offsets, strict=True)],
                         [pg.dev[qi] for pg in pages])  # type: ignore[index]
    torch.index_select(book.code, 0, idx, out=out)
    torch.cat([pg.dev[ai] for pg in pages], out=absmax)  # type: ignore[index]
    out.view(-1, BLOCK_SIZE).mul_(absmax[:, None])


def _quantize_pages_(
    pages: list[Page], offsets: list[int], qi: int, ai: int, book: DynamicCodebook,
    x: Tensor, codes: Tensor, absmax: Tensor, scratch_f32: Tensor, scratch_i32: Tensor,
) -> None:
    """Quantize the batch scratch ``x`` (destroyed) back into piece ``qi`` / ``ai`` of each 8-bit page."""
    blocks = x.view(-1, BLOCK_SIZE)
    torch.amax(torch.abs(x, out=scratch_f32).view(-1, BLOCK_SIZE), dim=1, out=absmax)
    # An all-zero block has absmax 0: divide by the smallest normal instead, which maps it to the zero code.
    blocks.div_(absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
    book.nearest(x, codes, scratch_i32, scratch_f32)
    torch._foreach_copy_([pg.dev[qi] for pg in pages],  # type: ignore[index]
                         [codes[o : o + pg.numel] for pg, o in zip(pages, offsets, strict=True)])
    torch._foreach_copy_(
        [pg.dev[ai] for pg in pages],  # type: ignore[index]
        [absmax[o // BLOCK_SIZE : o // BLOCK_SIZE + pg.dev[ai].numel()]  # type: ignore[index]
         for pg, o in zip(pages, offsets, strict=True)],
    )


def _check_arguments(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                     page_budget_bytes: int | None, page_bytes: int) -> None:
    if not 0.0 <= lr:
        raise ValueError(f"invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"invalid eps: {eps}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"invalid betas: {betas}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"invalid weight_decay: {weight_decay}")
    if page_budget_bytes is not None and page_budget_bytes <= 0:
        raise ValueError(f"page_budget_bytes must be a positive number of bytes, got {page_budget_bytes}")
    if page_bytes <= 0:
        raise ValueError(f"page_bytes must be positive, got {page_bytes}")


def _paged_page_bytes(page_bytes: int, page_budget_bytes: int | None) -> int:
    """The page size of a paged optimizer with the given budget."""
    min_page = 2 * 4 * BLOCK_SIZE  # one 256-element page of fp32 m and v
    if page_budget_bytes is not None:
        # Pages of at most a quarter of the budget, so a batch (half the budget) can be prefetched
        # while another computes; a budget below four pages gets pages as large as it allows.
        quarter = page_budget_bytes // 4
        page_bytes = min(page_bytes, quarter if quarter >= min_page else page_budget_bytes)
    if page_bytes < min_page:
        raise ValueError(f"page_budget_bytes={page_budget_bytes} is below the smallest page ({min_page} B)")
    return page_bytes


def _eight_bit_pages(p: Tensor, st: dict[str, Any], page_bytes: int) -> list[Page]:
    """Pages of an 8-bit state: absmax1, absmax2, codes1, codes2 of whole blocks."""
    per = page_numel(page_bytes - _PAGE_SLACK, _BYTES_8BIT_BLOCK)
    if per == 0:
        raise ValueError(f"page size {page_bytes} B is too small for one 8-bit page")
    a1, a2 = st["absmax1"].view(-1), st["absmax2"].view(-1)
    q1, q2 = st["state1"].view(-1), st["state2"].view(-1)
    pages = []
    for a, b in contiguous_ranges(p.numel(), per):
        ba, bb = a // BLOCK_SIZE, -(-b // BLOCK_SIZE)
        host = [a1[ba:bb], a2[ba:bb], q1[a:b], q2[a:b]]
        pages.append(Page(p, a, b, True, host, [(bb - ba,), (bb - ba,), (b - a,), (b - a,)]))
    return pages


def _full_pages(p: Tensor, st: dict[str, Any], page_bytes: int | None) -> list[Page]:
    """Pages of a 32-bit state (m, v); `page_bytes` None: one page, the state tensors whole (no scratch)."""
    n = p.numel()
    m, v = st["exp_avg"], st["exp_avg_sq"]
    if page_bytes is not None:
        per = page_numel(page_bytes, 2 * m.element_size() * BLOCK_SIZE)
        if per == 0:
            raise ValueError(f"page size {page_bytes} B is too small for one page of {m.dtype} state")
    else:
        per = max(n, 1)
    pages = []
    for a, b in contiguous_ranges(n, per):
        whole = a == 0 and b == n
        shape = tuple(p.shape) if whole else (b - a,)
        host = [m.view(-1)[a:b], v.view(-1)[a:b]]
        pages.append(Page(p, a, b, False, host, [shape, shape]))
    return pages


@dataclass
class _EightBitBatch:
    """The 8-bit pages of one update batch, dequantized into flat fp32 scratch (`m`, `v`), each page at an offset
    that is a multiple of the block size, so the blockwise ops run once per batch rather than once per page."""

    pages: list[Page]
    offsets: list[int]
    total: int
    books: tuple[DynamicCodebook, DynamicCodebook]
    m: Tensor
    v: Tensor
    denom: Tensor
    idx: Tensor
    absmax: Tensor


@dataclass
class _Operands:
    """The lists `adamw_foreach_` takes for one batch, and the upcast copies to write back after it."""

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    denoms: list[Tensor | None] = field(default_factory=list)
    writeback: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def add(self, pv: Tensor, gv: Tensor, m: Tensor, v: Tensor, d: Tensor | None, step: float) -> None:
        """One page: parameter and gradient views in the state's dtype (16-bit ones as fp32 copies)."""
        if pv.dtype != m.dtype:
            p32 = pv.to(m.dtype)
            self.writeback.append((pv, p32))
            pv = p32
        if gv.dtype != m.dtype:
            gv = gv.to(m.dtype)
        self.params.append(pv)
        self.grads.append(gv)
        self.exp_avgs.append(m)
        self.exp_avg_sqs.append(v)
        self.denoms.append(d)
        self.steps.append(step)


def _grad_views(batch: list[Page]) -> list[tuple[Tensor, Tensor]]:
    """Each page's parameter and gradient, as views matching its state."""
    flat_grads: dict[Tensor, Tensor] = {}
    views = []
    for page in batch:
        p = page.param
        assert p.grad is not None
        if page.whole and not page.eight_bit:
            views.append((p, p.grad))  # same shape as the state views: no per-step view needed
            continue
        g = flat_grads.get(p)
        if g is None:
            g = flat_grads[p] = p.grad.reshape(-1)
        views.append((p.view(-1)[page.start : page.stop], g[page.start : page.stop]))
    return views


class _AdamWEngine(Optimizer):
    """The update engine shared by the 8-bit and paged AdamW variants (see the module docstring): state layout,
    pages and the step; `_AdamWBase` adds persistence and figures."""

    _eight_bit = False
    _paged = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = 4096,
        page_budget_bytes: int | None = None,
        page_bytes: int = 1 << 22,
        device: torch.device | str | None = None,
    ) -> None:
        _check_arguments(lr, betas, eps, weight_decay, page_budget_bytes, page_bytes)
        super().__init__(params, dict(lr=float(lr), betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = int(min_8bit_size)
        self._pages: dict[Tensor, list[Page]] = {}
        self._shards: dict[Tensor, Tensor] = {}  # a sharded parameter's local shard, the tensor its pages update
        self._books: dict[torch.device, tuple[DynamicCodebook, DynamicCodebook]] = {}
        self._scratch: dict[tuple[torch.device, str], Tensor] = {}
        self.pager: Pager | None = None
        self._transfer: Transfer | None = None
        self._page_bytes = page_bytes
        if self._paged:
            params_all = [p for g in self.param_groups for p in g["params"]]
            dev = torch.device(device) if device is not None else (params_all[0].device if params_all else "cpu")
            for p in params_all:
                if p.device != dev:
                    raise ValueError(f"paged optimizer computes on {dev} but a parameter is on {p.device}")
            self._page_bytes = _paged_page_bytes(page_bytes, page_budget_bytes)
            self._transfer = Transfer(dev)
            self.pager = Pager(page_budget_bytes, self._transfer)

    # ------------------------------------------------------------------------------------------------ state
    def _alloc(self, p: Tensor, shape: Sequence[int] | torch.Size, dtype: torch.dtype) -> Tensor:
        if self._transfer is not None:
            return self._transfer.host_zeros(shape, dtype)
        return torch.zeros(tuple(shape), dtype=dtype, device=p.device)

    def _place(self, p: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
        if self._transfer is not None:
            return self._transfer.to_host(t, dtype)
        return t.detach().to(device=p.device, dtype=dtype, copy=True).contiguous()

    def _init_state(self, param: Tensor, state: dict[str, Any]) -> None:
        p = self._target(param)
        if not p.is_contiguous():
            raise ValueError("peftkit AdamW variants need contiguous parameters")
        if self._paged and p.device != self._transfer.device:  # type: ignore[union-attr]
            raise ValueError(f"paged optimizer computes on {self._transfer.device} but a parameter is on {p.device}")  # type: ignore[union-attr]
        scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype)
        if self._eight_bit and param.numel() >= self.min_8bit_size:  # the whole parameter's size, sharded or not
            n_blocks = -(-p.numel() // BLOCK_SIZE)
            state["state1"] = self._alloc(p, p.shape, torch.uint8)
            state["state2"] = self._alloc(p, p.shape, torch.uint8)
            state["absmax1"] = self._alloc(p, (n_blocks,), torch.float32)
            state["absmax2"] = self._alloc(p, (n_blocks,), torch.float32)
        else:
            state["exp_avg"] = self._alloc(p, p.shape, _state_dtype(p))
            state["exp_avg_sq"] = self._alloc(p, p.shape, _state_dtype(p))
        self._build_pages(param)

    def _build_pages(self, p: Tensor) -> None:
        """Cut the state of ``p`` into pages (for an unpaged optimizer: chunks that bound the scratch memory)."""
        st, local = self.state[p], self._shards.get(p, p)
        if "state1" in st:
            pages = _eight_bit_pages(local, st, self._page_bytes)
        else:
            pages = _full_pages(local, st, self._page_bytes if self._paged else None)
        if not self._paged:
            for page in pages:
                page.dev = [t.view(s) for t, s in zip(page.host, page.shapes, strict=True)]
        self._pages[p] = [pg for pg in pages if pg.numel > 0]

    def _codebooks(self, device: torch.device) -> tuple[DynamicCodebook, DynamicCodebook]:
        books = self._books.get(device)
        if books is None:
            books = (DynamicCodebook.build(True, device), DynamicCodebook.build(False, device))
            self._books[device] = books
        return books

    def _buffer(self, device: torch.device, name: str, numel: int, dtype: torch.dtype) -> Tensor:
        buf = self._scratch.get((device, name))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._scratch[(device, name)] = buf
        return buf[:numel]

    # ------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D401 - torch's signature
        """Perform one optimisation step.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, if a closure was given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad, targets = [], []  # the parameters, and the tensors their updates run on (`_target`)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state)
                local = self._target(p)
                if local is not p:
                    local.grad = _local(p.grad)
                with_grad.append(p)
                targets.append(local)
            if not with_grad:
                continue
            step_ts = [self.state[p]["step"] for p in with_grad]
            torch._foreach_add_(step_ts, 1.0)
            steps = dict(zip(targets, torch.stack(step_ts).tolist(), strict=True))
            pages = [page for p in with_grad for page in self._pages[p]]
            self._update(group, pages, steps)
            for p, local in zip(with_grad, targets, strict=True):
                if local is not p:
                    local.grad = None  # the gradient stays the sharded parameter's alone
        return loss

    def _target(self, p: Tensor) -> Tensor:
        """The tensor `p`'s update runs on: `p`, or a sharded parameter's local shard (a plain tensor sharing its
        storage; checked each time, so a parameter given new storage gets new pages)."""
        if not _is_sharded(p):
            return p
        local = _local(p)
        known = self._shards.get(p)
        if known is None or known.data_ptr() != local.data_ptr() or known.shape != local.shape:
            self._shards[p] = known = local
            if p in self._pages:
                self._build_pages(p)
        return known

    def _batches(self, pages: list[Page]) -> list[list[Page]]:
        limit = self.pager.batch_bytes if self.pager is not None else None
        batches: list[list[Page]] = []
        batch: list[Page] = []
        elems = nbytes = 0
        for page in pages:
            too_big = limit is not None and nbytes + page.buffer_bytes > limit
            other_device = batch and page.param.device != batch[0].param.device  # scratch is per device
            if batch and (too_big or other_device or elems + page.numel > _BATCH_ELEMS):
                batches.append(batch)
                batch, elems, nbytes = [], 0, 0
            batch.append(page)
            elems += page.numel
            nbytes += page.buffer_bytes
        if batch:
            batches.append(batch)
        return batches

    def _update(self, group: dict[str, Any], pages: list[Page], steps: dict[Tensor, float]) -> None:
        batches = self._batches(pages)
        for i, batch in enumerate(batches):
            if self.pager is not None:
                self.pager.acquire(batch)
            self._update_batch(group, batch, steps)
            if self.pager is not None:
                self.pager.release(batch)
                if i + 1 < len(batches):
                    # Start moving the next batch while this one computes (asynchronous on CUDA).
                    self.pager.prefetch(batches[i + 1], protect=batch)

    def _update_batch(self, group: dict[str, Any], batch: list[Page], steps: dict[Tensor, float]) -> None:
        """Update the pages of one batch: one ``adamw_foreach_`` over all of them (8-bit pages through one flat
        fp32 scratch, `_EightBitBatch`)."""
        beta1, beta2 = group["betas"]
        device = batch[0].param.device
        eight = self._dequantize_batch(device, [pg for pg in batch if pg.eight_bit])
        ops = self._operands(device, batch, steps, eight)
        adamw_foreach_(
            ops.params, ops.grads, ops.exp_avgs, ops.exp_avg_sqs, ops.steps, lr=group["lr"], beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], denoms=ops.denoms,
        )
        if eight is not None:
            self._requantize_batch(device, eight)
        for dst, src in ops.writeback:
            dst.copy_(src)

    def _dequantize_batch(self, device: torch.device, pages: list[Page]) -> _EightBitBatch | None:
        if not pages:
            return None
        offsets: list[int] = []
        total = 0
        for pg in pages:
            offsets.append(total)
            total += -(-pg.numel // BLOCK_SIZE) * BLOCK_SIZE
        signed, unsigned = books = self._codebooks(device)
        eight = _EightBitBatch(
            pages, offsets, total, books,
            m=self._buffer(device, "m8", total, torch.float32),
            v=self._buffer(device, "v8", total, torch.float32),
            denom=self._buffer(device, "denom8", total, torch.float32),
            idx=self._buffer(device, "idx8", total, torch.int32),
            absmax=self._buffer(device, "absmax8", total // BLOCK_SIZE, torch.float32),
        )
        _dequantize_pages_(pages, offsets, 2, 0, signed, eight.m, eight.idx, eight.absmax)
        _dequantize_pages_(pages, offsets, 3, 1, unsigned, eight.v, eight.idx, eight.absmax)
        return eight

    def _requantize_batch(self, device: torch.device, eight: _EightBitBatch) -> None:
        signed, unsigned = eight.books
        codes = self._buffer(device, "codes8", eight.total, torch.uint8)
        # The denominators are spent: their buffer is the quantizer's float scratch.
        _quantize_pages_(eight.pages, eight.offsets, 2, 0, signed, eight.m, codes, eight.absmax, eight.denom,
                         eight.idx)
        _quantize_pages_(eight.pages, eight.offsets, 3, 1, unsigned, eight.v, codes, eight.absmax, eight.denom,
                         eight.idx)

    def _operands(self, device: torch.device, batch: list[Page], steps: dict[Tensor, float],
                  eight: _EightBitBatch | None) -> _Operands:
        """Each page's parameter, gradient, moments and denominator buffer (scratch for the large 32-bit pages)."""
        big32 = sum(pg.numel for pg in batch if not pg.eight_bit and pg.numel >= _SCRATCH_MIN)
        d32_buf = self._buffer(device, "denom32", big32, torch.float32) if big32 else None
        ops = _Operands()
        i8 = off32 = 0
        for page, (pv, gv) in zip(batch, _grad_views(batch), strict=True):
            n, dev = page.numel, page.dev
            assert dev is not None
            d: Tensor | None = None
            if page.eight_bit:
                assert eight is not None
                o = eight.offsets[i8]
                i8 += 1
                m, v, d = eight.m[o : o + n], eight.v[o : o + n], eight.denom[o : o + n]
            else:
                m, v = dev
                if n >= _SCRATCH_MIN:
                    assert d32_buf is not None
                    d = d32_buf[off32 : off32 + n].view(m.shape)
                    off32 += n
            ops.add(pv, gv, m, v, d, steps[page.param])
        return ops



class _AdamWBase(_AdamWEngine):
    """The 8-bit and paged AdamW variants' state as checkpoints see it (torch's ``state_dict`` format, 32-bit moments
    of a shard for sharded runs) and their memory figures."""

    # ------------------------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer ``state_dict`` (paged: after writing resident pages back to the host)."""
        if self.pager is not None:
            self.pager.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict`` (copied, so continuing never mutates it); 32-bit AdamW state (e.g. from
        ``torch.optim.AdamW``) loads into any variant and is quantized by the 8-bit ones on their next step."""
        if self.pager is not None:
            self.pager.drop()
        self._pages.clear()
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for pid, p in zip(ids, params, strict=True):
            src = state_dict["state"].get(pid)
            if not src:
                continue
            self.state[p] = self._loaded(pid, p, src)
            self._build_pages(p)

    def _loaded(self, pid: int, param: Tensor, src: dict[str, Any]) -> dict[str, Any]:
        """One parameter's saved state, checked and placed as this optimizer keeps it (a sharded parameter's: the
        state of its shard)."""
        p = self._target(param)
        step = src["step"]
        new: dict[str, Any] = {
            "step": step.detach().to("cpu", copy=True) if torch.is_tensor(step) else torch.tensor(float(step))
        }
        keys = _KEYS_8 if "state1" in src else _KEYS_32
        for key in keys:
            if key not in src:
                raise ValueError(f"optimizer state of parameter {pid} lacks {key!r}")
            t = src[key]
            want = p.numel() if key.startswith(("state", "exp")) else -(-p.numel() // BLOCK_SIZE)
            if t.numel() != want:
                raise ValueError(f"state {key!r} of parameter {pid} has {t.numel()} elements, expected {want}")
            dtype = torch.uint8 if key.startswith("state") else (
                torch.float32 if key.startswith("absmax") else _state_dtype(p)
            )
            new[key] = self._place(p, t.reshape(p.shape) if key.startswith(("state", "exp")) else t, dtype)
        if keys is _KEYS_32 and self._eight_bit and param.numel() >= self.min_8bit_size:
            new.update(self._quantized(p, new.pop("exp_avg"), new.pop("exp_avg_sq")))
        return new

    def moments(self, p: Tensor) -> dict[str, Tensor]:
        """`p`'s state as 32-bit AdamW keeps it: ``step``, ``exp_avg``, ``exp_avg_sq`` (8-bit state dequantized), over
        this rank's shard when `p` is sharded, shaped like it; empty before `p`'s first step. `load_state_dict` takes
        this form back (the 8-bit variants quantize it again)."""
        from .dynamic8 import dequantize_blockwise_dynamic

        if self.pager is not None:
            self.pager.flush()
        st = self.state.get(p)
        if not st:
            return {}
        if "state1" not in st:
            return {"step": st["step"], "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
        shape = self._target(p).shape
        signed, unsigned = self._codebooks(st["state1"].device)
        return {"step": st["step"],
                "exp_avg": dequantize_blockwise_dynamic(st["state1"], st["absmax1"], signed).view(shape),
                "exp_avg_sq": dequantize_blockwise_dynamic(st["state2"], st["absmax2"], unsigned).view(shape)}

    def _quantized(self, p: Tensor, m: Tensor, v: Tensor) -> dict[str, Tensor]:
        from .dynamic8 import quantize_blockwise_dynamic

        signed, unsigned = self._codebooks(m.device)
        q1, a1 = quantize_blockwise_dynamic(m, signed)
        q2, a2 = quantize_blockwise_dynamic(v, unsigned)
        return {
            "state1": self._place(p, q1, torch.uint8), "state2": self._place(p, q2, torch.uint8),
            "absmax1": self._place(p, a1, torch.float32), "absmax2": self._place(p, a2, torch.float32),
        }

    # ---------------------------------------------------------------------------------------------- figures
    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state: ``{"device": ..., "host": ...}``.

        Unpaged: everything is on the parameters' device. Paged: ``host`` is the full state in host memory,
        ``device`` the resident pages' device buffers now (bounded by ``page_budget_bytes``; the peak is in
        ``self.pager.peak_resident_bytes``).
        """
        total = sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values() if torch.is_tensor(t))
        if self.pager is None:
            return {"device": total, "host": 0}
        return {"device": self.pager.resident_bytes, "host": total}


class AdamW8bit(_AdamWBase):
    """AdamW with blockwise 8-bit ``m`` and ``v`` (signed / unsigned dynamic map, block 256, fp32 absmax).

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        betas: ``(beta1, beta2)``.
        eps: Denominator epsilon.
        weight_decay: Decoupled weight decay (torch's default 1e-2).
        min_8bit_size: Tensors with fewer elements keep 32-bit state.
        page_bytes: State bytes updated per chunk (bounds the fp32 scratch of the dequantized moments).
    """

    _eight_bit = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = 4096,
        page_bytes: int = 1 << 22,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size=min_8bit_size, page_bytes=page_bytes)


class PagedAdamW(_AdamWBase):
    """AdamW with 32-bit state paged between host memory and the device under a byte budget.

    Bit-identical to ``torch.optim.AdamW(foreach=False)`` for fp32 parameters, whatever the budget.

    Args:
        params: Parameters or parameter groups (all on one device).
        lr: Learning rate.
        betas: ``(beta1, beta2)``.
        eps: Denominator epsilon.
        weight_decay: Decoupled weight decay (torch's default 1e-2).
        page_budget_bytes: Device bytes for resident state pages; ``None`` for no limit. Must be positive; a budget
            below ``page_bytes`` shrinks the pages to fit (down to 256 elements).
        page_bytes: Largest page, in bytes of state.
        device: The compute device (default: the parameters' device; they must all be on it).

    Raises:
        ValueError: On a non-positive or too small budget, or parameters on another device.
    """

    _paged = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        page_budget_bytes: int | None = None,
        page_bytes: int = 1 << 22,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay,
            page_budget_bytes=page_budget_bytes, page_bytes=page_bytes, device=device,
        )


class PagedAdamW8bit(_AdamWBase):
    """AdamW with 8-bit state (as :class:`AdamW8bit`) paged under a byte budget (as :class:`PagedAdamW`).

    Bit-identical to :class:`AdamW8bit` whatever the budget.

    Args:
        params: Parameters or parameter groups (all on one device).
        lr: Learning rate.
        betas: ``(beta1, beta2)``.
        eps: Denominator epsilon.
        weight_decay: Decoupled weight decay (torch's default 1e-2).
        min_8bit_size: Tensors with fewer elements keep 32-bit state.
        page_budget_bytes: Device bytes for resident state pages; ``None`` for no limit.
        page_bytes: Largest page, in bytes of state.
        device: The compute device (default: the parameters' device).
    """

    _eight_bit = True
    _paged = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = 4096,
        page_budget_bytes: int | None = None,
        page_bytes: int = 1 << 22,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, min_8bit_size=min_8bit_size,
            page_budget_bytes=page_budget_bytes, page_bytes=page_bytes, device=device,
        )


PagedAdamW32bit = PagedAdamW
