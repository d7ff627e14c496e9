"""Compare fine-tuning methods (and in-context learning) on the same model, data and budget.

:func:`run_compare` runs each entry in a fresh Python process (``python -m peftkit.eval.compare worker ...``):
a crash or an out-of-memory kill stays in its own row, and the peak memory of a row is that process's own peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: loading, training and evaluation). Each
process loads the model, trains with :class:`peftkit.train.Trainer` (or, for ICL, prompts with examples),
generates answers to the evaluation prompts (greedy, :func:`peftkit.generation.generate`), scores them
(:func:`peftkit.eval.metrics.e2e_metrics` by default) and measures forgetting on the general probe
(:mod:`peftkit.eval.forgetting`). The parent writes ``results.csv``, ``results.md`` and ``bleu_vs_params.png``.

Every entry shares :data:`COMMON_SETTINGS` (peftkit's defaults: precision auto + packing) and the run's overrides; an
entry only says what differs (method, its settings, learning rate, quantization).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import resource
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

__all__ = [
    "COMMON_SETTINGS",
    "DEFAULT_ENTRIES",
    "DEFAULT_METHODS",
    "CompareTask",
    "TrainingProgress",
    "check_entries",
    "e2e_task",
    "file_task",
    "markdown_table",
    "run_compare",
]

COMMON_SETTINGS: dict[str, Any] = {
    "precision": "auto",
    "packing": True,
    "max_length": 512,
    "batch_size": 2,
    "epochs": 1.0,
    "warmup_ratio": 0.03,
    "scheduler": "cosine",
    "seed": 0,
    "progress": False,
}
"""Training settings shared by every entry (``TrainConfig`` keys); the run's overrides come on top."""

PROGRESS_EVERY_S = 10.0
"""Seconds between an entry's progress lines while it trains (its first and last steps always get one)."""

EWC_LAMBDA = 0.1  # see bench/e2e_compare.py's notes for how it was chosen
_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}
DEFAULT_ENTRIES: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "method_config": _LORA, "lr": 1e-3},
    "dora": {"method": "dora", "method_config": _LORA, "lr": 1e-3},
    "lora+": {"method": "lora", "method_config": {**_LORA, "loraplus_lr_ratio": 16.0}, "lr": 1e-3},
    "pissa": {"method": "lora", "method_config": {**_LORA, "init_lora_weights": "pissa_niter_4"}, "lr": 1e-3},
    "olora": {"method": "lora", "method_config": {**_LORA, "init_lora_weights": "olora"}, "lr": 1e-3},
    "ia3": {"method": "ia3", "lr": 1e-2},
    "full": {"method": "full", "lr": 1e-4},
    "icl": {"method": "icl", "k": 3, "draws": 2, "orders": 2},
    "houlsby": {"method": "houlsby", "method_config": {"reduction_factor": 16}, "lr": 1e-3},
    "prefix": {"method": "prefix_tuning", "method_config": {"num_virtual_tokens": 10}, "lr": 1e-3},
    "prompt": {"method": "prompt_tuning", "method_config": {"num_virtual_tokens": 20}, "lr": 3e-2},
    "top2": {"method": "top_k_layers", "method_config": {"k": 2}, "lr": 1e-3},
    "norms": {"method": "norms", "lr": 3e-3},
    "said": {"method": "intrinsic_said", "method_config": {"d": 1000}, "lr": 3e-2},
    "zero_shot": {"method": "icl", "k": 0},
    # the two classic mitigations of forgetting, on full fine-tuning (they need `replay_data`)
    "full+replay": {"method": "full", "lr": 1e-4, "replay_fraction": 0.25},
    "full+ewc": {"method": "full", "lr": 1e-4, "ewc_lambda": EWC_LAMBDA},
}
"""Named entries: ``TrainConfig`` keys (``method: icl`` is in-context learning: ``k``, ``draws``, ``orders``).
Entries with ``replay_fraction`` or ``ewc_lambda`` train with `run_compare`'s ``replay_data`` (general instruction
data, mixed into the batches or used for the Fisher).

Every registered method is also an entry under its own name (``sparse``: its config's defaults), and the entries
named after a method train that method; every registry preset is one too (``qlora``: the ``lora`` entry over the
preset's NF4 + double-quantized base, see :func:`peftkit.core.registry.resolve_method`). The other names are
aliases for a setting of a registered method: ``lora+`` (LoRA+: B at 16 x lr), ``pissa`` and ``olora`` (LoRA with
that ``init_lora_weights``), ``prefix`` (``prefix_tuning``), ``prompt`` (``prompt_tuning``), ``top2``
(``top_k_layers`` with ``k: 2``), ``said`` (``intrinsic_said``), ``full+replay`` and ``full+ewc``; ``icl`` and
``zero_shot`` prompt the base model (k = 3 and 0 examples).

The learning rates are the usual ones for each family, raised for short runs (tens of steps); those of ``top2`` and
``said`` come from `python bench/e2e_compare.py --lr-sweep` (E2E, 33 steps: top2 2e-4 / 5e-4 / 1e-3 -> BLEU 0.444 /
0.448 / 0.494, said 1e-2 / 3e-2 / 1e-1 -> 0.441 / 0.566 / 0.494); prompt tuning (3e-2 / 1e-1 / 3e-1 -> 0.452 /
0.404 / 0.468) kept its rate: no clear gain. DoRA and the LoRA initialisations take LoRA's settings and rate;
(IA)^3, with about a hundredth of LoRA's parameters, the higher rate its paper uses (3e-3) raised for short runs.
"""

DEFAULT_METHODS: tuple[str, ...] = ("lora", "qlora", "full", "icl", "houlsby", "prefix", "prompt", "top2", "norms",
                                    "said")

_ICL_KEYS = ("k", "draws", "orders")
_ICL_RUNS = "icl_runs.jsonl"  # in the entry's folder: one line per finished (draw, order) run
CSV_COLUMNS = ("method", "trainable_params", "trainable_pct", "peak_rss_gb", "train_s", "target_tok_s",
               "BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "probe_loss", "probe_loss_increase", "probe_rouge_l",
               "prompt_tokens", "eval_s", "total_s", "settings", "error")


@dataclasses.dataclass
class CompareTask:
    """What every entry trains on and is scored on.

    Attributes:
        train_file: instruction data for training (any format ``TrainConfig.data`` reads).
        prompts: evaluation user messages; references: their references (one list per prompt).
        description: one line for the report (data, sizes, seed).
    """

    train_file: str
    prompts: list[str]
    references: list[list[str]]
    description: str = ""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> CompareTask:
        return cls(**json.loads(Path(path).read_text()))


def e2e_task(out_dir: str | Path, n_train: int = 1000, n_eval: int = 100, root: str | Path | None = None,
             seed: int = 0) -> CompareTask:
    """The E2E NLG task of ``SPECS.md`` section 6: the first `n_train` rows of ``trainset.csv`` shuffled with
    `seed`, one (MR, reference) pair per row; scored on the first `n_eval` test MRs with all their references."""
    from peftkit.data.formats import row_to_conversation
    from peftkit.eval.e2e import e2e_instruction_rows, load_e2e

    items = load_e2e("train", root, group=False)[:n_train]
    random.Random(seed).shuffle(items)
    rows = e2e_instruction_rows(items, one_row_per_ref=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = load_e2e("test", root)[:n_eval]
    prompts = [row_to_conversation(r)[0]["content"] for r in e2e_instruction_rows(test, one_row_per_ref=False)]
    desc = (f"E2E NLG: first {len(rows)} rows of trainset.csv shuffled with seed {seed}; "
            f"first {len(test)} test MRs ({sum(len(t.refs) for t in test)} references)")
    return CompareTask(str(train_file), prompts, [t.refs for t in test], desc)


def file_task(train_file: str, eval_file: str, n_eval: int | None = None) -> CompareTask:
    """A task from two instruction files; each eval row's output is its reference (or ``references``: a list)."""
    from peftkit.data.formats import read_rows, row_to_conversation

    prompts, references = [], []
    for row in read_rows(eval_file)[:n_eval]:
        refs = row.get("references")
        conv = row_to_conversation({k: v for k, v in row.items() if k != "references"} if refs else row)
        prompts.append(conv[0]["content"])
        references.append(list(refs) if refs else [conv[-1]["content"]])
    return CompareTask(train_file, prompts, references, f"{train_file}; scored on {len(prompts)} rows of {eval_file}")


# ------------------------------------------------------------------------------------------- one entry (child)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


Score = Callable[[list[str], Sequence[Sequence[str]]], dict[str, float]]


def _score_fn(metrics: str) -> Score:
    from peftkit.eval.metrics import e2e_metrics

    if metrics == "bleu-nist":
        return lambda p, r: e2e_metrics(p, r, skip_java=True)
    return e2e_metrics


def run_entry(spec: dict[str, Any]) -> dict[str, Any]:
    """Train (or prompt), evaluate and probe one entry; `spec` is what :func:`run_compare` writes for it."""
    import torch

    from peftkit.eval.forgetting import Probe
    from peftkit.hardware import resolve_precision
    from peftkit.models import load_model

    t_start = time.perf_counter()
    torch.manual_seed(0)
    settings = {**spec["common"], **spec["entry"]}
    task = CompareTask.load(spec["task"])
    score = _score_fn(spec.get("metrics", "all"))
    precision = resolve_precision(settings.get("precision", "auto"))
    print(f"{spec['label']}: {precision.line()}", flush=True)
    model, tokenizer = load_model(spec["model"], dtype=precision.weight_dtype)
    result: dict[str, Any] = {"method": spec["label"], "settings": _settings_text(spec["entry"]),
                              "precision": precision.name}
    probe = Probe.load(spec["probe"]) if spec.get("probe") else None
    run = _run_icl_entry if settings["method"] == "icl" else _run_trained_entry
    result.update(run(spec, settings, task, score, model, tokenizer, probe))
    if settings["method"] == "icl":
        result["eval_s"] = time.perf_counter() - t_start
    result["peak_rss_gb"] = _peak_rss_gb()
    result["total_s"] = time.perf_counter() - t_start
    return result


def _generation_settings(spec: dict[str, Any]) -> dict[str, Any]:
    return {"max_new_tokens": spec.get("max_new_tokens", 64), "batch_size": spec.get("eval_batch_size", 16)}


def _run_icl_entry(spec: dict[str, Any], settings: dict[str, Any], task: CompareTask, score: Score, model: Any,
                   tokenizer: Any, probe: Any) -> dict[str, Any]:
    """The in-context learning entry: `k` examples from the training file before each prompt, no training."""
    from peftkit.data.formats import read_conversations
    from peftkit.eval.icl import ICLExample, run_icl

    pool = [ICLExample(c[0]["content"], c[-1]["content"]) for c in read_conversations(task.train_file)]
    runs_file = Path(spec["output_dir"]).parent / _ICL_RUNS
    runs_file.unlink(missing_ok=True)

    def save_run(run: Any) -> None:  # a stopped evaluation keeps its finished runs
        with runs_file.open("a") as f:
            f.write(json.dumps({"draw": run.draw, "order": run.order, **run.scores}) + "\n")

    icl = run_icl(model, tokenizer, pool, task.prompts, task.references, k=settings.get("k", 3),
                  draws=settings.get("draws", 1), orders=settings.get("orders", 1),
                  score=score, progress=lambda line: _say(f"{spec['label']}: {line}"),
                  on_run=save_run, **_generation_settings(spec))
    result: dict[str, Any] = {m: s["mean"] for m, s in icl.summary.items()}
    result["spread"] = icl.summary
    result["icl_runs"] = [{"draw": r.draw, "order": r.order, **r.scores} for r in icl.runs]
    result["predictions"] = icl.runs[0].predictions
    result.update(trainable_params=0, trainable_pct=0.0, prompt_tokens=icl.prompt_tokens,
                  zero_shot_prompt_tokens=icl.zero_shot_prompt_tokens)
    if probe is not None:  # no weight changes: the probe is the base model's, by construction
        result.update(probe_loss=probe.base_loss, probe_loss_increase=0.0, probe_rouge_l=1.0)
    return result


def _run_trained_entry(spec: dict[str, Any], settings: dict[str, Any], task: CompareTask, score: Score,
                       model: Any, tokenizer: Any, probe: Any) -> dict[str, Any]:
    """A method's entry: train on the task, answer its prompts, measure forgetting on the probe."""
    from peftkit.eval.forgetting import measure_forgetting
    from peftkit.eval.icl import icl_conversation, prompt_tokens
    from peftkit.generation import generate
    from peftkit.train import TrainConfig, Trainer
    from peftkit.train.model import count_parameters

    gen = _generation_settings(spec)
    base_params = count_parameters(model)["total"]  # before quantization turns weights into buffers
    train_keys = {k: v for k, v in settings.items() if k not in _ICL_KEYS}
    cfg = TrainConfig.from_dict({**train_keys, "model": spec["model"], "data": task.train_file,
                                 "output_dir": spec["output_dir"]})
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer, overwrite=True)  # compare owns its entry folders
    params = trainer.params
    print(f"{spec['label']}: {params['trainable']:,} trainable parameters "
          f"({100 * params['trainable'] / base_params:.3f}% of the base model's {base_params:,}), "
          f"{len(trainer.data.rows)} rows, {trainer.total_steps} steps", flush=True)
    trainer.subscribe(TrainingProgress(spec["label"], trainer.total_steps))
    train = trainer.run()
    print(f"{spec['label']}: trained in {train.train_seconds:.0f} s, final loss {train.train_loss:.4f}", flush=True)
    model = trainer.model
    t_eval = time.perf_counter()
    # the prompts are whole user messages (instruction included), rendered in the template training used
    predictions = generate(model, tokenizer, task.prompts, template=trainer.context.chat_template, **gen)
    result: dict[str, Any] = dict(score(predictions, task.references))
    result.update(trainable_params=params["trainable"], base_params=base_params,
                  trainable_pct=100.0 * params["trainable"] / base_params,
                  train_s=train.train_seconds, target_tok_s=train.target_tokens_per_s, train_loss=train.train_loss,
                  steps=train.steps, predictions=predictions, eval_s=time.perf_counter() - t_eval,
                  prompt_tokens=prompt_tokens(tokenizer, [icl_conversation([], p) for p in task.prompts]))
    if probe is not None:
        report = measure_forgetting(model, tokenizer, probe, max_new_tokens=spec.get("probe_new_tokens", 48),
                                    batch_size=gen["batch_size"])
        result.update({"probe_loss": report.loss_after, "probe_loss_increase": report.loss_increase,
                       "probe_rouge_l": report.rouge_l, "probe_exact": report.exact,
                       "probe_answers": report.answers})
    return result


class TrainingProgress:
    """A `Trainer` listener that prints ``LABEL: step S/TOTAL, loss L, ETA T`` as an entry trains: on the first
    step, then at most once every `every_s` seconds, and on the last step (flushed: the parent relays the lines).

    The ETA assumes the remaining steps take as long as the ones so far (timed from this object's creation, just
    before training starts).
    """

    def __init__(self, label: str, total_steps: int, every_s: float = PROGRESS_EVERY_S,
                 clock: Callable[[], float] = time.perf_counter, say: Callable[[str], None] | None = None):
        self.label, self.total, self.every_s, self.clock = label, total_steps, every_s, clock
        self.say = say or _say
        self.start = self.clock()
        self.last: float | None = None

    def __call__(self, event: Any) -> None:  # a `peftkit.train.events.StepEvent`
        now = self.clock()
        total = event.total_steps or self.total
        if self.last is not None and now - self.last < self.every_s and event.step < total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(event.step, 1) * max(total - event.step, 0)
        self.say(f"{self.label}: step {event.step}/{total}, loss {event.loss:.4f}, "
                 f"{_duration(elapsed)} elapsed, ETA {_duration(eta)}")


def _say(line: str) -> None:
    print(line, flush=True)  # flushed: compare's output is often a pipe or a log file, read while it runs


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def build_probe_file(spec: dict[str, Any]) -> dict[str, Any]:
    """The base model's probe (greedy answers to the shipped questions and its loss on them), in the entries'
    precision's weight dtype."""
    from peftkit.eval.forgetting import build_probe
    from peftkit.hardware import resolve_precision
    from peftkit.models import load_model

    precision = resolve_precision(spec["common"].get("precision", "auto"))
    model, tokenizer = load_model(spec["model"], dtype=precision.weight_dtype)
    probe = build_probe(model, tokenizer, max_new_tokens=spec.get("probe_new_tokens", 48),
                        batch_size=spec.get("eval_batch_size", 16))
    probe.save(spec["probe"])
    return {"probe_loss": probe.base_loss, "prompts": len(probe.prompts), "peak_rss_gb": _peak_rss_gb()}


def _worker(argv: list[str]) -> int:
    """``python -m peftkit.eval.compare worker SPEC.json RESULT.json``: run one entry, write its result."""
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    try:
        result = build_probe_file(spec) if spec.get("kind") == "probe" else run_entry(spec)
    except BaseException as e:  # noqa: BLE001 - the row must say what went wrong, whatever it was
        traceback.print_exc()
        out_path.write_text(json.dumps({"method": spec.get("label"), "error": f"{type(e).__name__}: {e}",
                                        "peak_rss_gb": _peak_rss_gb()}))
        return 1
    out_path.write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------- the run (parent)
def _run_worker(command: list[str], log_path: Path, timeout: float | None, prefix: str,
                relay: Callable[[str], None] | None) -> int | None:
    """Run `command`, writing its output to `log_path` line by line and passing the lines that start with `prefix`
    to `relay` as they come. Returns its exit status, None when it ran past `timeout` seconds (and was killed)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    timed_out = threading.Event()
    with log_path.open("w") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     env=env, text=True, errors="replace") as proc:

        def stop() -> None:  # past its time: the loop below ends when the killed worker's output closes
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, stop) if timeout is not None else None
        if timer is not None:
            timer.start()
        try:
            assert proc.stdout is not None  # stdout=PIPE
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if relay is not None and line.startswith(prefix):
                    relay("    " + line.rstrip())
            code = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
    return None if timed_out.is_set() else code



def _settings_text(entry: dict[str, Any]) -> str:
    parts = []
    for key, value in entry.items():
        if key == "method_config":
            parts += [f"{k}={v}" for k, v in value.items()]
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _spawn(spec: dict[str, Any], folder: Path, timeout: float | None,
           relay: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one worker process; its output goes to ``folder/log.txt``, and its own lines (``LABEL: ...``: settings,
    training progress) to `relay` as they come. Never raises for the entry's failure."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = folder / "spec.json", folder / "result.json", folder / "log.txt"
    spec_path.write_text(json.dumps(spec, indent=1))
    out_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "peftkit.eval.compare", "worker", str(spec_path), str(out_path)]
    code = _run_worker(command, log_path, timeout, f"{spec.get('label')}: ", relay)
    if out_path.is_file():
        result = json.loads(out_path.read_text())
    else:
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
        why = "timed out" if code is None else f"process exited with status {code}"
        if code is not None and code < 0:
            why = f"process killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
        result = {"error": why + (f": {tail[0][:300]}" if tail else "")}
        if (folder / _ICL_RUNS).is_file():  # ICL runs that finished before the stop
            result["icl_runs"] = [json.loads(line) for line in (folder / _ICL_RUNS).read_text().splitlines()]
            result["error"] += f" ({len(result['icl_runs'])} ICL runs finished: {folder / _ICL_RUNS})"
    result.setdefault("method", spec.get("label"))
    return result


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table (a failed entry shows its error in its row)."""
    head = ("| method | trainable params | % | peak RSS (GB) | train (s) | target tok/s | BLEU | NIST | METEOR "
            "| ROUGE-L | CIDEr | probe loss (Δ) | probe ROUGE-L | prompt tok |")
    lines = [head, "|" + "---|" * 14]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['method']} | failed: {str(r['error']).replace('|', '/')[:200]} |"
                         + " |" * 12)
            continue
        params = r.get("trainable_params")
        probe = "-" if r.get("probe_loss") is None else (
            f"{r['probe_loss']:.3f} ({r.get('probe_loss_increase', 0.0):+.3f})")
        bleu = _fmt(r.get("BLEU"))
        if r.get("spread"):  # ICL: mean ± std (min-max) over draws and orders
            s = r["spread"]["BLEU"]
            bleu = f"{s['mean']:.4f} ± {s['std']:.4f} ({s['min']:.3f}-{s['max']:.3f})"
        lines.append(
            f"| {r['method']} | {params:,} | {_fmt(r.get('trainable_pct'), 3)} | {_fmt(r.get('peak_rss_gb'), 2)} "
            f"| {_fmt(r.get('train_s'), 0)} | {_fmt(r.get('target_tok_s'), 0)} | {bleu} | {_fmt(r.get('NIST'), 2)} "
            f"| {_fmt(r.get('METEOR'), 3)} | {_fmt(r.get('ROUGE_L'), 3)} | {_fmt(r.get('CIDEr'), 2)} | {probe} "
            f"| {_fmt(r.get('probe_rouge_l'), 3)} | {_fmt(r.get('prompt_tokens'), 0)} |"
        )
    return "\n".join(lines)


def _write_csv(results: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({k: r.get(k, "") for k in CSV_COLUMNS})


def plot_bleu_vs_params(results: Sequence[dict[str, Any]], path: Path, title: str = "") -> bool:
    """BLEU against trainable parameters (log x); ICL (0 parameters) as a horizontal band. False if nothing to plot."""
    ok = [r for r in results if not r.get("error") and r.get("BLEU") is not None]
    if not ok:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    trained = [r for r in ok if r.get("trainable_params")]
    labelled: dict[int, int] = {}  # entries with the same parameter count get their labels stacked downwards
    for r in sorted(trained, key=lambda r: -r["BLEU"]):
        k = labelled[r["trainable_params"]] = labelled.get(r["trainable_params"], -1) + 1
        ax.scatter(r["trainable_params"], r["BLEU"], s=30, zorder=3)
        ax.annotate(r["method"], (r["trainable_params"], r["BLEU"]), textcoords="offset points",
                    xytext=(4, 4 - 10 * k), fontsize=8)
    for r in ok:
        if r.get("trainable_params"):
            continue
        s = r.get("spread", {}).get("BLEU")
        ax.axhline(r["BLEU"], ls="--", lw=1, color="gray")
        if s:
            ax.axhspan(s["min"], s["max"], color="gray", alpha=0.15)
        ax.annotate(f"{r['method']} (no training)", (1, r["BLEU"]), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)  # differences on an honest scale
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("BLEU")
    ax.grid(alpha=0.3, which="both")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _preset_entries(known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each registry preset as an entry: its method's entry in `known` over the preset's base format."""
    from peftkit.core.registry import list_presets, resolve_method

    presets = {}
    for name in list_presets():
        spec, preset = resolve_method(name)
        assert preset is not None  # a preset's name resolves to its preset
        base = {"quantize": preset.quant, "double_quant": preset.double_quant} if preset.quant else {}
        presets[name] = {**known.get(spec.name, {"method": spec.name}), **base}
    return presets


def check_entries(
    methods: Sequence[str],
    entries: dict[str, dict[str, Any]] | None = None,
    replay_data: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Check `methods` before anything is written: all entries known, general data for the mitigations.

    Returns:
        The entries (one per registered method, :data:`DEFAULT_ENTRIES`, one per preset, then `entries` on top)
        and the methods that need `replay_data`.

    Raises:
        PeftkitError: an unknown entry, an entry whose method or method settings the registry refuses, or a
            mitigation without (existing) replay data.
    """
    from peftkit.core.registry import get_method, list_methods

    registered = list_methods()
    known = {**{m: {"method": m} for m in registered}, **DEFAULT_ENTRIES}
    entries = {**known, **_preset_entries(known), **(entries or {})}
    unknown = [m for m in methods if m not in entries]
    if unknown:
        raise PeftkitError(f"unknown compare entries {unknown}; known: {', '.join(entries)}")
    for label in methods:
        method = entries[label].get("method", "lora")
        if label in registered and method != label:
            raise PeftkitError(f"compare entry {label!r} is a method's name but trains {method!r}; rename it")
        if method != "icl":
            get_method(method).config_cls.from_dict(entries[label].get("method_config", {}),
                                                    where=f"compare entry {label!r}: ")
    mitigations = [m for m in methods if entries[m].get("replay_fraction") or entries[m].get("ewc_lambda")]
    if mitigations and not (replay_data or (overrides or {}).get("replay_data")):
        raise PeftkitError(f"{', '.join(mitigations)} need general instruction data: pass --replay-data FILE")
    if mitigations and replay_data and not Path(replay_data).is_file():
        raise PeftkitError(f"replay data {replay_data} does not exist")
    return entries, mitigations


def run_compare(
    task: CompareTask,
    methods: Sequence[str] = DEFAULT_METHODS,
    model: str = "smollm2-135m-instruct",
    out_dir: str | Path = "runs/compare",
    overrides: dict[str, Any] | None = None,
    entries: dict[str, dict[str, Any]] | None = None,
    replay_data: str | None = None,
    probe: bool = True,
    metrics: str = "all",
    max_new_tokens: int = 64,
    probe_new_tokens: int = 48,
    eval_batch_size: int = 16,
    timeout: float | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every method in `methods` (names of `entries`, default :data:`DEFAULT_ENTRIES`) in its own process.

    Args:
        overrides: ``TrainConfig`` keys applied to every entry on top of :data:`COMMON_SETTINGS` (an entry's own
            keys still win for ``method``, ``method_config``, ``lr``, ``quantize``).
        replay_data: general instruction data for the entries that use replay or EWC (``full+replay``,
            ``full+ewc``).
        probe: measure forgetting on the shipped general probe (one extra process builds the base answers).
        metrics: ``"all"`` (the five E2E metrics; needs Java) or ``"bleu-nist"``.
        timeout: seconds per entry (None = no limit).
        log: where the run's lines go, an entry's progress included (default: printed and flushed).

    Returns:
        One result dict per method, in order; a failed entry has ``error`` set. The files ``results.csv``,
        ``results.md``, ``results.json`` and ``bleu_vs_params.png`` are written to `out_dir` after every entry.
    """
    entries, mitigations = check_entries(methods, entries, replay_data, overrides)
    log = log or _say
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task_path = out / "task.json"
    task.save(task_path)
    common = {**COMMON_SETTINGS, **(overrides or {})}
    base_spec = {"model": model, "task": str(task_path), "common": common, "metrics": metrics,
                 "max_new_tokens": max_new_tokens, "probe_new_tokens": probe_new_tokens,
                 "eval_batch_size": eval_batch_size}
    t0 = time.perf_counter()
    if probe:
        base_spec["probe"] = _probe_file(base_spec, out, timeout, log)
    results: list[dict[str, Any]] = []
    for i, name in enumerate(methods, 1):
        entry = dict(entries[name])
        if name in mitigations and replay_data:
            entry.setdefault("replay_data", str(Path(replay_data).resolve()))
        log(f"[{i}/{len(methods)}] {name}: {_settings_text(entry)} (elapsed {time.perf_counter() - t0:.0f} s)")
        spec = {**base_spec, "label": name, "entry": entry, "output_dir": str(out / name / "train")}
        results.append(_run_logged(spec, out / name, timeout, log, f"[{i}/{len(methods)}] "))
        _write_outputs(results, out, task.description)
    log(f"done in {time.perf_counter() - t0:.0f} s: {out / 'results.md'}")
    return results


def _probe_file(base_spec: dict[str, Any], out: Path, timeout: float | None,
                log: Callable[[str], None]) -> str | None:
    """The base model's probe (built in its own process unless `out` holds it), None if building it failed."""
    probe_path = out / "probe.json"
    if not probe_path.is_file():
        log(f"[probe] base model's answers to the general probe questions -> {probe_path}")
        got = _spawn({**base_spec, "kind": "probe", "label": "probe", "probe": str(probe_path)}, out / "_probe",
                     timeout)
        if got.get("error"):
            log(f"[probe] failed ({got['error']}); continuing without the forgetting columns")
        else:
            log(f"[probe] base loss {got['probe_loss']:.4f} on {got['prompts']} prompts")
    return str(probe_path) if probe_path.is_file() else None


def _run_logged(spec: dict[str, Any], folder: Path, timeout: float | None, log: Callable[[str], None],
                prefix: str) -> dict[str, Any]:
    """One entry in its own process, with a line (after `prefix`) on how it went."""
    name, t = spec["label"], time.perf_counter()
    result = _spawn(spec, folder, timeout, relay=log)
    if result.get("error"):
        log(f"{prefix}{name}: FAILED after {time.perf_counter() - t:.0f} s: {result['error']} "
            f"(log: {folder / 'log.txt'})")
    else:
        log(f"{prefix}{name}: BLEU {result.get('BLEU', float('nan')):.4f}, "
            f"{result.get('trainable_params', 0):,} trainable, peak RSS {result.get('peak_rss_gb', 0):.2f} GB, "
            f"{time.perf_counter() - t:.0f} s")
    return result


def _write_outputs(results: Sequence[dict[str, Any]], out: Path, description: str) -> None:
    slim = [{k: v for k, v in r.items() if k not in ("predictions", "probe_answers")} for r in results]
    (out / "results.json").write_text(json.dumps(slim, indent=1))
    _write_csv(results, out / "results.csv")
    (out / "results.md").write_text(f"{description}\n\n{markdown_table(results)}\n")
    plot_bleu_vs_params(results, out / "bleu_vs_params.png", description)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        sys.exit(_worker(sys.argv[2:]))
    sys.exit("usage: python -m peftkit.eval.compare worker SPEC.json RESULT.json (use `peftkit compare`)")
