"""Evaluation during training (eval loss + generation metrics, best checkpoint) and experiment trackers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer
from safetensors.torch import load_file
from test_train import make_cfg, run, sharp_llama

from peftkit.errors import PeftkitError
from peftkit.generation import generate
from peftkit.train import Trainer
from peftkit.train.evaluation import resolve_metric

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def log_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_generation_metric_equals_generating_by_hand(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=2, eval_fraction=0.25, eval_every=2, eval_metric="exact_match",
                   eval_samples=5, eval_max_new_tokens=6)
    trainer, _ = run(cfg)
    convs = trainer.data.eval_conversations[:5]
    answers = generate(trainer.model, trainer.tokenizer, [c[:-1] for c in convs], max_new_tokens=6)
    by_hand = sum(a.strip() == c[-1]["content"].strip() for a, c in zip(answers, convs, strict=True)) / 5
    assert trainer.evaluate_generation() == {"eval_exact_match": by_hand}
    logged = log_rows(tmp_path / "run")[-1]
    assert logged["eval_exact_match"] == by_hand and logged["eval_loss"] is not None


def test_user_metric_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_metric.py").write_text(
        "def lengths(predictions, references):\n"
        "    return sum(len(p) for p in predictions) / len(predictions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = make_cfg(tmp_path, max_steps=2, eval_fraction=0.25, eval_every=1, eval_metric="my_metric:lengths",
                   eval_samples=4, eval_max_new_tokens=5)
    trainer, _ = run(cfg)
    rows = log_rows(tmp_path / "run")
    assert all("eval_lengths" in r for r in rows)
    answers = generate(trainer.model, trainer.tokenizer, [c[:-1] for c in trainer.data.eval_conversations[:4]],
                       max_new_tokens=5)
    assert rows[-1]["eval_lengths"] == pytest.approx(sum(len(a) for a in answers) / 4)


def test_save_best_keeps_the_adapter_of_the_best_evaluation(tmp_path):
    # with this seed and lr the eval loss is lowest at step 7 of 8: the best adapter is not the final one
    cfg = make_cfg(tmp_path, max_steps=8, eval_fraction=0.25, eval_every=1, save_best="eval_loss", save_every=1,
                   keep_checkpoints=10, lr=1e-2, scheduler="constant")
    run(cfg)
    out = tmp_path / "run"
    rows = log_rows(out)
    best_row = min(rows, key=lambda r: r["eval_loss"])
    assert best_row["step"] < rows[-1]["step"], "the setting no longer exercises an earlier best step"
    best = json.loads((out / "best.json").read_text())
    assert best == {"metric": "eval_loss", "value": best_row["eval_loss"], "step": best_row["step"]}
    saved = load_file(out / "best" / "adapter_model.safetensors")
    at_step = load_file(out / f"checkpoint-{best['step']}" / "trainable.safetensors")
    assert sorted(t.sum().item() for t in saved.values()) == pytest.approx(
        sorted(t.sum().item() for t in at_step.values()), rel=1e-6)


def test_best_survives_a_resume(tmp_path):
    kw = dict(max_steps=6, eval_fraction=0.25, eval_every=1, save_best="eval_loss", save_every=1, lr=3e-2,
              scheduler="constant")
    run(make_cfg(tmp_path / "full", **kw))
    cfg = make_cfg(tmp_path / "cut", **kw)
    run(cfg, until=4)
    run(cfg, resume=True)
    full, cut = (json.loads((tmp_path / d / "run" / "best.json").read_text()) for d in ("full", "cut"))
    assert cut == full


@pytest.mark.parametrize("overrides, message", [
    ({"report_to": "tensorbored"}, "unknown tracker 'tensorbored'"),
    ({"report_to": ["none", "tensorboard"]}, "'none' cannot be combined"),
    ({"eval_metric": "exact_match"}, "eval_metric needs held-out data"),
    ({"eval_metric": "bleu_score", "eval_fraction": 0.2}, "unknown metric 'bleu_score'"),
    ({"eval_metric": "no_such_module:f", "eval_fraction": 0.2}, "cannot import 'no_such_module'"),
    ({"eval_metric": "json:no_such_function", "eval_fraction": 0.2}, "'json' has no function"),
    ({"save_best": "eval_loss", "eval_fraction": 0.2}, "save_best needs eval_every"),
    ({"save_best": "exact_match", "eval_fraction": 0.2, "eval_every": 1}, "needs eval_metric"),
    ({"save_best": "bleu", "eval_metric": "orders", "eval_fraction": 0.2, "eval_every": 1},
     "gives exact_match, field_accuracy, valid_json"),
])
def test_bad_eval_and_tracking_settings_are_refused_before_loading(tmp_path, overrides, message):
    with pytest.raises(PeftkitError, match=message):
        make_cfg(tmp_path, **overrides)


def test_a_missing_tracker_package_names_the_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(PeftkitError, match="wandb needs the 'wandb' package: pip install wandb"):
        make_cfg(tmp_path, report_to=["wandb"])


def test_user_metric_returning_text_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "bad_metric.py").write_text("def f(predictions, references):\n    return 'great'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PeftkitError, match="returned str, expected a number"):
        resolve_metric("bad_metric:f")(["a"], ["a"])


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard not installed")
def test_tensorboard_log_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(tmp_path, max_steps=4, eval_fraction=0.25, eval_every=2, eval_metric="exact_match",
                   eval_samples=4, eval_max_new_tokens=4, report_to="tensorboard")
    trainer = Trainer(cfg, model=sharp_llama(), tokenizer=tiny_tokenizer())
    trainer.run()
    out = tmp_path / "run"
    rows = log_rows(out)
    [events] = {p.parent for p in (out / "logs").rglob("events.out.tfevents.*") if p.parent.name == "run"}
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    for name in ("eval_loss", "eval_exact_match", "lr", "grad_norm", "target_tokens_per_s", "mfu"):
        assert [e.step for e in acc.Scalars(name)] == [r["step"] for r in rows if name in r], name
    assert "loss_curve" in tags["images"]
    assert any("final/eval_loss" in t for t in tags["scalars"])
    [hparams] = (out / "logs").rglob("hparams.yml")  # the configuration, as Accelerate stores it
    assert "lr: 0.003" in hparams.read_text() and "method_config.r: 4" in hparams.read_text()


def test_tracking_files_belong_to_the_run(tmp_path):
    if not HAS_TENSORBOARD:
        pytest.skip("tensorboard not installed")
    cfg = make_cfg(tmp_path, max_steps=1, report_to="tensorboard")
    run(cfg)
    logs = tmp_path / "run" / "logs"
    first = sorted(p.name for p in logs.rglob("*") if p.is_file())
    with pytest.raises(PeftkitError, match="already holds a run"):
        run(cfg)
    Trainer(cfg, model=sharp_llama(), tokenizer=tiny_tokenizer(), overwrite=True).run()
    second = sorted(p.name for p in logs.rglob("*") if p.is_file())
    assert len(second) == len(first) and second != first  # the old run's event files are gone, not added to
    assert torch.isfinite(torch.tensor([r["loss"] for r in log_rows(tmp_path / "run")])).all()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_writes_an_offline_run_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(tmp_path, max_steps=2, report_to="wandb")
    run(cfg)
    [run_dir] = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("*.wandb")), "no offline run file"


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")
def test_mlflow_logs_metrics_to_a_file_store_in_the_run_folder(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    cfg = make_cfg(tmp_path, max_steps=3, report_to="mlflow")
    try:
        run(cfg)
        assert mlflow.get_tracking_uri() == previous  # the process's own setting is put back
        store = tmp_path / "run" / "mlruns"
        client = mlflow.tracking.MlflowClient(store.resolve().as_uri())
        [experiment] = [e for e in client.search_experiments() if e.name == "run"]
        [logged] = client.search_runs([experiment.experiment_id])
        history = [m.value for m in client.get_metric_history(logged.info.run_id, "loss")]
        assert history == pytest.approx([r["loss"] for r in log_rows(tmp_path / "run")], rel=1e-6)
        assert logged.data.params["method"] == "lora"
        assert read_back_as_the_readme_says(store) == len(history)
    finally:
        mlflow.set_tracking_uri(previous)


def read_back_as_the_readme_says(store) -> int:
    """Read the store in a fresh process (no variable of the training process) with the environment the README's
    `mlflow ui` line sets; return how many loss points the run has."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [(name, value, uri)] = re.findall(r"^(\w+)=(\S+) mlflow ui --backend-store-uri (\S+)", readme, re.MULTILINE)
    assert uri.endswith("/mlruns") and "pip install mlflow\n" in readme  # the store each run writes; the UI's install
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {name: value}
    script = ("import sys, mlflow; mlflow.set_tracking_uri(sys.argv[1]); "
              "runs = mlflow.search_runs(search_all_experiments=True, output_format='list'); "
              "print(len(mlflow.tracking.MlflowClient().get_metric_history(runs[0].info.run_id, 'loss')))")
    done = subprocess.run([sys.executable, "-c", script, str(store)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_metrics_of_the_layers_above_train_come_through_the_registry():
    """Training imports neither eval nor the demo: their metrics register themselves (importing peftkit does it),
    and a name registered twice is refused rather than silently replaced."""
    from peftkit.eval.metrics import bleu, rouge_l
    from peftkit.train.evaluation import METRICS, register_metric

    predictions, references = ["the cat sat on the mat", "a dog"], ["the cat sat on a mat", "the dog barked"]
    assert resolve_metric("bleu")(predictions, references) == {"bleu": bleu(predictions, [[r] for r in references])}
    assert resolve_metric("rouge_l")(predictions, references) == {
        "rouge_l": rouge_l(predictions, [[r] for r in references])}
    assert {"exact_match", "bleu", "rouge_l", "orders"} <= set(METRICS)
    with pytest.raises(RuntimeError, match="'bleu' registered twice"):
        register_metric("bleu", lambda p, r: {}, ("bleu",))
