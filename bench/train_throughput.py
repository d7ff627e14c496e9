"""Benchmark: LoRA training throughput and peak memory, peftkit vs Hugging Face peft + transformers Trainer.

On the bundled SmolLM2-135M-Instruct and the Alpaca sample, LoRA r=8 alpha=16 dropout 0.05 on q,k,v,o,gate,up,down,
loss on the answer only (prompt labels -100, the model's chat template), AdamW lr 2e-4 cosine without warmup,
batch 8 rows (peft; peftkit at its own default below), max length 512. Configurations:

  * ``peftkit-fp32-pad``: peftkit with peft's settings (fp32, one example per padded row);
  * ``peft-fp32``: peft + transformers ``Trainer`` as peft's docs show (fp32 on CPU is its default);
  * ``peft-bf16``: the same with ``bf16=True`` (bf16 autocast, fp32 weights); left out where bf16 is not native
    (`peftkit.hardware`): it runs many times slower than fp32 there, so fp32 is peft's best configuration;
  * ``peftkit-default``: peftkit's defaults (``precision: auto``: bf16 frozen weights + autocast where bf16 is
    native, fp32 elsewhere; packing with shared prefixes; ``batch_size`` 2 packed rows of 512, about as many
    positions per step as peft's 8 padded rows);
  * ``peftkit-default-b8``: the same with 8 packed rows per batch (4x the positions per step).

Each run is a fresh subprocess (``--worker``), the configurations alternate, several repetitions. A run trains
``warmup + steps`` optimizer steps (of a ``warmup + steps + 1``-step schedule) and times the ``steps`` after the
warmup, from the start of one step (batch fetch included) to the start of the step after the window. Useful
tokens = target (answer) tokens. Peak memory = the peak RSS of the worker during those steps (VmHWM, reset right
after the model is loaded), minus the RSS after loading; the whole-process peak is reported too. Writes section
"train_throughput" of BENCHMARKS.md.

    python bench/train_throughput.py                 # ~15 minutes on an idle 2-core CPU
    python bench/train_throughput.py --repeats 1     # a smoke test

Note:
    One torch thread per worker by default. On a shared, oversubscribed CPU (load average 10+ on 2 cores), two
    OpenMP threads per process wait at every parallel region for a descheduled partner, and a step then costs
    up to 30x its idle time, more for whichever library runs more small kernels; one thread measures the work.
    Use ``--threads 2`` on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ALPACA, machine, write_section  # noqa: E402

warnings.filterwarnings("ignore")
MODEL = "smollm2-135m-instruct"
DATA = str(ALPACA)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, MAX_LENGTH, LR = 8, 512, 2e-4
CONFIGS = ("peftkit-fp32-pad", "peft-fp32", "peft-bf16", "peftkit-default", "peftkit-default-b8")


# ---------------------------------------------------------------- memory of this process
def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def hwm_mib() -> float:
    """Peak RSS since the last `reset_hwm` (or process start)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak-RSS high-water mark to the current RSS


def process_peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- workers
class WindowDone(Exception):
    """Raised at the start of the step after the timed window, to end a run early."""


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def moved(model, before: dict) -> str:
    """How many trainable tensors changed during training (a layer whose gradient is dropped stays put)."""
    now = dict(model.named_parameters())
    return f"{sum(not torch_equal(now[n], t) for n, t in before.items())}/{len(before)}"


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.detach().to(b.dtype), b))


class StepClock:
    """Start time, target tokens and padded positions of each step, and the peak RSS at the window's end."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.starts: list[float] = []
        self.targets: list[int] = []
        self.positions: list[int] = []
        self.peak = 0.0
        self.first_loss: float | None = None

    def begin(self, targets: int, positions: int) -> None:
        self.starts.append(time.perf_counter())
        self.targets.append(targets)
        self.positions.append(positions)
        if len(self.starts) == self.warmup + self.steps + 1:
            self.peak = hwm_mib()
            raise WindowDone  # the window is measured: skip the remaining step

    def result(self) -> dict:
        w, s = self.warmup, self.steps
        seconds = self.starts[w + s] - self.starts[w]
        targets, positions = sum(self.targets[w:w + s]), sum(self.positions[w:w + s])
        return {"seconds": seconds, "target_tokens": targets, "positions": positions,
                "largest_step": max(self.positions[:w + s]),
                "targets_per_step": self.targets[:w + s], "first_loss": self.first_loss}


def peftkit_run(overrides: dict, warmup: int, steps: int, examples: int, baseline: str = "load",
                check=None) -> dict:
    """Train with peftkit's Trainer on the fp32 bundled model with `overrides` of the TrainConfig; measure.

    `baseline`: where the memory baseline is taken: after loading the model ("load") or just before training.
    `check(model) -> dict`: called after training; its entries are added to the result.
    """
    import torch

    from peftkit.data.sequences import IGNORE
    from peftkit.models import load_model
    from peftkit.train import TrainConfig, Trainer

    model, tokenizer = load_model(MODEL, dtype=torch.float32)
    after_load = rss_mib()
    reset_hwm()
    out = tempfile.mkdtemp(prefix="peftkit-bench-")
    settings = dict(
        model=MODEL, data=DATA, limit_examples=examples, max_length=MAX_LENGTH, lr=LR,
        max_steps=warmup + steps + 1, warmup_ratio=0.0, output_dir=out, progress=False, seed=0, method="lora",
        method_config={"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": TARGETS},
    )
    cfg = TrainConfig(**{**settings, **overrides})
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
    if baseline == "train":
        after_load = rss_mib()
        reset_hwm()
    before = snapshot(trainer.model)
    clock = StepClock(warmup, steps)
    batches = trainer.data.batches

    def timed_batches(epoch: int, micro: int):
        for item in batches(epoch, micro):
            labels = item[2]["labels"]
            clock.begin(int(labels[:, 1:].ne(IGNORE).sum()), labels.numel())
            yield item

    trainer.data.batches = timed_batches  # grad_accum = 1: one fetch per optimizer step
    try:
        trainer.run()
    except WindowDone:
        pass
    extra = check(trainer.model) if check is not None else {}
    log = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    clock.first_loss = log[0]["loss"]
    timed = [r["mfu"] for r in log if warmup < r["step"] <= warmup + steps and "mfu" in r]
    extra["mfu"] = statistics.median(timed) if timed else None
    return {**clock.result(), "rss_after_load": after_load, "peak": clock.peak, "process_peak": process_peak_mib(),
            "moved": moved(trainer.model, before), **extra}


PEFTKIT_SETTINGS = {
    "peftkit-fp32-pad": {"precision": "fp32", "packing": False, "batch_size": BATCH},
    "peftkit-default": {},  # TrainConfig's own precision, packing and batch_size
    "peftkit-default-b8": {"batch_size": 8},
}


def worker_peftkit(setting: str, warmup: int, steps: int, examples: int) -> dict:
    return peftkit_run(PEFTKIT_SETTINGS[setting], warmup, steps, examples)


def alpaca_examples(tokenizer, n: int) -> list[dict]:
    """Alpaca rows as input_ids/labels with the model's chat template, -100 on the prompt and after the answer's
    end-of-turn token (as TRL's assistant-only loss masks it; a peft user's code)."""
    from peftkit.data.sequences import turn_end

    end = turn_end(tokenizer)
    rows = json.loads(Path(DATA).read_text())[:n]
    examples: list[dict | None] = []
    for row in rows:
        user = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        answer = full[len(prompt):]
        cut = answer.rindex(end) + len(end) if end else len(answer)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer[:cut], add_special_tokens=False)["input_ids"]
        tail = tokenizer(answer[cut:], add_special_tokens=False)["input_ids"] if answer[cut:] else []
        ids, labels = (p + a + tail)[:MAX_LENGTH], ([-100] * len(p) + a + [-100] * len(tail))[:MAX_LENGTH]
        examples.append({"input_ids": ids, "labels": labels} if any(x != -100 for x in labels) else None)
    # peftkit's batch order for seed 0 without packing (rows shuffled, then the examples left after truncation
    # shuffled as training rows), so that both libraries train on exactly the same batches; the parent checks the
    # per-step target counts agree.
    shuffled = list(range(len(examples)))
    random.Random(0).shuffle(shuffled)
    out = [examples[i] for i in shuffled if examples[i] is not None]
    order = list(range(len(out)))
    random.Random(0).shuffle(order)
    return [out[i] for i in order]


def peft_run(model, tokenizer, bf16: bool, warmup: int, steps: int, examples: int, after_load: float,
             baseline: str = "load", check=None) -> dict:
    """Train a peft model with the transformers Trainer (as peft's docs show) on the Alpaca rows; measure."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    data = alpaca_examples(tokenizer, examples)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", pad_to_multiple_of=8, label_pad_token_id=-100)
    clock = StepClock(warmup, steps)
    per_step = [data[i:i + BATCH] for i in range(0, len(data), BATCH)]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            rows = per_step[state.global_step]  # sequential sampler: step k trains on rows 8k..8k+7
            width = -(-max(len(r["input_ids"]) for r in rows) // 8) * 8
            clock.begin(sum(sum(x != -100 for x in r["labels"][1:]) for r in rows), width * len(rows))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if clock.first_loss is None and logs and "loss" in logs:
                clock.first_loss = float(logs["loss"])

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="peft-bench-"), per_device_train_batch_size=BATCH, learning_rate=LR,
        lr_scheduler_type="cosine", warmup_steps=0, max_steps=warmup + steps + 1, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=bf16,
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(data), data_collator=collator,
                      callbacks=[Clock()])
    if baseline == "train":
        after_load = rss_mib()
        reset_hwm()
    before = snapshot(model)
    try:
        trainer.train()
    except WindowDone:
        pass
    extra = check(model) if check is not None else {}
    return {**clock.result(), "rss_after_load": after_load, "peak": clock.peak, "process_peak": process_peak_mib(),
            "moved": moved(model, before), **extra}


def worker_peft(setting: str, warmup: int, steps: int, examples: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.models import resolve_model_path

    path = resolve_model_path(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    after_load = rss_mib()
    reset_hwm()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    return peft_run(model, tokenizer, setting == "peft-bf16", warmup, steps, examples, after_load)


# ---------------------------------------------------------------- parent
def run_worker(config: str, args: argparse.Namespace, script: str = __file__, tries: int = 3,
               extra: tuple[str, ...] | list[str] = ()) -> dict:
    """Run one configuration of `script` in a fresh subprocess (`extra`: more options for the worker); retry a run
    killed from outside (the OOM killer on a shared machine: -9) after a pause."""
    cmd = [sys.executable, script, "--worker", config, "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--examples", str(args.examples), "--threads", str(args.threads), *extra]
    for attempt in range(tries):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not proc.returncode and lines:
            return json.loads(lines[-1].removeprefix("RESULT "))
        if proc.returncode != -9 or attempt == tries - 1:
            raise RuntimeError(f"worker {config} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        print(f"worker {config} was killed (-9, out of memory?); retrying in 60 s", flush=True)
        time.sleep(60)
    raise AssertionError("unreachable")


def worker_parser(doc: str, configs: tuple[str, ...], repeats: int, steps: int, examples: int
                  ) -> argparse.ArgumentParser:
    """The options every worker benchmark takes (the parent passes warmup/steps/examples/threads to its workers)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--worker", choices=configs)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--examples", type=int, default=examples)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (see train_throughput's Note)")
    parser.add_argument("--no-write", action="store_true")
    return parser


def in_worker(args: argparse.Namespace, fn) -> bool:
    """In a worker process: set the threads, print `fn()`'s result for the parent; True if this was a worker."""
    if not args.worker:
        return False
    import torch

    torch.set_num_threads(args.threads)
    print("RESULT " + json.dumps(fn()), flush=True)
    return True


def alternate_workers(configs: list[str], args: argparse.Namespace, script: str, describe) -> dict[str, list[dict]]:
    """Each configuration in turn, `args.repeats` rounds, each run in a fresh worker; one progress line per run."""
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        for config in configs:
            r = run_worker(config, args, script)
            runs[config].append(r)
            print(f"rep {rep} {config:18s} {r['target_tokens'] / r['seconds']:7.1f} target tok/s  "
                  f"{r['positions'] / r['seconds']:7.1f} positions/s  {describe(r)}", flush=True)
    return runs


def medians(rs: list[dict], steps: int) -> dict:
    """Median rates and memory of several runs of one configuration, with the first run's step-1 loss and moves."""
    return {
        "tok_s": statistics.median(r["target_tokens"] / r["seconds"] for r in rs),
        "pos_s": statistics.median(r["positions"] / r["seconds"] for r in rs),
        "step_s": statistics.median(r["seconds"] / steps for r in rs),
        "growth": statistics.median(r["peak"] - r["rss_after_load"] for r in rs),
        "process": statistics.median(r["process_peak"] for r in rs),
        "first_loss": rs[0]["first_loss"], "moved": rs[0]["moved"],
    }


def main() -> None:
    parser = worker_parser(__doc__, CONFIGS, repeats=2, steps=4, examples=600)
    parser.add_argument("--only", help="comma-separated configurations")
    args = parser.parse_args()
    worker = worker_peftkit if (args.worker or "").startswith("peftkit") else worker_peft
    if in_worker(args, lambda: worker(args.worker, args.warmup, args.steps, args.examples)):
        return

    from peftkit.hardware import native_bf16

    bf16_native = native_bf16("cpu")[0]
    expected = [c for c in CONFIGS if bf16_native or c != "peft-bf16"]
    configs = args.only.split(",") if args.only else expected
    t_start, load = time.perf_counter(), os.getloadavg()[0]
    runs = alternate_workers(configs, args, __file__, lambda r: (
        f"peak +{r['peak'] - r['rss_after_load']:.0f} MiB (process {r['process_peak']:.0f} MiB)  "
        f"first loss {r['first_loss']}  moved {r['moved']}"))
    elapsed = time.perf_counter() - t_start
    s = {c: {**medians(runs[c], args.steps), "targets": runs[c][0]["target_tokens"],
             "positions": runs[c][0]["positions"], "largest": runs[c][0]["largest_step"]} for c in configs}
    for c, v in s.items():
        print(c, json.dumps({k: round(x, 4) if isinstance(x, float) else x for k, x in v.items()}))
    Path(tempfile.gettempdir(), "train_throughput_runs.json").write_text(json.dumps(runs))  # raw runs, to inspect
    if args.no_write or set(configs) != set(expected):
        return
    same_batches = runs["peftkit-fp32-pad"][0]["targets_per_step"] == runs["peft-fp32"][0]["targets_per_step"]
    a = s["peftkit-fp32-pad"]["tok_s"] / s["peft-fp32"]["tok_s"]

    def paired(x: str, y: str) -> str:
        """Per-repetition ratios of target tok/s (runs next to each other), to show the noise."""
        return ", ".join(f"{rx['target_tokens'] / rx['seconds'] / (ry['target_tokens'] / ry['seconds']):.2f}"
                         for rx, ry in zip(runs[x], runs[y], strict=True))

    mem_a = s["peftkit-fp32-pad"]["growth"] / s["peft-fp32"]["growth"]
    best_peft = max((c for c in ("peft-fp32", "peft-bf16") if c in s), key=lambda c: s[c]["tok_s"])
    b = s["peftkit-default"]["tok_s"] / s[best_peft]["tok_s"]
    b8 = s["peftkit-default-b8"]["tok_s"] / s[best_peft]["tok_s"]
    mem_b = s["peftkit-default"]["growth"] / s[best_peft]["growth"]
    process_b = s["peftkit-default"]["process"] / s[best_peft]["process"]
    mem_b8 = s["peftkit-default-b8"]["growth"] / s[best_peft]["growth"]
    from peftkit.hardware import resolve_precision
    from peftkit.train import TrainConfig

    default_batch = TrainConfig().batch_size
    default_precision = resolve_precision(TrainConfig().precision, "cpu")
    command = (f"python bench/train_throughput.py --repeats {args.repeats} --warmup {args.warmup} "
               f"--steps {args.steps} --examples {args.examples} --threads {args.threads}")
    rows = {
        "peftkit-fp32-pad": "peftkit, fp32, padded rows (peft's settings)",
        "peft-fp32": "peft + transformers Trainer, fp32 (peft's docs default on CPU)",
        "peft-bf16": "peft + transformers Trainer, `bf16=True` (autocast)",
        "peftkit-default": f"peftkit defaults: `precision: auto` (here {default_precision.name}), packing with "
                           f"shared prefixes, batch {default_batch} x {MAX_LENGTH}",
        "peftkit-default-b8": f"peftkit defaults with `batch_size: 8` (8 x {MAX_LENGTH} packed)",
    }
    lines = [
        f"## train_throughput — `{command}` ({machine()}, torch threads per worker: {args.threads}, {elapsed:.0f} s, "
        f"load average {load:.1f} at the start)",
        "",
        f"Bundled SmolLM2-135M-Instruct, LoRA r=8 alpha=16 dropout 0.05 on q,k,v,o,gate,up,down, first "
        f"{args.examples} rows of `alpaca_5000.json`, loss on the answer only (same chat template and masks in "
        f"both), AdamW lr 2e-4 cosine without warmup, batch {BATCH} rows, max length {MAX_LENGTH}. Each run is a "
        f"fresh subprocess; the configurations alternate, {args.repeats} repetitions, medians. A run times "
        f"{args.steps} optimizer steps after {args.warmup} warmup step(s). *target tok/s* counts answer tokens "
        "only; *positions/s* counts every position computed, padding included. *peak growth* = the worker's "
        "peak RSS during training (VmHWM, reset after loading the fp32 model) minus its RSS after loading; "
        "*process peak* = the whole worker's peak RSS (ru_maxrss, includes loading). *moved* = LoRA tensors "
        "changed by training (all must move). *MFU* = peftkit's own report (model FLOPs per second over this "
        "machine's measured matmul peak in the run's dtype, median of the timed steps; `peftkit.train.flops`)."
        + ("" if bf16_native else " peft with `bf16=True` is left out: bf16 is not native on this CPU (it runs "
           "many times slower than fp32 here), so peft's best configuration is fp32."),
        "",
        "| configuration | target tok/s | vs peft fp32 | positions/s | s/step | positions per step | largest step "
        "(positions) | peak growth (MiB) | MiB per position of the largest step | process peak (MiB) | "
        "loss of step 1 | moved | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in expected:
        v = s[c]
        per_step = v["positions"] / args.steps
        mfu = statistics.median(m for r in runs[c] if (m := r.get("mfu")) is not None) if runs[c][0].get("mfu") \
            else None
        lines.append(
            f"| {rows[c]} | {v['tok_s']:.1f} | {v['tok_s'] / s['peft-fp32']['tok_s']:.2f}x | {v['pos_s']:.0f} | "
            f"{v['step_s']:.2f} | {per_step:.0f} | {v['largest']} | {v['growth']:.0f} | "
            f"{v['growth'] / v['largest']:.2f} | "
            f"{v['process']:.0f} | {v['first_loss']:.4f} | {v['moved']} | "
            f"{'-' if mfu is None else f'{mfu:.0%}'} |"
        )
    lines += [
        "",
        f"**(a) equal settings** (fp32, padded rows, batch {BATCH}, the same batches in the same order: "
        f"{'verified' if same_batches else 'NOT verified'} by the per-step target counts; the loss of step 1, "
        f"before any update, agrees): peftkit / peft = **{a:.2f}x** target tok/s (target >= 1.2x; per repetition "
        f"{paired('peftkit-fp32-pad', 'peft-fp32')}), peak growth **{mem_a:.2f}x**.",
        "",
        f"**(b) recommended settings**: peftkit defaults / best peft ({best_peft}) = **{b:.2f}x** target tok/s "
        f"(target >= 2x; per repetition {paired('peftkit-default', best_peft)}); peak growth "
        f"{s['peftkit-default']['growth']:.0f} MiB vs {s[best_peft]['growth']:.0f} MiB (**{mem_b:.2f}x**, target "
        f"<= 0.6x), whole-process peak **{process_b:.2f}x**. peftkit's default batch of {default_batch} packed rows "
        f"holds {s['peftkit-default']['positions'] / s['peft-fp32']['positions']:.2f}x the positions of peft's "
        f"padded batch of {BATCH}. With `batch_size: 8` (8 x {MAX_LENGTH} packed, "
        f"{s['peftkit-default-b8']['positions'] / s['peft-fp32']['positions']:.1f}x the positions per step) "
        f"peftkit runs at **{b8:.2f}x** (per repetition {paired('peftkit-default-b8', best_peft)}) with "
        f"**{mem_b8:.2f}x** the peak growth: memory grows with the tokens per step, speed per token does not.",
    ]
    write_section("train_throughput", "\n".join(lines), per_cpu_class=True)
    print(f"wrote section train_throughput of BENCHMARKS.md ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
