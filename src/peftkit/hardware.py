"""What this machine computes fast: the precision a run uses, and its measured matmul peak.

`resolve_precision` is the one place that turns ``precision: auto`` (the default everywhere) into a concrete
precision, with the reason, from what the hardware computes natively:

* CPU: bf16 when torch reports AVX512-BF16 or AMX tiles (x86), or oneDNN bf16 support (other architectures);
  otherwise fp32. Without native bf16 a bf16 matmul is emulated: on a 2-core AVX2 EPYC, `matmul_peak` measured
  1.4 GFLOP/s in bf16 against 139 GFLOP/s in fp32 (``peftkit info`` prints both for the machine it runs on).
* CUDA: bf16 from compute capability 8.0 (Ampere); older GPUs (T4, V100) get fp16 autocast with a gradient scaler.
* MPS: bf16 where torch supports it there (macOS 14 and newer), else fp32.

``PEFTKIT_NATIVE_BF16=1`` / ``=0`` forces the answer (both branches can be run and tested on any machine).

`matmul_peak` measures the machine's dense matmul rate in a dtype once and caches it (in ``$PEFTKIT_CACHE``): the
trainer reports its achieved model FLOP/s as a fraction of it (MFU).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from functools import cache

import torch

from peftkit.errors import PeftkitError

__all__ = ["PRECISIONS", "Precision", "cpu_capability", "describe", "matmul_peak", "native_bf16", "resolve_precision",
           "summary", "warn_if_slow"]

PRECISIONS = ("auto", "fp32", "bf16", "bf16-autocast", "fp16")
"""``auto``: chosen by `resolve_precision`. ``bf16`` / ``fp16``: frozen weights stored in 16 bits, trainable weights
fp32, 16-bit autocast (fp16 with a gradient scaler). ``bf16-autocast``: every weight fp32, bf16 autocast.
``fp32``: no autocast."""

ENV = "PEFTKIT_NATIVE_BF16"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-autocast": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Precision:
    """A resolved precision: `name` (never ``auto``), why it was chosen, and a warning when it will be slow."""

    name: str
    reason: str
    requested: str = "auto"
    warning: str | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls run in (autocast, and the dequantized weights of a 4-bit base)."""
        return _DTYPES[self.name]

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype frozen weights are stored in (and a model is loaded in for evaluation)."""
        return torch.float32 if self.name == "bf16-autocast" else self.compute_dtype

    @property
    def autocast(self) -> bool:
        return self.name != "fp32"

    @property
    def grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling (bf16 has fp32's exponent range and needs none)."""
        return self.name == "fp16"

    def line(self) -> str:
        """One line for the first lines of `train` / `demo` and for `peftkit info`."""
        how = "chosen automatically" if self.requested == "auto" else "as configured"
        return f"precision: {self.name} ({how}: {self.reason})"


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def cpu_capability() -> str:
    """torch's name for the vector instruction set it dispatches to here (e.g. ``AVX2``, ``AVX512``)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def _cpu_bf16() -> tuple[bool, str]:
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        if amx:
            return True, "CPU with AMX tiles: native bf16"
        if avx512_bf16:
            return True, "CPU with AVX512-BF16: native bf16"
        return False, f"{cpu_capability()} CPU without AVX512-BF16 or AMX: bf16 would be emulated, far slower"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    cpu = f"{platform.machine()} CPU"
    return (True, f"{cpu} with bf16 instructions") if native else (False, f"{cpu} without bf16 instructions")


def native_bf16(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether `device` (default: the one training would use) computes bf16 natively, and why."""
    forced = os.environ.get(ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise PeftkitError(f"{ENV} must be 0 or 1, got {forced!r}")
        return forced == "1", f"{ENV}={forced}"
    kind = _device_type(device)
    if kind == "cuda":
        index = torch.device(device).index if device is not None else None
        major, minor = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        if major >= 8:
            return True, f"{name}, compute capability {major}.{minor} >= 8.0"
        return False, f"{name}, compute capability {major}.{minor} < 8.0: no bf16 tensor cores"
    if kind == "mps":
        ok = torch.backends.mps.is_macos_or_newer(14, 0)
        return ok, "MPS on macOS 14+" if ok else "MPS before macOS 14 has no bf16"
    return _cpu_bf16()


def resolve_precision(requested: str = "auto", device: torch.device | str | None = None) -> Precision:
    """The precision a run uses for `requested` on `device`: ``auto`` picks the fastest accurate one.

    An explicit choice is kept, with a warning when the hardware emulates it (much slower).
    """
    if requested not in PRECISIONS:
        raise PeftkitError(f"precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    native, why = native_bf16(device)
    kind = _device_type(device)
    if requested == "auto":
        if native:
            return Precision("bf16", why)
        if kind == "cuda":
            return Precision("fp16", f"{why}; fp16 autocast with a gradient scaler instead")
        return Precision("fp32", why)
    warning = None
    if requested in ("bf16", "bf16-autocast") and not native:
        warning = (f"precision {requested} on hardware without native bf16 ({why}): every matmul is emulated and "
                   "runs many times slower; precision auto (the default) picks "
                   f"{resolve_precision('auto', device).name} here")
    elif requested == "fp16" and kind == "cpu":
        warning = "precision fp16 on a CPU: fp16 matmuls are not native on most CPUs and run slowly; use auto"
    return Precision(requested, "as configured", requested, warning)


_warned: set[str] = set()


def warn_if_slow(precision: Precision) -> None:
    """Print (once per process) the one warning line of an explicit precision the hardware emulates."""
    if precision.warning and precision.warning not in _warned:
        _warned.add(precision.warning)
        print(f"peftkit: warning: {precision.warning}", file=sys.stderr)


def _measure(dtype: torch.dtype, reps: int = 5, slow_s: float = 0.25) -> float:
    """Best FLOP/s of square CPU matmuls (best of up to `reps` per size, `slow_s` per size at most), growing the
    size up to 2048 unless one matmul already takes `slow_s` (an emulated dtype: larger ones would only take long).

    Note: the operands come from a generator of its own, never the global one: a run measures its peak after a
    checkpoint restored the global generators, and a draw there would shift every later dropout mask.
    """
    best = 0.0
    generator = torch.Generator().manual_seed(0)
    for n in (256, 512, 1024, 2048):
        a = torch.randn(n, n, generator=generator).to(dtype)
        b = torch.randn(n, n, generator=generator).to(dtype)
        torch.mm(a, b)  # warm-up: kernel selection, page faults
        fastest, spent = float("inf"), 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            took = time.perf_counter() - t0
            fastest, spent = min(fastest, took), spent + took
            if spent > slow_s:
                break
        best = max(best, 2 * n**3 / fastest)
        if fastest > slow_s:
            break
    return best


def matmul_peak(dtype: torch.dtype = torch.float32) -> float:
    """This machine's dense matmul rate (FLOP/s) in `dtype` on CPU with the current thread count.

    Measured once (about a second) and cached in ``$PEFTKIT_CACHE/matmul_peak.json``, keyed by CPU, vector ISA,
    torch version, dtype and threads; a measurement taken while other work loaded the machine is low: delete the file
    to measure again.
    """
    return _cached_peak(str(dtype).removeprefix("torch."), torch.get_num_threads())


@cache
def _cached_peak(dtype_name: str, threads: int) -> float:
    from peftkit.paths import cache_dir

    key = f"{_cpu_model()} {cpu_capability()}|torch {torch.__version__}|{dtype_name}|{threads} threads"
    path = cache_dir() / "matmul_peak.json"
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    value = table.get(key)
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    value = _measure(getattr(torch, dtype_name))
    table[key] = value
    try:  # written to a temporary name, then renamed: a concurrent reader never sees half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: measure again next time
    return value


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary() -> str:
    """A short line naming this CPU's class, for benchmark headers: model, cores, torch, capability, bf16."""
    native, _ = native_bf16("cpu")
    return (f"{_cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {cpu_capability()}, "
            f"bf16 {'native' if native else 'not native'}")


def describe(device: torch.device | str | None = None) -> str:
    """One line about this machine: CPU, torch's capability, whether bf16 is native (bench headers, `info`)."""
    native, why = native_bf16(device)
    if _device_type(device) == "cuda":
        return f"GPU: {why}; bf16 {'native' if native else 'not native'}"
    return (f"CPU: {_cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} capability {cpu_capability()}, "
            f"bf16 {'native' if native else 'not native'} ({why})")
