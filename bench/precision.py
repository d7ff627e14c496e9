"""Benchmark: peftkit's default precision (``auto``) against every explicit precision, on this machine.

The same LoRA training run (the bundled SmolLM2-135M-Instruct, LoRA r=8 alpha=16 on q,k,v,o,gate,up,down, the
Alpaca sample, packed rows of ``--max-length`` tokens, ``--batch`` rows per step) with ``precision`` set to
``auto``, ``fp32``, ``bf16`` and ``bf16-autocast``; each run in a fresh subprocess, the precisions alternating,
medians of the repetitions. The target: the default is never slower than the best explicit precision (ratio
>= 0.95). The workload is small because bf16 is emulated, and far slower, on CPUs without native bf16. Writes
section "precision" of BENCHMARKS.md.

    python bench/precision.py              # ~6 minutes on a 2-core AVX2 CPU (bf16 emulated), less with native bf16
    python bench/precision.py --repeats 5 --steps 4   # auto vs the best explicit one resolved more finely
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402
from _common import machine, write_section  # noqa: E402

PRECISIONS = ("auto", "fp32", "bf16", "bf16-autocast")


def worker(precision: str, warmup: int, steps: int, examples: int) -> dict:
    from peftkit.hardware import resolve_precision

    result = tt.peftkit_run({"precision": precision, "batch_size": ARGS.batch, "max_length": ARGS.max_length,
                             "packing": True}, warmup, steps, examples)
    return {**result, "resolved": resolve_precision(precision, "cpu").name}


def main() -> None:
    parser = tt.worker_parser(__doc__, PRECISIONS, repeats=2, steps=2, examples=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    global ARGS
    ARGS = args = parser.parse_args()
    if tt.in_worker(args, lambda: worker(args.worker, args.warmup, args.steps, args.examples)):
        return
    t0 = time.perf_counter()
    extra = ["--batch", str(args.batch), "--max-length", str(args.max_length)]
    runs: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    timed = list(PRECISIONS)
    for rep in range(args.repeats):
        if rep == 1:  # a precision at under half the fastest rate cannot be the best one: one run of it is enough
            first = {p: runs[p][0]["positions"] / runs[p][0]["seconds"] for p in PRECISIONS}
            timed = [p for p in PRECISIONS if p == "auto" or first[p] >= 0.5 * max(first.values())]
        for p in timed:
            r = tt.run_worker(p, args, __file__, extra=extra)
            runs[p].append(r)
            print(f"rep {rep} {p:14s} {r['positions'] / r['seconds']:8.1f} positions/s ({r['resolved']})", flush=True)
    rate = {p: statistics.median(r["positions"] / r["seconds"] for r in rs) for p, rs in runs.items()}
    best = max((p for p in PRECISIONS if p != "auto"), key=rate.get)
    ratio = rate["auto"] / rate[best]
    lines = [
        f"## precision — `python bench/precision.py --repeats {args.repeats} --steps {args.steps} --batch "
        f"{args.batch} --max-length {args.max_length} --threads {args.threads}` ({machine()}, "
        f"{time.perf_counter() - t0:.0f} s)",
        "",
        f"LoRA r=8 on q,k,v,o,gate,up,down of the bundled SmolLM2-135M-Instruct, Alpaca rows packed into "
        f"{args.batch} x {args.max_length} tokens per step, {args.steps} timed steps after {args.warmup} warm-up "
        f"step(s), a fresh process per run, precisions alternating, medians of {args.repeats} (a precision at under "
        f"half the fastest rate in the first round is run once: it cannot be the best).",
        "",
        "| precision | runs as | runs | positions/s | vs the default |",
        "|---|---|---:|---:|---:|",
    ]
    for p in PRECISIONS:
        lines.append(f"| `{p}` | {runs[p][0]['resolved']} | {len(runs[p])} | {rate[p]:.1f} | "
                     f"{rate[p] / rate['auto']:.2f}x |")
    lines += ["", f"Default (`auto`) / best explicit (`{best}`): **{ratio:.2f}x** (target >= 0.95)."]
    if not args.no_write:
        write_section("precision", "\n".join(lines), per_cpu_class=True)
    print("\n".join(lines))


ARGS = None

if __name__ == "__main__":
    main()
