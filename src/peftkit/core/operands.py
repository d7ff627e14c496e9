"""The one place peftkit's C kernels' tensor arguments are checked, and their output buffers allocated.

The C code trusts sizes, layouts and element types: a float32 loop over a 2-byte buffer writes past its end. So
every binding describes what each function expects of each tensor (`Operand`: shape, dtype, layout, CPU) and calls
`check` before the call (a ValueError naming the function and every operand that does not fit), or `fits` to choose
between the kernel and the PyTorch path. Outputs come from `buffer`, with an explicit dtype and device: never
torch's default dtype, which ``torch.set_default_dtype(torch.bfloat16)`` changes under the kernel's feet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

__all__ = ["ANY", "CONTIGUOUS", "ROWS", "Operand", "buffer", "check", "fits", "size"]

CONTIGUOUS = "contiguous"
ROWS = "rows"  # 2-D, each row contiguous, rows any distance apart (at least a row's length)
ANY = "any"  # any strides: for `fits` before the caller copies the tensor into the kernel's layout
DEVICE = torch.device("cpu")  # the kernels run on the CPU


@dataclasses.dataclass(slots=True)  # made per kernel call: cheap to build and check (a few microseconds)
class Operand:
    """What a C function expects of one tensor argument.

    Attributes:
        name: the argument's name, as the error message gives it.
        tensor: the tensor passed.
        shape: its expected shape; an entry None takes any size; None for any shape.
        dtype: the element type, or the types allowed.
        layout: `CONTIGUOUS` (the whole tensor), `ROWS` (2-D, contiguous rows, any row stride >= the width) or
            `ANY`.
        nonempty: whether an empty tensor is refused.
    """

    name: str
    tensor: torch.Tensor | None  # None: refused, named as missing
    shape: Sequence[int | None] | None = None
    dtype: torch.dtype | tuple[torch.dtype, ...] = torch.float32
    layout: str = CONTIGUOUS
    nonempty: bool = False

    def _shape_fits(self, t: torch.Tensor) -> bool:
        want, have = self.shape, t.shape
        if want is None:
            return True
        if len(have) != len(want):
            return False
        if None not in want:
            return have == tuple(want)  # the common case, one comparison (checked on every kernel call)
        if want.count(None) == len(want):
            return True
        return all(w is None or w == h for w, h in zip(want, have, strict=True))

    def _layout_fits(self, t: torch.Tensor) -> bool:
        if self.layout == ROWS:
            strides = t.stride()
            return len(strides) == 2 and strides[1] == 1 and strides[0] >= t.shape[1]
        return self.layout == ANY or t.is_contiguous()

    def problem(self) -> str | None:
        """Why the tensor does not fit, or None."""
        t, dtypes = self.tensor, self.dtype if isinstance(self.dtype, tuple) else (self.dtype,)
        if not isinstance(t, torch.Tensor):
            return f"{self.name} must be a tensor, got {type(t).__name__}"
        if (t.device == DEVICE and t.dtype in dtypes and self._shape_fits(t) and self._layout_fits(t)
                and not (self.nonempty and t.numel() == 0)):
            return None
        shape = "any shape" if self.shape is None else str(tuple("*" if s is None else s for s in self.shape))
        layout = {ROWS: "with contiguous rows", ANY: "any layout"}.get(self.layout, "contiguous")
        wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        empty = ", not empty" if self.nonempty else ""
        return (f"{self.name} must be a {shape} {wanted} CPU tensor, {layout}{empty}; got {tuple(t.shape)} "
                f"{str(t.dtype).removeprefix('torch.')} on {t.device} with strides {t.stride()}")


def check(where: str, *operands: Operand | None) -> None:
    """Raise a ValueError naming `where` and each operand that does not fit (None operands are absent ones).

    Raises:
        ValueError: an operand has another shape, dtype, layout or device than its C function reads.
    """
    problems = [p for o in operands if o is not None and (p := o.problem()) is not None]
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def fits(*operands: Operand) -> bool:
    """Whether every operand fits (the kernel can take the call, else the caller uses PyTorch)."""
    return all(o.problem() is None for o in operands)


def buffer(*shape: int, dtype: torch.dtype = torch.float32, zero: bool = False) -> torch.Tensor:
    """A new CPU tensor for a kernel to write: the dtype and device explicit, zeroed if `zero`."""
    make = torch.zeros if zero else torch.empty
    return make(*shape, dtype=dtype, device=DEVICE)


def size(t: torch.Tensor, i: int) -> int | None:
    """Dimension `i` of `t` if it has one, else None (any size: `check` then names `t` for its shape): the sizes
    one operand's expected shape takes from another."""
    return t.shape[i] if isinstance(t, torch.Tensor) and -t.dim() <= i < t.dim() else None
