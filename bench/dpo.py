"""Benchmark: a DPO training step, peftkit vs TRL's DPOTrainer + peft, and what a short DPO run does on held-out pairs.

Pairs from the bundled orders task (`peftkit/data/tasks`): the prompt is the task's instruction and customer message,
the chosen answer its correct JSON, the rejected one the same JSON broken one way (cut short, a key missing, a wrong
quantity, single quotes, or a trailing comma; `broken`). The bundled SmolLM2-135M-Instruct, fp32, LoRA r=8 alpha=16
no dropout on q,k,v,o,gate,up,down, DPO sigmoid beta 0.1, AdamW lr 5e-5, 4 pairs per step, max length 256, the same
pairs in the same order on both sides (TRL gets them in peftkit's shuffled order, sequential sampler). peftkit packs
each pair's prompt once with both answers attending to it and runs the reference with the adapter off; TRL pads
chosen and rejected into 8 rows and runs them twice (policy, then the reference with the adapter off).

Each run is a fresh subprocess (``--worker``), the two alternate, several repetitions (`train_throughput`'s workers:
time from the start of the first step after the warmup to the start of the step after the window; peak memory =
peak RSS during training minus the RSS after loading the model, and the whole process's peak). Then one peftkit DPO
run of ``--accuracy-steps`` steps on 400 training pairs, scored on 100 held-out pairs (the task's test rows): the
implicit reward accuracy (TRL's ``rewards/accuracies``) and how often the policy's own log-probability of the
correct answer beats the broken one's, before and after. Writes section "dpo" of BENCHMARKS.md.

    python bench/dpo.py                  # ~6 minutes on an idle 2-core CPU
    python bench/dpo.py --write-data recipes   # (re)write the shipped pair files beside the recipes
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
CONFIGS = ("peftkit", "trl")
TASKS = ROOT / "src" / "peftkit" / "data" / "tasks"
PAIRS, MAX_LENGTH, LR, BETA = 4, 256, 5e-5, 0.1
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS}


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


def pair_rows(split: str) -> list[dict]:
    """Conversational pairs (prompt messages, chosen / rejected assistant messages) from the orders task."""
    from peftkit.data.formats import INPUT_FORMAT

    rows = [json.loads(line) for line in (TASKS / f"orders_{split}.jsonl").read_text().splitlines()]
    return [{"prompt": [{"role": "user",
                         "content": INPUT_FORMAT.format(instruction=r["instruction"], input=r["input"])}],
             "chosen": [{"role": "assistant", "content": r["output"]}],
             "rejected": [{"role": "assistant", "content": broken(r["output"], i % 5)}]} for i, r in enumerate(rows)]


def write_pairs(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "orders_dpo_train.jsonl", folder / "orders_dpo_test.jsonl"
    for path, split in zip(paths, ("train", "test"), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(split)))
    return paths


def peftkit_order(n: int) -> list[int]:
    """The order peftkit's first epoch deals `n` pairs in (seed 0, nothing held out, none dropped)."""
    read = list(range(n))
    random.Random(0).shuffle(read)
    micro = list(range(n))
    random.Random(0).shuffle(micro)
    return [read[i] for i in micro]


def worker_peftkit(data: str, warmup: int, steps: int, examples: int) -> dict:
    import torch

    from peftkit.models import load_model
    from peftkit.train import TrainConfig, Trainer

    model, tokenizer = load_model(MODEL, dtype=torch.float32)
    after_load = rss_mib()
    reset_hwm()
    out = tempfile.mkdtemp(prefix="peftkit-dpo-")
    cfg = TrainConfig(model=MODEL, data=data, limit_examples=examples, max_length=MAX_LENGTH, lr=LR, beta=BETA,
                      objective="dpo", batch_size=PAIRS, max_steps=warmup + steps + 1, warmup_ratio=0.0,
                      output_dir=out, progress=False, seed=0, method="lora", method_config=LORA, precision="fp32")
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


def worker_trl(data: str, warmup: int, steps: int, examples: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from peftkit.models import resolve_model_path

    path = resolve_model_path(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
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
                     use_cpu=True, bf16=False, train_sampling_strategy="sequential", dataloader_num_workers=0,
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


def policy_prefers_chosen(trainer) -> tuple[float, float]:
    """Share of held-out pairs whose correct answer the model itself finds likelier than the broken one: by summed
    log-probability, and by mean log-probability per token."""
    import torch

    from peftkit.data.preference import collate_pairs

    data, model = trainer.data, trainer.model.eval()
    rows, summed, mean = data.eval_rows(), 0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            _, _, policy, counts = trainer.objective.losses(model, collate_pairs(rows[i:i + 8], data.pad_id,
                                                                                 data.packing))
            summed += int((policy[:, 0] > policy[:, 1]).sum())
            mean += int((policy[:, 0] / counts[:, 0] > policy[:, 1] / counts[:, 1]).sum())
    model.train()
    return summed / len(rows), mean / len(rows)


def accuracy_run(train: Path, test: Path, steps: int, n_eval: int) -> dict:
    """A short peftkit DPO run; scores on the first `n_eval` held-out pairs before and after."""
    from peftkit.train import TrainConfig, Trainer

    held_out = test.with_name(f"held_out_{n_eval}.jsonl")
    held_out.write_text("".join(test.read_text().splitlines(keepends=True)[:n_eval]))
    cfg = TrainConfig(model=MODEL, data=str(train), eval_data=str(held_out), limit_examples=400, max_length=MAX_LENGTH,
                      lr=2e-4, beta=BETA, objective="dpo", batch_size=PAIRS, max_steps=steps, warmup_ratio=0.1,
                      output_dir=tempfile.mkdtemp(prefix="peftkit-dpo-acc-"), progress=False, seed=0,
                      method="lora", method_config=LORA, precision="fp32")
    trainer = Trainer(cfg)
    before = policy_prefers_chosen(trainer)
    t0 = time.perf_counter()
    result = trainer.run()
    after = policy_prefers_chosen(trainer)
    return {"before": before, "after": after, "final": result.final_scores, "seconds": time.perf_counter() - t0,
            "pairs": len(trainer.data.eval_rows())}


def report(args, s: dict, acc: dict, elapsed: float) -> str:
    import torch

    from peftkit.hardware import native_bf16

    pk, tr = s["peftkit"], s["trl"]
    rows = [f"| {c} | {v['pairs_s']:.2f} | {v['step_s']:.2f} | {v['growth']:.0f} | {v['process']:.0f} | "
            f"{v['first_loss']} | {v['moved']} |" for c, v in s.items()]
    f = acc["final"]
    return "\n".join([
        f"## dpo — `python bench/dpo.py --repeats {args.repeats} --warmup {args.warmup} --steps {args.steps} "
        f"--threads {args.threads} --accuracy-steps {args.accuracy_steps} --eval-pairs {args.eval_pairs}` "
        f"({machine()}, {elapsed:.0f} s, load average {os.getloadavg()[0]:.1f} at the end)",
        "",
        f"torch CPU capability `{torch.backends.cpu.get_cpu_capability()}`, bf16 native: {native_bf16('cpu')[0]}. "
        f"DPO sigmoid beta {BETA} on the bundled {MODEL}, fp32, LoRA r=8 alpha=16 on all linear layers, "
        f"{PAIRS} pairs per step (orders task: correct JSON chosen, broken JSON rejected), {args.warmup} warm-up + "
        f"{args.steps} timed steps per run, runs alternating in fresh processes, medians of {args.repeats}. "
        f"TRL {_version('trl')}, peft {_version('peft')}.",
        "",
        "| library | pairs/s | s/step | peak memory growth (MiB) | process peak RSS (MiB) | first loss "
        "| tensors moved |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"peftkit: {pk['pairs_s'] / tr['pairs_s']:.2f}x TRL's pairs/s at {pk['growth'] / tr['growth']:.2f}x its "
        f"peak memory growth ({pk['process'] / tr['process']:.2f}x the process peak); targets >= 2x at <= 0.6x.",
        "",
        f"Held-out ({acc['pairs']} test pairs) after a {args.accuracy_steps}-step peftkit DPO run (lr 2e-4, "
        f"{acc['seconds']:.0f} s): reward accuracy (rewards/accuracies) {f.get('eval_rewards/accuracies', 0):.2f}, "
        f"margin {f.get('eval_rewards/margins', 0):.3f}; the policy finds the correct answer likelier than the broken "
        f"one in {acc['before'][0]:.2f} -> {acc['after'][0]:.2f} of the pairs by summed log-probability, "
        f"{acc['before'][1]:.2f} -> {acc['after'][1]:.2f} per token (before -> after; at the start the reward "
        "accuracy is 0 by definition: policy = reference).",
    ])


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = worker_parser(__doc__, CONFIGS, repeats=2, steps=3, examples=200)
    parser.add_argument("--data", help="(worker) the training pairs")
    parser.add_argument("--accuracy-steps", type=int, default=40)
    parser.add_argument("--eval-pairs", type=int, default=100, help="held-out pairs scored (of the task's 100)")
    parser.add_argument("--write-data", metavar="FOLDER", help="write the pair files to FOLDER and stop")
    args = parser.parse_args()
    if args.write_data:
        print(*write_pairs(Path(args.write_data)))
        return
    worker = worker_peftkit if args.worker == "peftkit" else worker_trl
    if in_worker(args, lambda: worker(args.data, args.warmup, args.steps, args.examples)):
        return
    t0 = time.perf_counter()
    train, test = write_pairs(Path(tempfile.mkdtemp(prefix="dpo-pairs-")))
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for rep in range(args.repeats):  # alternating, each run a fresh process reading the same pairs
        for config in CONFIGS:
            r = run_worker(config, args, __file__, extra=("--data", str(train)))
            runs[config].append(r)
            print(f"rep {rep} {config:8s} {r['positions'] / r['seconds']:.2f} pairs/s  peak "
                  f"+{r['peak'] - r['rss_after_load']:.0f} MiB (process {r['process_peak']:.0f} MiB)  "
                  f"first loss {r['first_loss']}  moved {r['moved']}", flush=True)
    s = {c: {"pairs_s": statistics.median(r["positions"] / r["seconds"] for r in rs),
             "step_s": statistics.median(r["seconds"] / args.steps for r in rs),
             "growth": statistics.median(r["peak"] - r["rss_after_load"] for r in rs),
             "process": statistics.median(r["process_peak"] for r in rs),
             "first_loss": rs[0]["first_loss"], "moved": rs[0]["moved"]} for c, rs in runs.items()}
    acc = accuracy_run(train, test, args.accuracy_steps, args.eval_pairs)
    body = report(args, s, acc, time.perf_counter() - t0)
    print(body)
    if not args.no_write:
        write_section("dpo", body)


if __name__ == "__main__":
    main()
