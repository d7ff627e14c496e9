"""Paging of optimizer state between host memory and a byte-budgeted share of device memory.

The state of every parameter lives in host memory, cut into *pages*: a page is the state of a contiguous range of
at most ``page_bytes`` of the flattened parameter (for AdamW: that range of ``m`` and ``v``, or of the 8-bit codes
and their absmax). Before an update touches a page the pager makes it resident (host -> device buffer); when the
budget has no room it evicts the least recently used pages that the current batch does not need, writing them
back (device -> host) first. Hence at every moment::

    resident bytes = sum of the device buffers of resident pages <= budget_bytes

Updates run on batches of at most half the budget, so the next batch can be prefetched into the other half while
the current one computes (asynchronous on CUDA; see ``_device.py``). A page is never larger than the budget, so a
budget below one tensor's state still works: its pages go through one at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from ._device import Transfer

_ALIGN = 16  # byte alignment of each piece inside a page buffer (any float dtype can view it)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(eq=False)
class Page:
    """The state of one contiguous range of one parameter.

    Attributes:
        param: The parameter.
        start: First element (of the flattened parameter) covered.
        stop: One past the last element covered.
        eight_bit: Whether the state is 8-bit (pieces: absmax1, absmax2, state1, state2) or full precision
            (pieces: exp_avg, exp_avg_sq).
        host: The state pieces in host memory (views into the optimizer's state tensors).
        shapes: Shape each piece takes when resident (the parameter's shape for a whole-parameter 32-bit page).
        nbytes: Bytes of state in this page.
        dev: The pieces where the update reads them (views of ``buffer`` while resident; ``host`` unpaged).
        buffer: The device buffer of a resident page, or ``None``.
        dirty: Whether the resident copy is newer than the host copy.
        event: Compute event after the last update of the resident copy (CUDA) or ``None``.
    """

    param: Tensor
    start: int
    stop: int
    eight_bit: bool
    host: list[Tensor]
    shapes: list[tuple[int, ...]]
    nbytes: int = 0
    dev: list[Tensor] | None = None
    buffer: Tensor | None = None
    dirty: bool = False
    event: object | None = None
    _offsets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        offset = 0
        self._offsets = []
        for t in self.host:
            self._offsets.append(offset)
            offset = _aligned(offset + t.numel() * t.element_size())
        self.nbytes = sum(t.numel() * t.element_size() for t in self.host)
        self.buffer_bytes = offset

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.param.numel()

    def views(self, buffer: Tensor) -> list[Tensor]:
        """The page's pieces as views into a device buffer (uint8, ``buffer_bytes`` long)."""
        out = []
        for t, off, shape in zip(self.host, self._offsets, self.shapes, strict=True):
            nb = t.numel() * t.element_size()
            out.append(buffer[off : off + nb].view(t.dtype).view(shape))
        return out


class Pager:
    """LRU cache of pages in device memory under a byte budget.

    Each resident page owns a device buffer of its own (aligned) size, so small pages (LoRA matrices) do not waste a
    whole page-sized buffer; the budget bounds the sum of those buffers.

    Args:
        budget_bytes: Device bytes resident pages may take; ``None`` for no limit (every page stays resident).
        transfer: Host/device copies for the compute device.

    Raises:
        ValueError: If the budget is not positive.
    """

    def __init__(self, budget_bytes: int | None, transfer: Transfer) -> None:
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"page budget must be a positive number of bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.transfer = transfer
        self._lru: OrderedDict[Page, None] = OrderedDict()
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.page_ins = 0
        self.page_outs = 0

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def batch_bytes(self) -> int | None:
        """Most page bytes one update batch should hold: half the budget, so the next batch can be prefetched."""
        return None if self.budget_bytes is None else self.budget_bytes // 2

    def stats(self) -> dict[str, int]:
        """Counters for tests and benchmarks."""
        return {
            "resident_bytes": self.resident_bytes,
            "peak_resident_bytes": self.peak_resident_bytes,
            "page_ins": self.page_ins,
            "page_outs": self.page_outs,
            "resident_pages": len(self._lru),
        }

    # ------------------------------------------------------------------------------------------- residency
    def _make_room(self, nbytes: int, protect: set[Page]) -> bool:
        if self.budget_bytes is None:
            return True
        if nbytes > self.budget_bytes:
            raise ValueError(f"a page of {nbytes} B does not fit the page budget of {self.budget_bytes} B")
        victims = iter([pg for pg in self._lru if pg not in protect])  # least recently used first
        while self.resident_bytes + nbytes > self.budget_bytes:
            victim = next(victims, None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, page: Page) -> None:
        if page.dirty:
            self.transfer.copy(page.host, page.dev, after=page.event)  # type: ignore[arg-type]
            self.page_outs += 1
        del self._lru[page]
        self.resident_bytes -= page.buffer_bytes
        page.dev, page.buffer, page.dirty, page.event = None, None, False, None

    def _load(self, page: Page, protect: set[Page]) -> bool:
        if not self._make_room(page.buffer_bytes, protect):
            return False
        page.buffer = self.transfer.device_buffer(page.buffer_bytes)
        page.dev = page.views(page.buffer)
        self.transfer.copy(page.dev, page.host)
        self.page_ins += 1
        self._lru[page] = None
        self.resident_bytes += page.buffer_bytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        return True

    def prefetch(self, pages: Sequence[Page], protect: Iterable[Page] = ()) -> None:
        """Start loading ``pages``, as far as they fit without evicting any page of ``pages`` or ``protect``."""
        keep = set(pages) | set(protect)
        for page in pages:
            if page.dev is None and not self._load(page, keep):
                return

    def acquire(self, pages: Sequence[Page]) -> None:
        """Make ``pages`` resident (``page.dev`` set) and most recently used; the compute stream waits for them.

        Raises:
            RuntimeError: If ``pages`` together exceed the budget.
        """
        keep: set[Page] | None = None
        for page in pages:
            if page.dev is None:
                if keep is None:
                    keep = set(pages)
                if not self._load(page, keep):
                    raise RuntimeError(f"pages of one batch exceed the page budget of {self.budget_bytes} B")
            else:
                self._lru.move_to_end(page)
        self.transfer.wait_copies()

    def release(self, pages: Sequence[Page]) -> None:
        """Mark ``pages`` as updated on the device (to be written back on eviction or flush)."""
        event = self.transfer.record_compute()
        for page in pages:
            page.dirty = True
            page.event = event

    def flush(self) -> None:
        """Write every dirty resident page back to the host (pages stay resident), and wait for it."""
        for page in self._lru:
            if page.dirty:
                self.transfer.copy(page.host, page.dev, after=page.event)  # type: ignore[arg-type]
                self.page_outs += 1
                page.dirty = False
        self.transfer.synchronize()

    def drop(self) -> None:
        """Forget all resident pages without writing them back (the host copy has been replaced)."""
        self.transfer.synchronize()
        for page in list(self._lru):
            page.dirty = False
            self._evict(page)

    def evict_all(self) -> None:
        """Write everything back and free the device memory of all pages."""
        for page in list(self._lru):
            self._evict(page)
        self.transfer.synchronize()


def page_numel(page_bytes: int, bytes_per_block: int, block: int = 256) -> int:
    """Elements per page such that a page's state fits ``page_bytes``; a multiple of ``block`` (0 if none fits)."""
    return (page_bytes // bytes_per_block) * block


def contiguous_ranges(numel: int, per_page: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``per_page`` elements covering ``numel``."""
    return [(a, min(a + per_page, numel)) for a in range(0, numel, per_page)] or [(0, 0)]

