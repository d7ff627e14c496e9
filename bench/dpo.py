"""Benchmark: a DPO training step, peftkit vs TRL's DPOTrainer + peft; and what a short DPO run does on held-out pairs.

Speed and memory (section "dpo"). Pairs from the bundled orders task (`peftkit/data/tasks`): the prompt is the
task's instruction and customer message, the chosen answer its correct JSON, the rejected one the same JSON broken
one way (cut short, a key missing, a wrong quantity, single quotes, or a trailing comma; `broken`). The bundled
SmolLM2-135M-Instruct, LoRA r=8 alpha=16 no dropout on q,k,v,o,gate,up,down, DPO sigmoid beta 0.1, AdamW lr 5e-5,
4 pairs per step, max length 256, the same pairs in the same order on both sides (TRL gets them in peftkit's shuffled
order, sequential sampler). peftkit packs each pair's prompt once with both answers attending to it and runs the
reference with the adapter off; TRL pads chosen and rejected into 8 rows and runs them twice (the reference with the
adapter off). Configurations: fp32 on both sides, and, where this CPU computes bf16 natively, each library's bf16:
peftkit's ``precision: auto`` (bf16 frozen weights + autocast) and TRL's ``bf16=True`` (autocast).

Each run is a fresh subprocess (``--worker``), the configurations alternate, ``--repeats`` rounds, medians (and each
round's ratio). Time: from the start of the first step after the warmup to the start of the step after the window
(`train_throughput`'s workers). Memory: *peak growth* = the worker's peak RSS during training (VmHWM, reset after the
model is loaded and its weights are resident) minus its RSS at that point; *process peak* = the whole worker's peak
RSS. The weights are read once before the baseline because both libraries memory-map the fp32 checkpoint: untouched,
its ~510 MiB would be paged in by the first forward and counted as training's growth.

Held-out reward accuracy (section "dpo-accuracy"): harder pairs from the same task (`subtle`): the rejected answer is
the correct JSON with one field subtly wrong (the quantity off by one or two, another city, colour or name, the item
in the plural), valid JSON like the chosen one. The base model scored on the task's 100 test rows, then one peftkit
DPO run on pairs from the 600 training rows, scored again: how often the model finds the correct answer likelier
than the wrong one (summed and per-token log-probability), and the implicit reward accuracy and margin (TRL's
``rewards/accuracies``, ``rewards/margins``: 0 before training by definition, policy = reference).

    flock /work/wt/bench.lock python bench/dpo.py          # both sections; ~20 minutes on an idle 2-core CPU
    python bench/dpo.py --part speed --repeats 3
    python bench/dpo.py --part accuracy --accuracy-steps 60
    python bench/dpo.py --write-data recipes                # (re)write the shipped pair files beside the recipes
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, write_section  # noqa: E402
from train_throughput import (  # noqa: E402
    MODEL,
    TARGETS,
    StepClock,
    WindowDone,
    in_worker,
    moved,
    process_peak_mib,
    reset_hwm,
    rss_mib,
    run_worker,
    snapshot,
    worker_parser,
)

warnings.filterwarnings("ignore")
CONFIGS = ("peftkit", "trl", "peftkit-auto", "trl-bf16")
TASKS = ROOT / "src" / "peftkit" / "data" / "tasks"
PAIRS, MAX_LENGTH, LR, BETA = 4, 256, 5e-5, 0.1
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS}
FIELDS = ("quantity", "city", "color", "item", "name")


def broken(answer: str, how: int) -> str:
    """`answer` (a JSON object) broken one of five ways."""
    data = json.loads(answer)
    if how == 0:
        return answer[: len(answer) * 2 // 3]  # cut short
    if how == 1:
        data.pop("quantity", None)
        return json.dumps(data)
    if how == 2:
        data["quantity"] = int(data.get("quantity", 1)) + 3
        return json.dumps(data)
    if how == 3:
        return answer.replace('"', "'")
    return answer[:-1] + ", }"


def plural(item: str) -> str:
    if item.endswith("f"):
        return item[:-1] + "ves"
    return item + ("es" if item.endswith(("s", "x", "ch", "sh")) else "s")


def subtle(answer: str, field: str, pools: dict[str, list], rng: random.Random) -> str:
    """`answer` (a JSON object) with `field` subtly wrong, still valid JSON in the same layout."""
    data = json.loads(answer)
    value = data[field]
    if field == "quantity":
        data[field] = value + rng.choice([1, 2]) if value <= 2 else value + rng.choice([-2, -1, 1, 2])
    elif field == "item":
        data[field] = plural(value)
    else:
        data[field] = rng.choice([v for v in pools[field] if v != value])
    return json.dumps(data)


def task_rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"orders_{split}.jsonl").read_text().splitlines()]


def pair_rows(split: str, kind: str = "broken") -> list[dict]:
    """Conversational pairs (prompt messages, chosen / rejected assistant messages) from the orders task; the
    rejected answer `broken` (kind "broken") or `subtle` (kind "subtle": the wrong field cycles over `FIELDS`)."""
    from peftkit.data.formats import INPUT_FORMAT

    rows = task_rows(split)
    pools = {k: sorted({json.loads(r["output"])[k] for r in task_rows("train")}) for k in FIELDS}
    rng = random.Random(f"{split}-{kind}")

    def rejected(i: int, answer: str) -> str:
        return broken(answer, i % 5) if kind == "broken" else subtle(answer, FIELDS[i % 5], pools, rng)

    return [{"prompt": [{"role": "user",
                         "content": INPUT_FORMAT.format(instruction=r["instruction"], input=r["input"])}],
             "chosen": [{"role": "assistant", "content": r["output"]}],
             "rejected": [{"role": "assistant", "content": rejected(i, r["output"])}]} for i, r in enumerate(rows)]


def write_pairs(folder: Path, kind: str = "broken") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = "orders_dpo" if kind == "broken" else f"orders_dpo_{kind}"
    paths = folder / f"{stem}_train.jsonl", folder / f"{stem}_test.jsonl"
    for path, split in zip(paths, ("train", "test"), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(split, kind)))
    return paths


def resident(model) -> None:
    """Read every weight once: a memory-mapped checkpoint's pages become resident before the memory baseline."""
    import torch

    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.float().sum() if t.is_floating_point() else t.sum()


def peftkit_order(n: int) -> list[int]:
    """The order peftkit's first epoch deals `n` pairs in (seed 0, nothing held out, none dropped)."""
    read = list(range(n))
    random.Random(0).shuffle(read)
    micro = list(range(n))
    random.Random(0).shuffle(micro)
    return [read[i] for i in micro]


def worker_peftkit(data: str, warmup: int, steps: int, examples: int, precision: str) -> dict:
    import torch

    from peftkit.models import load_model
    from peftkit.train import TrainConfig, Trainer

    model, tokenizer = load_model(MODEL, dtype=torch.float32)
    resident(model)
    after_load = rss_mib()
    reset_hwm()
    out = tempfile.mkdtemp(prefix="peftkit-dpo-")
    cfg = TrainConfig(model=MODEL, data=data, limit_examples=examples, max_length=MAX_LENGTH, lr=LR, beta=BETA,
                      objective="dpo", batch_size=PAIRS, max_steps=warmup + steps + 1, warmup_ratio=0.0,
                      output_dir=out, progress=False, seed=0, method="lora", method_config=LORA, precision=precision)
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
    before, clock, batches = snapshot(trainer.model), StepClock(warmup, steps), trainer.data.batches

    def timed_batches(epoch: int, micro: int):
        for item in batches(epoch, micro):
            clock.begin(int(item[2]["labels"][:, 1:].ne(-100).sum()), int(item[2]["sequence_ids"].max()) // 2 + 1)
            yield item

    trainer.data.batches = timed_batches  # type: ignore[method-assign]
    try:
        trainer.run()
    except WindowDone:
        pass
    log = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    clock.first_loss = log[0]["loss"]
    return {**clock.result(), "rss_after_load": after_load, "peak": clock.peak, "process_peak": process_peak_mib(),
            "moved": moved(trainer.model, before)}


def worker_trl(data: str, warmup: int, steps: int, examples: int, bf16: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from peftkit.models import resolve_model_path

    path = resolve_model_path(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    resident(model)
    after_load = rss_mib()
    reset_hwm()
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()][:examples]
    rows = [rows[i] for i in peftkit_order(len(rows))]
    clock = StepClock(warmup, steps)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin(0, PAIRS)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if clock.first_loss is None and logs and "loss" in logs:
                clock.first_loss = float(logs["loss"])

    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), per_device_train_batch_size=PAIRS,
                     learning_rate=LR, beta=BETA, max_length=MAX_LENGTH, lr_scheduler_type="cosine", warmup_steps=0,
                     max_steps=warmup + steps + 1, logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=True, bf16=bf16, train_sampling_strategy="sequential", dataloader_num_workers=0,
                     disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                         peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"), callbacks=[Clock()])
    before = snapshot(trainer.model)
    try:
        trainer.train()
    except WindowDone:
        pass
    return {**clock.result(), "rss_after_load": after_load, "peak": clock.peak, "process_peak": process_peak_mib(),
            "moved": moved(trainer.model, before)}


WORKERS = {"peftkit": lambda *a: worker_peftkit(*a, "fp32"), "trl": lambda *a: worker_trl(*a, False),
           "peftkit-auto": lambda *a: worker_peftkit(*a, "auto"), "trl-bf16": lambda *a: worker_trl(*a, True)}


def speed(args) -> str:
    """The speed and memory runs, alternating in fresh processes; the section's text."""
    from peftkit.hardware import native_bf16

    configs = [c for c in CONFIGS if native_bf16("cpu")[0] or c in ("peftkit", "trl")]
    t0, load_start = time.perf_counter(), os.getloadavg()
    train, _ = write_pairs(Path(tempfile.mkdtemp(prefix="dpo-pairs-")))
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    loads = []
    for rep in range(args.repeats):
        for config in configs:
            loads.append(os.getloadavg()[0])
            r = run_worker(config, args, __file__, extra=("--data", str(train)))
            r["pairs_s"], r["growth"] = r["positions"] / r["seconds"], r["peak"] - r["rss_after_load"]
            runs[config].append(r)
            print(f"rep {rep} {config:12s} {r['pairs_s']:.3f} pairs/s  peak +{r['growth']:.0f} MiB (process "
                  f"{r['process_peak']:.0f} MiB)  first loss {r['first_loss']}  moved {r['moved']}  load "
                  f"{loads[-1]:.1f}", flush=True)
    return speed_report(args, runs, time.perf_counter() - t0, load_start, loads)


def speed_report(args, runs: dict[str, list[dict]], elapsed: float, load_start, loads: list[float]) -> str:
    import torch

    med = {c: {k: statistics.median(r[k] for r in rs) for k in ("pairs_s", "growth", "process_peak")}
           for c, rs in runs.items()}
    def each(c: str, key: str, form: str) -> str:
        return ", ".join(format(r[key], form) for r in runs[c])

    rows = [f"| {c} | {m['pairs_s']:.3f} | {PAIRS / m['pairs_s']:.2f} | {each(c, 'pairs_s', '.3f')} | "
            f"{m['growth']:.0f} | {each(c, 'growth', '.0f')} | {m['process_peak']:.0f} | "
            f"{runs[c][0]['first_loss']:.6f} | {runs[c][0]['moved']} |" for c, m in med.items()]
    lines = []
    for ours, theirs in (("peftkit", "trl"), ("peftkit-auto", "trl-bf16")):
        if ours not in med:
            continue
        a, b = runs[ours], runs[theirs]
        speedups = [x["pairs_s"] / y["pairs_s"] for x, y in zip(a, b, strict=True)]
        memory = [x["growth"] / y["growth"] for x, y in zip(a, b, strict=True)]
        lines.append(f"**{ours} vs {theirs}**: **{med[ours]['pairs_s'] / med[theirs]['pairs_s']:.2f}x** TRL's pairs/s "
                     f"(per round {', '.join(f'{x:.2f}' for x in speedups)}; target >= 2x) at **"
                     f"{med[ours]['growth'] / med[theirs]['growth']:.2f}x** its peak memory growth (per round "
                     f"{', '.join(f'{x:.2f}' for x in memory)}; target <= 0.6x); "
                     f"{med[ours]['process_peak'] / med[theirs]['process_peak']:.2f}x its whole-process peak.")
    return "\n".join([
        f"## dpo — `python bench/dpo.py --part speed --repeats {args.repeats} --warmup {args.warmup} --steps "
        f"{args.steps} --threads {args.threads}` ({machine()}, {elapsed:.0f} s; load average {load_start[0]:.1f} "
        f"at the start, {min(loads):.1f}-{max(loads):.1f} at the runs' starts, {os.getloadavg()[0]:.1f} at the end)",
        "",
        f"torch CPU capability `{torch.backends.cpu.get_cpu_capability()}`. DPO sigmoid beta {BETA} on the bundled "
        f"{MODEL}, LoRA r=8 alpha=16 on all linear layers, {PAIRS} pairs per step (orders task: correct JSON chosen, "
        f"broken JSON rejected; the same pairs in the same order on both sides), {args.warmup} warm-up + "
        f"{args.steps} timed steps per run, {args.threads} torch thread(s) per run, the configurations alternating "
        f"in fresh processes, {args.repeats} rounds, medians. TRL {_version('trl')}, peft {_version('peft')}. "
        "*peak growth* = peak RSS during training minus the RSS once the fp32 model is loaded and its weights "
        "resident (the checkpoint is memory-mapped by both: read once before the baseline); *process peak* = the "
        "whole worker's peak RSS. `-auto` / `-bf16`: peftkit's `precision: auto` (here bf16 frozen weights + "
        "autocast) and TRL's `bf16=True` (autocast over fp32 weights).",
        "",
        "| configuration | pairs/s | s/step | pairs/s per round | peak growth (MiB) | per round | process peak (MiB) "
        "| first loss | tensors moved |",
        "|---|---:|---:|---|---:|---|---:|---:|---:|",
        *rows,
        "",
        *lines,
    ])


def preference_scores(trainer) -> dict[str, float]:
    """On the run's held-out pairs, in one pass (the policy and the reference once each): how often the model finds
    the chosen answer likelier than the rejected one (by summed log-probability, and per token), the implicit reward
    accuracy and margin, and the mean DPO loss (`PreferenceObjective.losses`, as its `evaluate` sums them)."""
    import torch

    from peftkit.data.preference import collate_pairs

    data, model, objective = trainer.data, trainer.model, trainer.objective
    rows = data.eval_rows()
    sums = dict.fromkeys(("summed", "per_token", "accuracy", "margin", "loss"), 0.0)
    prefers: list[bool] = []  # per pair, in the file's order: the correct answer likelier (summed log-probability)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            losses, rewards, policy, counts = objective.losses(model, collate_pairs(rows[i:i + 8], data.pad_id,
                                                                                    data.packing))
            mean = policy / counts
            prefers += (policy[:, 0] > policy[:, 1]).tolist()
            sums["summed"] += float((policy[:, 0] > policy[:, 1]).sum())
            sums["per_token"] += float((mean[:, 0] > mean[:, 1]).sum())
            sums["accuracy"] += float((rewards[:, 0] > rewards[:, 1]).sum())
            sums["margin"] += float((rewards[:, 0] - rewards[:, 1]).sum())
            sums["loss"] += float(losses.sum())
    model.train(was_training)
    return {**{k: v / len(rows) for k, v in sums.items()}, "prefers": prefers}


def accuracy(args) -> str:
    """A short peftkit DPO run on the subtle pairs, scored on the held-out pairs before and after."""
    import torch

    from peftkit.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    t0, load_start = time.perf_counter(), os.getloadavg()
    train, test = write_pairs(Path(tempfile.mkdtemp(prefix="dpo-subtle-")), "subtle")
    cfg = TrainConfig(model=MODEL, data=str(train), eval_data=str(test), max_length=MAX_LENGTH, lr=args.accuracy_lr,
                      beta=BETA, objective="dpo", batch_size=PAIRS, max_steps=args.accuracy_steps, warmup_ratio=0.1,
                      output_dir=tempfile.mkdtemp(prefix="peftkit-dpo-acc-"), progress=False, seed=0,
                      method="lora", method_config=LORA, precision=args.accuracy_precision)
    trainer = Trainer(cfg)
    before = preference_scores(trainer)
    print("before", {k: v for k, v in before.items() if k != "prefers"}, flush=True)
    t1 = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - t1
    after = preference_scores(trainer)
    print("after", {k: v for k, v in after.items() if k != "prefers"}, flush=True)
    n = len(trainer.data.eval_rows())
    if n != len(task_rows("test")):
        raise SystemExit(f"{n} held-out pairs of {len(task_rows('test'))}: some were dropped (raise max_length)")
    cell = "| {} | {summed:.2f} | {per_token:.2f} | {accuracy:.2f} | {margin:.3f} | {loss:.4f} |"

    def by_field(scores: dict) -> str:  # pair j's wrong field is FIELDS[j % 5] (`pair_rows`)
        return ", ".join(f"{f} {sum(scores['prefers'][j::5])}/{len(scores['prefers'][j::5])}"
                         for j, f in enumerate(FIELDS))

    return "\n".join([
        f"## dpo-accuracy — `python bench/dpo.py --part accuracy --accuracy-steps {args.accuracy_steps} "
        f"--accuracy-lr {args.accuracy_lr} --accuracy-precision {args.accuracy_precision} --threads {args.threads}` "
        f"({machine()}, {time.perf_counter() - t0:.0f} s; load average {load_start[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end)",
        "",
        f"Subtle pairs from the orders task (`subtle`: the rejected answer is the correct JSON with one field wrong: "
        f"quantity off by one or two, another city, colour or name, the item in the plural; both valid JSON). One "
        f"peftkit DPO run on the bundled {MODEL}: LoRA r=8 alpha=16 on all linear layers, sigmoid beta {BETA}, "
        f"lr {args.accuracy_lr} (10% warmup, cosine), {PAIRS} pairs per step, {args.accuracy_steps} steps "
        f"({args.accuracy_steps * PAIRS} of the {len(trainer.data.rows)} training pairs, {seconds:.0f} s), "
        f"precision {args.accuracy_precision}. Scored on the {n} held-out pairs (the task's test rows, never "
        "trained on). *prefers chosen*: share of pairs whose correct answer the model finds likelier than the wrong "
        "one; *reward accuracy* / *margin*: TRL's `rewards/accuracies` / `rewards/margins` (implicit rewards against "
        "the reference = the model with its adapter off: 0 before training by definition).",
        "",
        "| model | prefers chosen (summed log-prob) | prefers chosen (per token) | reward accuracy | reward margin "
        "| DPO loss |",
        "|---|---:|---:|---:|---:|---:|",
        cell.format("base (before)", **before),
        cell.format(f"after {args.accuracy_steps} DPO steps", **after),
        "",
        f"Prefers chosen, by the rejected answer's wrong field: before {by_field(before)}; after {by_field(after)}.",
    ])


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = worker_parser(__doc__, CONFIGS, repeats=3, steps=3, examples=200)
    parser.add_argument("--data", help="(worker) the training pairs")
    parser.add_argument("--part", choices=("speed", "accuracy", "both"), default="both")
    parser.add_argument("--accuracy-steps", type=int, default=60)
    parser.add_argument("--accuracy-lr", type=float, default=2e-4)
    parser.add_argument("--accuracy-precision", default="auto")
    parser.add_argument("--write-data", metavar="FOLDER", help="write the pair files to FOLDER and stop")
    args = parser.parse_args()
    if args.write_data:
        for kind in ("broken", "subtle"):
            print(*write_pairs(Path(args.write_data), kind))
        return
    if in_worker(args, lambda: WORKERS[args.worker](args.data, args.warmup, args.steps, args.examples)):
        return
    for part, run in (("speed", speed), ("accuracy", accuracy)):
        if args.part in (part, "both"):
            body = run(args)
            print(body, flush=True)
            if not args.no_write:
                write_section("dpo" if part == "speed" else "dpo-accuracy", body)


if __name__ == "__main__":
    main()
