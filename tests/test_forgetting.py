"""Forgetting: probe loss and agreement, and the two trainer mitigations (replay, EWC) on a toy case."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from peftkit.data.sequences import IGNORE
from peftkit.errors import PeftkitError
from peftkit.eval.forgetting import (
    Probe,
    answer_agreement,
    build_probe,
    load_probe_prompts,
    measure_forgetting,
    probe_loss,
)
from peftkit.train import TrainConfig, Trainer
from peftkit.train.ewc import EWCAnchor, diagonal_fisher
from peftkit.train.pipeline import replay_rows_per_batch

# The toy: a tiny model first "pre-trained" on general data G (reverse a word), so that it answers G's prompts
# confidently; the probe is its own greedy answers to them. Fine-tuning on task A (repeat a digit) then moves it.
GENERAL = [{"instruction": f"Reverse {w}", "output": w[::-1]} for w in ("abc", "hello", "xyz", "tree", "moon")]


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def task_rows(n=48):
    return [{"instruction": f"Repeat {i % 7} twice", "output": f"{i % 7}{i % 7}"} for i in range(n)]


def _train_cfg(tmp_path, name, data, **kw):
    return TrainConfig.from_dict({"data": data, "output_dir": str(tmp_path / name), "precision": "fp32",
                                  "batch_size": 4, "lr": 1e-2, "method": "full", "max_length": 64,
                                  "progress": False, "packing": False, "warmup_ratio": 0.0, **kw})


@pytest.fixture(scope="module")
def base_state(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    model = tiny_llama()
    cfg = _train_cfg(tmp, "pre", write_rows(tmp / "g.jsonl", GENERAL * 4), epochs=30.0, lr=1e-2)
    Trainer(cfg, model=model, tokenizer=tiny_tokenizer()).run()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_model(state):
    model = tiny_llama()
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def probe(base_state):
    return build_probe(base_model(base_state), tiny_tokenizer(), [r["instruction"] for r in GENERAL],
                       max_new_tokens=8)


def train(tmp_path, state, name, **kw):
    model = base_model(state)
    data = write_rows(tmp_path / "task.jsonl", task_rows())
    cfg = _train_cfg(tmp_path, name, data, **{"epochs": 3.0, "lr": 2e-3, **kw})
    trainer = Trainer(cfg, model=model, tokenizer=tiny_tokenizer())
    trainer.run()
    return trainer


def general_rows(probe: Probe):
    return [{"instruction": p, "output": a} for p, a in zip(probe.prompts, probe.answers, strict=True)]


def test_shipped_probe_has_50_distinct_questions():
    prompts = load_probe_prompts()
    assert len(prompts) == 50 and len(set(prompts)) == 50 and all(p.strip() for p in prompts)


def test_probe_loss_is_the_mean_ce_of_the_answer_tokens():
    from peftkit.data.sequences import collate, tokenize_conversations

    model, tok = tiny_llama(), tiny_tokenizer()
    prompts, answers = ["ab", "cde"], ["xy", "z"]
    ex = tokenize_conversations(tok, [[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
                                      for p, a in zip(prompts, answers, strict=True)], 64)
    total, count = 0.0, 0
    for e, a in zip(ex, answers, strict=True):
        batch = collate([[e]], tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
        labels = batch["labels"][0, 1:]
        keep = labels.ne(IGNORE)
        keep[keep.nonzero()[len(tok(a)["input_ids"]):, 0]] = False  # the answer text only, not the end of turn
        total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    assert probe_loss(model, tok, prompts, answers, batch_size=1) == pytest.approx(total / count, rel=1e-5)


def test_agreement():
    assert answer_agreement(["The cat sat."], ["the cat sat."]) == {"rouge_l": 1.0, "exact": 0.0}
    got = answer_agreement(["a b c d", "x"], ["a b c d", "y"])
    assert got["exact"] == 0.5 and got["rouge_l"] == pytest.approx(0.5)
    # LCS 2 of 3 and 2 of 4: F_1.2 = (1 + 1.44) P R / (R + 1.44 P)
    p, r = 2 / 3, 2 / 4
    assert answer_agreement(["a c d"], ["a b c e"])["rouge_l"] == pytest.approx(2.44 * p * r / (r + 1.44 * p))
    with pytest.raises(ValueError):
        answer_agreement(["a"], [])


def test_untouched_model_has_not_forgotten(probe, base_state):
    assert probe.answers == [r["output"] for r in GENERAL]  # pre-training worked: it answers G as taught
    assert probe.base_loss < 0.1
    report = measure_forgetting(base_model(base_state), tiny_tokenizer(), probe, max_new_tokens=8)
    assert report.loss_after == pytest.approx(probe.base_loss, rel=1e-5)
    assert report.rouge_l == 1.0 and report.exact == 1.0


def test_fine_tuning_on_a_task_raises_the_probe_loss_and_ewc_limits_it(tmp_path, probe, base_state):
    tok = tiny_tokenizer()
    plain = train(tmp_path, base_state, "plain")
    forgot = measure_forgetting(plain.model, tok, probe, max_new_tokens=8)
    assert forgot.loss_after > probe.base_loss + 0.3  # the toy model forgot its own answers

    general = write_rows(tmp_path / "general.jsonl", general_rows(probe))
    ewc = train(tmp_path, base_state, "ewc", replay_data=general, ewc_lambda=100.0, ewc_batches=2)
    kept = measure_forgetting(ewc.model, tok, probe, max_new_tokens=8)
    assert kept.loss_increase < 0.5 * forgot.loss_increase
    log = [json.loads(line) for line in (tmp_path / "ewc" / "metrics.jsonl").read_text().splitlines()]
    assert all("ewc_penalty" in r for r in log) and log[0]["ewc_penalty"] == 0.0 and log[-1]["ewc_penalty"] > 0

    replay = train(tmp_path, base_state, "replay", replay_data=general, replay_fraction=0.5)
    mixed = measure_forgetting(replay.model, tok, probe, max_new_tokens=8)
    assert mixed.loss_increase < forgot.loss_increase


def test_replay_batches_contain_the_replay_examples(tmp_path, probe):
    model, tok = tiny_llama(), tiny_tokenizer()
    general = general_rows(probe)
    cfg = TrainConfig.from_dict({"data": write_rows(tmp_path / "task.jsonl", task_rows()),
                                 "replay_data": write_rows(tmp_path / "general.jsonl", general),
                                 "replay_fraction": 0.2, "output_dir": str(tmp_path / "r"), "precision": "fp32",
                                 "batch_size": 8, "max_length": 64, "packing": False, "progress": False})
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    assert trainer.data.replay_per_batch == 2 == replay_rows_per_batch(8, 0.2)
    replay_ids = {tuple(row[0].input_ids) for row in trainer.data.replay_rows}
    task_ids = {tuple(row[0].input_ids) for row in trainer.data.rows}
    seen_replay = set()
    for batch in trainer.data.micro_batches(0, 0):
        rows = [tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"],
                                                            strict=True)]
        assert len(rows) == 10
        assert sum(r in task_ids for r in rows) == 8 and sum(r in replay_ids for r in rows) == 2
        seen_replay |= {r for r in rows if r in replay_ids}
    assert seen_replay == replay_ids  # cycling through all the replay examples
    # consecutive micro-batches take the next replay rows: within one pass over them, none repeats
    first_pass = [tuple(row[0].input_ids) for m in range(len(replay_ids) // 2) for row in trainer.data.replay_for(m)]
    assert len(first_pass) == 2 * (len(replay_ids) // 2) > 2 and len(set(first_pass)) == len(first_pass)
    # resume-safe: a fresh run started at micro-batch 3 gets the uninterrupted run's batch 3, replay rows included
    uninterrupted = list(trainer.data.micro_batches(0, 0))
    again = Trainer(cfg.replace(output_dir=str(tmp_path / "r2")), model=tiny_llama(), tokenizer=tok)
    resumed = next(again.data.micro_batches(0, 3))
    assert resumed.keys() == uninterrupted[3].keys()
    assert all(torch.equal(resumed[k], uninterrupted[3][k]) for k in resumed)
    assert not torch.equal(uninterrupted[3]["input_ids"], uninterrupted[4]["input_ids"])


def test_replay_rows_per_batch_and_validation(tmp_path):
    assert [replay_rows_per_batch(8, f) for f in (0.0, 0.01, 0.2, 0.25, 0.5)] == [0, 1, 2, 3, 8]
    with pytest.raises(PeftkitError, match="replay_data"):
        TrainConfig.from_dict({"replay_fraction": 0.3})
    with pytest.raises(PeftkitError, match="replay_fraction"):
        TrainConfig.from_dict({"replay_data": "x.json", "replay_fraction": 1.0})
    with pytest.raises(PeftkitError, match="ewc_lambda"):
        TrainConfig.from_dict({"ewc_lambda": -1.0})


def test_ewc_penalty_formula_and_normalisation():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    fisher = {"w": torch.tensor([2.0, 0.0, 4.0])}  # mean 2 -> normalised [1, 0, 2]
    anchor = EWCAnchor.from_fisher(3.0, fisher, {"w": w})
    with torch.no_grad():
        assert anchor.penalty({"w": w}).item() == 0.0
        w += torch.tensor([0.5, 10.0, -1.0])
        assert anchor.penalty({"w": w}).item() == pytest.approx(0.5 * 3.0 * (1 * 0.25 + 0 * 100 + 2 * 1.0))


def test_diagonal_fisher_is_the_mean_squared_per_row_gradient():
    from peftkit.data.sequences import tokenize_conversations

    model, tok = tiny_llama(), tiny_tokenizer()
    ex = tokenize_conversations(tok, [[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
                                      for p, a in [("ab", "c"), ("hello", "yes")]], 64)
    params = {"lm_head.weight": model.lm_head.weight}
    fisher = diagonal_fisher(model, params, [[e] for e in ex], tok.pad_token_id)
    from peftkit.data.sequences import collate
    from peftkit.train.loss import sequence_loss

    expect = torch.zeros_like(model.lm_head.weight)
    for e in ex:
        loss, n = sequence_loss(model, collate([[e]], tok.pad_token_id))
        (g,) = torch.autograd.grad(loss / n, [model.lm_head.weight])
        expect += g.pow(2)
    torch.testing.assert_close(fisher["lm_head.weight"], expect / 2)
