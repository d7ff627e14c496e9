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


def kernel_step_row(module, attr: str, label: str, settings: dict, rounds: int) -> str:
    """A table row: forward + backward of a training step on the bundled model with `module.attr` (a compiled
    kernel's getter) as it is and switched off (returning None), alternating over the same three real batches of
    the orders task; fp32, medians."""
    from peftkit.train import TrainConfig, Trainer
    from peftkit.train.loss import sequence_loss

    cfg = TrainConfig.from_dict({**settings, "data": str(ROOT / "src/peftkit/data/tasks/orders_train.jsonl"),
                                 "max_steps": 1, "output_dir": f"/tmp/peftkit-bench-{attr}", "progress": False,
                                 "precision": "fp32"})
    trainer = Trainer(cfg, overwrite=True)
    model = trainer.model.train()
    batches = iter(trainer.data.batches(0, 0))
    batches = [next(batches)[2] for _ in range(3)]
    kernel = getattr(module, attr)
    state = {"round": 0}

    def step(on: bool):
        setattr(module, attr, kernel if on else (lambda: None))
        try:
            loss, _ = sequence_loss(model, batches[state["round"] % len(batches)])
            loss.backward()
        finally:
            setattr(module, attr, kernel)
        model.zero_grad(set_to_none=True)

    def advance():
        state["round"] += 1

    times = alternate({"torch": lambda: step(False), "kernel": lambda: (step(True), advance())}, rounds)
    torch_s, kernel_s = (statistics.median(times[k]) for k in ("torch", "kernel"))
    tokens = statistics.median(int((b["segment_ids"] >= 0).sum()) if "segment_ids" in b else b["input_ids"].numel()
                               for b in batches)
    return f"| {label}, ~{tokens:.0f} tokens | {rounds} | {torch_s:.2f} | {kernel_s:.2f} | {torch_s / kernel_s:.2f}x |"
