"""`peftkit compare` end to end on a tiny model: two methods and ICL run, a crashing method is reported in its row."""

from __future__ import annotations

import csv
import json
import sys
import time

import pytest
from conftest import tiny_llama, tiny_tokenizer

from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.eval.compare import (
    DEFAULT_ENTRIES,
    CompareTask,
    TrainingProgress,
    check_entries,
    file_task,
    markdown_table,
    run_compare,
)
from peftkit.train.events import StepEvent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_task(folder):
    train = [{"instruction": f"Repeat {i % 5}", "output": f"{i % 5} {i % 5}"} for i in range(40)]
    test = [{"instruction": f"Repeat {i}", "output": f"{i} {i}", "references": [f"{i} {i}", f"{i}{i}"]}
            for i in range(5, 9)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train))
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r) for r in test))
    return str(folder / "train.jsonl"), str(folder / "test.jsonl")


def test_file_task_reads_references(tmp_path):
    train, test = write_task(tmp_path)
    task = file_task(train, test)
    assert task.prompts[0] == "Repeat 5" and task.references[0] == ["5 5", "55"]
    task.save(tmp_path / "t.json")
    assert CompareTask.load(tmp_path / "t.json") == task


def test_compare_runs_methods_and_reports_a_crash(tmp_path, tiny_dir):
    train, test = write_task(tmp_path)
    entries = {"broken": {"method": "lora", "method_config": {"target_modules": ["no_such_layer"]}},
               "icl2": {"method": "icl", "k": 2, "draws": 2, "orders": 2}}
    lines: list[str] = []
    running: list[bool] = []  # for each relayed lora progress line: was the entry still running?

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("    lora: step "):
            running.append(not (tmp_path / "out" / "lora" / "result.json").exists())

    results = run_compare(file_task(train, test), ["lora", "broken", "icl2", "norms"], model=str(tiny_dir),
                          out_dir=tmp_path / "out", entries=entries, metrics="bleu-nist", max_new_tokens=6,
                          probe_new_tokens=4, overrides={"precision": "fp32", "batch_size": 2, "max_length": 64},
                          log=log)
    by = {r["method"]: r for r in results}
    assert [r["method"] for r in results] == ["lora", "broken", "icl2", "norms"]
    assert "no_such_layer" in by["broken"]["error"] and "error" not in by["lora"]
    lora = by["lora"]
    assert lora["trainable_params"] > 0 and 0 < lora["trainable_pct"] < 100
    assert lora["trainable_pct"] == pytest.approx(100 * lora["trainable_params"] / lora["base_params"])
    assert lora["peak_rss_gb"] > 0.1 and lora["train_s"] > 0 and lora["target_tok_s"] > 0
    assert {"BLEU", "NIST", "probe_loss", "probe_loss_increase", "probe_rouge_l"} <= set(lora)
    assert len(lora["predictions"]) == 4
    icl = by["icl2"]
    assert icl["trainable_params"] == 0 and len(icl["icl_runs"]) == 4 and icl["probe_loss_increase"] == 0.0
    assert icl["prompt_tokens"] > icl["zero_shot_prompt_tokens"] == lora["prompt_tokens"]
    assert icl["BLEU"] == pytest.approx(sum(r["BLEU"] for r in icl["icl_runs"]) / 4)
    saved = [json.loads(line) for line in (tmp_path / "out" / "icl2" / "icl_runs.jsonl").read_text().splitlines()]
    assert saved == icl["icl_runs"]  # saved as they finish: a stopped ICL evaluation keeps its runs
    assert "error" not in by["norms"] and 0 < by["norms"]["trainable_params"] < lora["trainable_params"]

    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["lora", "broken", "icl2", "norms"]
    assert "no_such_layer" in rows[1]["error"] and rows[0]["error"] == ""
    assert float(rows[0]["BLEU"]) == pytest.approx(lora["BLEU"], abs=1e-4)  # the CSV holds the run's score
    md = (out / "results.md").read_text()
    assert "| broken | failed: " in md and "± " in md  # the crash in its row, the ICL spread in the BLEU cell
    assert (out / "bleu_vs_params.png").stat().st_size > 5000
    assert any("FAILED" in line and "broken" in line for line in lines)
    assert any(line.startswith("[4/4] norms") for line in lines)
    # the entry's own lines, relayed as they come: its progress while it trains (first and last step at least)
    steps = lora["steps"]
    progress = [line for line in lines if line.startswith("    lora: step ")]
    assert progress[0].startswith("    lora: step 1/") and progress[-1].startswith(f"    lora: step {steps}/{steps}, ")
    assert all(", loss " in line and ", ETA " in line for line in progress) and running and all(running)
    assert any(line.startswith("    icl2: icl k=2 draw ") for line in lines)


def test_training_progress_prints_first_last_and_every_few_seconds():
    now = [0.0]
    said: list[str] = []
    progress = TrainingProgress("lora", 20, every_s=10.0, clock=lambda: now[0], say=said.append)
    for step in range(1, 21):
        now[0] = 5.0 * step  # 5 s a step
        progress(StepEvent(step=step, total_steps=20, loss=1.0 / step, lr=1e-3, grad_norm=1.0,
                           target_tokens_per_s=1.0, epoch=0))
    assert [line.split(",")[0] for line in said] == ["lora: step 1/20", "lora: step 3/20", "lora: step 5/20",
                                                     "lora: step 7/20", "lora: step 9/20", "lora: step 11/20",
                                                     "lora: step 13/20", "lora: step 15/20", "lora: step 17/20",
                                                     "lora: step 19/20", "lora: step 20/20"]
    assert said[0] == "lora: step 1/20, loss 1.0000, 5 s elapsed, ETA 1m35s"  # 19 steps left at 5 s each
    assert said[-1] == "lora: step 20/20, loss 0.0500, 1m40s elapsed, ETA 0 s"


def test_markdown_row_for_a_failure_keeps_the_columns():
    table = markdown_table([{"method": "x", "error": "RuntimeError: a | b"}])
    row = table.splitlines()[-1]
    assert row.count("|") == table.splitlines()[0].count("|") and "a / b" in row


def test_unknown_entry_is_an_error(tmp_path):
    with pytest.raises(PeftkitError, match="unknown compare entries"):
        run_compare(CompareTask("x", [], []), ["nope"], out_dir=tmp_path)


def test_entries_speak_the_registry():
    """Every registered method is an entry by its name; the short names are aliases of registered methods."""
    from peftkit.core.registry import get_method, list_methods, resolve_method

    entries, _ = check_entries(list_methods())
    assert all(entries[m]["method"] == m for m in list_methods())
    for entry in DEFAULT_ENTRIES.values():
        if entry["method"] != "icl":
            get_method(entry["method"])  # raises for a name the registry does not know
    variants = ["dora", "ia3", "lora+", "pissa", "olora"]  # issue 29's methods, each with its own settings
    entries, _ = check_entries(variants)
    assert [entries[v]["method"] for v in variants] == ["dora", "ia3", "lora", "lora", "lora"]
    assert entries["lora+"]["method_config"]["loraplus_lr_ratio"] == 16.0
    _, qlora = resolve_method("qlora")  # a preset is its method's entry over the preset's base
    assert qlora is not None and qlora.quant == "nf4"
    assert entries["qlora"] == {**entries["lora"], "quantize": qlora.quant, "double_quant": qlora.double_quant}
    with pytest.raises(PeftkitError, match="compare entry 'mine': unknown key 'rank' for LoRAConfig"):
        check_entries(["mine"], {"mine": {"method": "lora", "method_config": {"rank": 4}}})
    with pytest.raises(PeftkitError, match="unknown method 'lorra'; did you mean lora"):
        check_entries(["mine"], {"mine": {"method": "lorra"}})
    with pytest.raises(PeftkitError, match="'sparse' is a method's name but trains 'lora'"):
        check_entries(["sparse"], {"sparse": {"method": "lora"}})


def test_forgetting_mitigations_need_replay_data(tmp_path):
    with pytest.raises(PeftkitError, match="full\\+replay, full\\+ewc need general instruction data"):
        run_compare(CompareTask("x", [], []), ["lora", "full+replay", "full+ewc"], out_dir=tmp_path)
    with pytest.raises(PeftkitError, match="does not exist"):
        run_compare(CompareTask("x", [], []), ["full+ewc"], out_dir=tmp_path, replay_data=str(tmp_path / "none.json"))


def test_forgetting_mitigations_run_with_replay_data(tmp_path, tiny_dir):
    train, test = write_task(tmp_path)
    general = tmp_path / "general.jsonl"
    general.write_text("\n".join(json.dumps({"instruction": f"Count to {i}", "output": " ".join("1" * i)})
                                 for i in range(1, 9)))
    results = run_compare(file_task(train, test), ["full+replay", "full+ewc"], model=str(tiny_dir),
                          out_dir=tmp_path / "out", metrics="bleu-nist", max_new_tokens=6, probe_new_tokens=4,
                          overrides={"precision": "fp32", "batch_size": 2, "max_length": 64},
                          replay_data=str(general))
    assert [r.get("error") for r in results] == [None, None]
    assert all("probe_loss_increase" in r and r["trainable_params"] > 0 for r in results)
    assert "replay_fraction=0.25" in results[0]["settings"] and "ewc_lambda" in results[1]["settings"]
    log = (tmp_path / "out" / "full+ewc" / "train" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["ewc_penalty"] > 0  # the penalty was on


def test_cli_compare(tmp_path, tiny_dir, capsys):
    train, test = write_task(tmp_path)
    code = main(["compare", "--data", train, "--eval-data", test, "--methods", "lora", "--model", str(tiny_dir),
                 "--out", str(tmp_path / "cli"), "--no-probe", "--metrics", "bleu-nist", "--max-new-tokens", "4",
                 "precision=fp32", "batch_size=2", "max_length=64"])
    assert code == 0
    assert "results.md" in capsys.readouterr().out
    assert (tmp_path / "cli" / "results.csv").is_file()


@pytest.mark.parametrize("methods, extra, error", [
    ("lora,nosuch", [], "unknown compare entries"),
    ("full+ewc", [], "need general instruction data"),
    ("full+replay", ["--replay-data", "missing.json"], "does not exist"),
])
def test_cli_compare_bad_entries_write_nothing(tmp_path, methods, extra, error, capsys):
    """Bad entries are refused before the task files (the E2E split) are written."""
    assert main(["compare", "--task", "e2e", "--methods", methods, *extra, "--out", str(tmp_path / "out")]) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_worker_past_its_timeout_is_killed_after_its_lines_were_relayed(tmp_path):
    from peftkit.eval.compare import _run_worker

    relayed: list[str] = []
    script = "import time\nprint('lora: step 1/9', flush=True)\nprint('noise')\ntime.sleep(60)"
    start = time.perf_counter()
    code = _run_worker([sys.executable, "-c", script], tmp_path / "log.txt", 1.0, "lora: ", relayed.append)
    assert code is None and time.perf_counter() - start < 30  # None: timed out
    assert relayed == ["    lora: step 1/9"] and (tmp_path / "log.txt").read_text() == "lora: step 1/9\nnoise\n"
    assert _run_worker([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log.txt", 30.0, "x: ", None) == 3
