"""Shared plumbing for benchmarks: timing helpers and writing a named section of BENCHMARKS.md."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"  # the team's data sets (../shared/data)
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every section below is written by the script it names (`python bench/<script>.py`); "
    "re-running the script replaces its section. Absolute times on a shared 2-core machine are noisy: "
    "the ratios, measured alternating in one run, are what to read. Each section's header names the CPU, its "
    "vector instruction set and whether it computes bf16 natively (`peftkit.hardware`): bf16 numbers do not carry "
    "over between the two classes.\n"
)


def machine() -> str:
    """One line naming the machine the numbers come from: CPU, cores, torch, vector ISA, whether bf16 is native."""
    from peftkit.hardware import summary

    return summary()


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each function, called in turn each round so that load changes hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def cpu_class() -> str:
    """The class of CPU whose numbers do not carry over to the other: "bf16-native" or "bf16-emulated"."""
    from peftkit.hardware import native_bf16

    return "bf16-native" if native_bf16("cpu")[0] else "bf16-emulated"


def write_section(name: str, body: str, per_cpu_class: bool = False) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md atomically.

    With `per_cpu_class`, each CPU class (`cpu_class()`) keeps its own section: a run on a CPU with native bf16 does not
    replace the numbers measured on one without, and the other way round.
    """
    if per_cpu_class:
        name = f"{name}/{cpu_class()}"
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(dir=BENCHMARKS.parent, prefix=".BENCHMARKS.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, BENCHMARKS)
