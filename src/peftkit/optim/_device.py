"""Host <-> device transfers for the pager: the only device-specific code of ``peftkit.optim``.

On CUDA, host pages live in pinned memory and every copy runs on a side stream, so moving the next pages overlaps
the update of the current ones; events order the two streams:

    compute(batch i) --event--> side stream: write back / evict pages of batch i, load pages of batch i+1
    side stream --wait_copies--> compute(batch i+1)

On CPU the same calls run synchronously (events are ``None``), so the pager and the optimizers take one code path
on every device and the CPU tests exercise all of it but the asynchrony.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class Transfer:
    """Allocation and copies between host memory and one compute device.

    Args:
        device: The compute device the pages are brought to.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self._side = torch.cuda.Stream(device=self.device) if self.is_cuda else None

    def host_zeros(self, shape: Sequence[int] | torch.Size, dtype: torch.dtype) -> Tensor:
        """Zeroed host memory (pinned on CUDA, so copies can be asynchronous)."""
        return torch.zeros(tuple(shape), dtype=dtype, device="cpu", pin_memory=self.is_cuda)

    def to_host(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """A fresh host copy of ``t`` in ``dtype`` (pinned on CUDA)."""
        out = self.host_zeros(t.shape, dtype)
        out.copy_(t.detach())
        return out

    def device_buffer(self, nbytes: int) -> Tensor:
        """Uninitialised device memory for one resident page.

        On CUDA it is allocated on the side stream, which writes it first, and marked as used by the compute
        stream, so the caching allocator reuses it only after both are done with it.
        """
        if self._side is None:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        with torch.cuda.stream(self._side):
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        buf.record_stream(torch.cuda.current_stream(self.device))
        return buf

    def copy(self, dst: Sequence[Tensor], src: Sequence[Tensor], after: object | None = None) -> None:
        """``dst[i].copy_(src[i])`` (flattened) for all i; on CUDA on the side stream, after event ``after``."""
        if self._side is None:
            for d, s in zip(dst, src, strict=True):
                d.view(-1).copy_(s.view(-1))
            return
        if after is not None:
            self._side.wait_event(after)  # type: ignore[arg-type]
        with torch.cuda.stream(self._side):
            for d, s in zip(dst, src, strict=True):
                d.view(-1).copy_(s.view(-1), non_blocking=True)

    def record_compute(self) -> object | None:
        """An event marking the work queued so far on the compute stream (``None`` on CPU)."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait_copies(self) -> None:
        """Make the compute stream wait for the copies queued so far."""
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)

    def synchronize(self) -> None:
        """Block the host until all queued copies are done (before the host reads its pages)."""
        if self._side is not None:
            self._side.synchronize()
