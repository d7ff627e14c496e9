"""DDP vs sharded (FSDP2, ``sharding: full``) training at 2 processes on the bundled SmolLM2-135M: per-rank peak RSS
and tokens/s side by side, with the estimator's per-rank peak beside the measured one.

Each round launches, in turn, ``torchrun --nproc-per-node 2`` once per mode (so load changes hit both alike); a
launch trains LoRA (r=8, all linear layers; with ``--methods lora,full`` full fine-tuning after it) for a few steps,
on generated instruction rows, ``precision: auto``, 1 torch thread per rank. Per rank and method: the peak RSS over
the training (``VmHWM``, reset after the model is built, so that loading's transient copies do not count; the RSS
then still holds the loaded weights, and with sharding whatever of the whole weights glibc kept after sharding) and
the target tokens per second of the steps after the first (from ``metrics.jsonl``). The table gives the medians over
the rounds and the ratios sharded / DDP.

Run: ``python bench/sharding.py`` (about 5 minutes on 2 busy cores); ``--rounds``, ``--steps`` to change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODEL = "smollm2-135m-instruct"
MODES = ("none", "full")
METHODS = {"lora": {"method": "lora", "method_config": {"r": 8, "target_modules": "all-linear"}, "lr": 2e-4},
           "full": {"method": "full", "method_config": {}, "lr": 1e-5}}
SEQ = 128
MiB = 2**20


def _write_rows(path: Path, n: int) -> None:
    rows = [{"instruction": f"Write the numbers from {i} to {i + 20 + i % 9}, separated by commas.",
             "output": ", ".join(str(k) for k in range(i, i + 20 + i % 9))} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the high-water mark restarts from the current RSS


def worker(mode: str, methods: list[str], steps: int, out: Path) -> None:
    """One rank: each method trained in turn, its peak RSS and tokens/s written to ``out/<method>-rank<r>.json``."""
    import torch

    from peftkit.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    for name in methods:
        settings = METHODS[name]
        cfg = TrainConfig.from_dict({
            "model": MODEL, "data": str(out / "rows.jsonl"), "output_dir": str(out / f"{mode}-{name}"),
            "precision": "auto", "batch_size": 1, "max_length": SEQ, "packing": True, "max_steps": steps,
            "warmup_ratio": 0.0, "progress": False, "sharding": mode, **settings})
        trainer = Trainer(cfg, overwrite=True)
        _reset_hwm()
        result = trainer.run()
        peak = _hwm()
        lines = (out / f"{mode}-{name}" / "metrics.jsonl").read_text().splitlines() if rank == 0 else []
        rates = [r["target_tokens_per_s"] for r in map(json.loads, lines) if r.get("step", 0) > 1
                 and "target_tokens_per_s" in r]
        (out / f"{name}-rank{rank}.json").write_text(json.dumps({
            "peak": peak, "tokens_per_s": statistics.median(rates) if rates else None,
            "precision": result.precision}))
        del trainer, result


def _launch(mode: str, methods: list[str], steps: int, out: Path) -> dict[str, list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", __file__,
           "--worker", mode, "--methods", ",".join(methods), "--steps", str(steps), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} launch failed:\n{proc.stderr[-3000:]}")
    return {m: [json.loads((out / f"{m}-rank{r}.json").read_text()) for r in (0, 1)] for m in methods}


def _estimates(precision: str, methods: list[str]) -> dict[tuple[str, str], float]:
    from peftkit.memory import TrainSetup, estimate

    out = {}
    for name in methods:
        settings = METHODS[name]
        for mode in MODES:
            setup = TrainSetup(method=name, method_args=settings["method_config"], precision=precision,
                               batch_size=1, seq_len=SEQ, world_size=2, sharding=mode)
            out[(name, mode)] = estimate("smollm2-135m", setup).peak_bytes / MiB
    return out


def _table(runs: dict[str, list[dict[str, list[dict]]]], estimates: dict[tuple[str, str], float]) -> list[str]:
    rows = ["| method | DDP peak RSS / rank (MiB) | sharded peak RSS / rank | ratio | estimate DDP / sharded "
            "(MiB, per rank) | DDP tokens/s | sharded tokens/s | ratio |", "|---|---|---|---|---|---|---|---|"]
    for name in runs["none"][0]:
        peak = {m: statistics.median(max(r["peak"] for r in run[name]) for run in runs[m]) / MiB for m in MODES}
        rate = {m: statistics.median(run[name][0]["tokens_per_s"] for run in runs[m]) for m in MODES}
        rows.append(f"| {name} | {peak['none']:.0f} | {peak['full']:.0f} | {peak['full'] / peak['none']:.2f} | "
                    f"{estimates[(name, 'none')]:.0f} / {estimates[(name, 'full')]:.0f} | {rate['none']:.0f} | "
                    f"{rate['full']:.0f} | {rate['full'] / rate['none']:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", default="lora", help="comma-separated: lora, full (full fine-tuning: ~4 GB "
                        "and ~20 s per step per rank on a busy 2-core machine)")
    parser.add_argument("--worker", choices=MODES)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.methods.split(","), args.steps, args.out)
        return
    from _common import machine, write_section

    t0, load = time.perf_counter(), os.getloadavg()[0]
    runs: dict[str, list[dict[str, list[dict]]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _write_rows(out / "rows.jsonl", 200)
        for _ in range(args.rounds):
            for mode in MODES:
                runs[mode].append(_launch(mode, args.methods.split(","), args.steps, out))
    precision = runs["none"][0]["lora"][0]["precision"]
    elapsed = time.perf_counter() - t0
    body = [f"## sharding — `python bench/sharding.py --rounds {args.rounds} --steps {args.steps} --methods "
            f"{args.methods}` ({machine()}, "
            f"2 ranks x 1 thread, gloo, precision {precision}, {elapsed:.0f} s, load average {load:.1f} at the start)",
            "", f"DDP (`sharding: none`) vs FSDP2 (`sharding: full`) on {MODEL}, batch 1 x {SEQ} tokens packed, "
            f"{args.steps} steps per run, medians over {args.rounds} alternating rounds; peak RSS is the larger rank's "
            "(the loaded weights included), tokens/s are target tokens per second of the steps after the first. The "
            "estimate is `peftkit.memory.estimate(..., world_size=2, sharding=...)`'s per-rank peak, without the "
            "process's own RSS (Python, torch, tokenizer: about 500 MiB).", "",
            *_table(runs, _estimates(precision, args.methods.split(",")))]
    write_section("sharding", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
