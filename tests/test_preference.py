"""Preference tuning: pair data, the adapter-off reference, per-sequence log-probabilities from one packed forward,
the DPO / ORPO losses in the training loop (metrics, resume, refusals). TRL parity: tests/test_preference_trl.py."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama, tiny_tokenizer
from test_train import sharp_llama

from peftkit.core.adapter_io import apply_method
from peftkit.core.disable import adapter_disabled
from peftkit.data.preference import collate_pairs, read_pairs, row_to_pair, tokenize_pairs
from peftkit.errors import PeftkitError
from peftkit.train.config import TrainConfig
from peftkit.train.preference import HeadLogProbs, TargetLogProbs, _plain_head, sequence_logps
from peftkit.train.trainer import Trainer

IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))

STANDARD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "five"}
CONVERSATIONAL = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
                  "chosen": [{"role": "assistant", "content": "4"}],
                  "rejected": [{"role": "assistant", "content": "It is 5"}]}
IMPLICIT = {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}


def write_pairs(path, n=48):
    rows = [{"prompt": f"Repeat {i % 7} twice", "chosen": f"{i % 7}{i % 7}", "rejected": f"{(i + 3) % 7}"}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_the_three_layouts_render_with_the_chat_template_and_share_the_prompt():
    tok = tiny_tokenizer()
    pairs = tokenize_pairs(tok, [row_to_pair(r) for r in (STANDARD, CONVERSATIONAL, IMPLICIT)], 256)
    for pair, answers in zip(pairs, [("4", "five"), ("4", "It is 5"), ("4", "5")], strict=True):
        p = pair.prompt_length
        assert pair.chosen.input_ids[:p] == pair.rejected.input_ids[:p]
        assert tok.decode(pair.chosen.input_ids[:p]).endswith("<|im_start|>assistant\n")
        for example, answer in zip(pair.row(), answers, strict=True):
            targets = [i for i, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
            assert tok.decode(targets) == answer + "<|im_end|>"  # the answer to its end of turn, nothing else
    assert "Hello." in tok.decode(pairs[1].chosen.input_ids[:pairs[1].prompt_length])  # an earlier turn: context


@pytest.mark.parametrize("row, error", [
    ({"prompt": "x", "chosen": "a"}, "line 2: missing key 'rejected'"),
    ({"prompt": "x", "chosen": ["a"], "rejected": "b"}, "line 2: 'chosen' is a list; with a string prompt"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, r"line 2: chosen\[0\]: role 'user' not allowed"),
    ({"chosen": "a", "rejected": "b"}, "line 2: missing key 'prompt'"),
])
def test_a_malformed_row_is_named_by_file_line_and_key(tmp_path, row, error):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(STANDARD) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(PeftkitError, match=f"{path}: {error}"):
        read_pairs(path)
    assert len(read_pairs(path, skip_bad_rows=True)) == 1


def test_pairs_read_from_csv_and_json(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\nq,a,b\nq2,c,d\n")
    (tmp_path / "p.json").write_text(json.dumps([STANDARD, CONVERSATIONAL]))
    assert [r.chosen[0]["content"] for r in read_pairs(tmp_path / "p.csv")] == ["a", "c"]
    assert read_pairs(tmp_path / "p.json")[1].prompt[-1]["content"] == "2+2?"


def plain_logps(model, pair) -> list[float]:
    """Summed answer log-probabilities of each sequence, from a plain forward of it alone."""
    out = []
    for e in pair.row():
        ids, labels = torch.tensor([e.input_ids]), torch.tensor(e.labels[1:])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        keep = labels.ne(-100)
        out.append(float(logp[keep].gather(1, labels[keep, None]).sum()))
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_packed_pairs_give_each_sequence_its_own_log_probability(make):
    """One row per pair (the prompt once, both answers attending to it) == two rows == each sequence alone."""
    from peftkit.train.packed_attention import use_packed_attention

    model = make().eval()
    use_packed_attention(model)
    pairs = tokenize_pairs(tiny_tokenizer(), [row_to_pair(r) for r in (STANDARD, CONVERSATIONAL, IMPLICIT)], 256)
    with torch.no_grad():
        packed, counts = sequence_logps(model, collate_pairs([p.row() for p in pairs], 0, packed=True))
        unpacked, _ = sequence_logps(model, collate_pairs([p.row() for p in pairs], 0, packed=False))
        alone = torch.tensor([plain_logps(model, p) for p in pairs])
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(unpacked, alone, atol=1e-4, rtol=1e-5)
    assert counts.tolist() == [[p.chosen.num_targets, p.rejected.num_targets] for p in pairs]


def test_target_log_probs_gradient_equals_autograd():
    logits = torch.randn(37, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    weights = torch.randn(37, dtype=torch.float64)
    want = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    (want * weights).sum().backward()
    expected = logits.grad.clone()
    mine = logits.detach().clone().requires_grad_(True)
    got = TargetLogProbs.apply(mine.clone(), targets)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(mine.grad, expected)


@pytest.mark.parametrize("rows", [0, 1, 37, 70])  # none, one, one chunk and a part, several chunks
def test_head_log_probs_and_hidden_gradient_equal_autograd(rows):
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 24, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(50, 24, dtype=torch.float64, generator=g)
    targets = torch.randint(0, 50, (rows,), generator=g)
    weights = torch.randn(rows, dtype=torch.float64, generator=g)
    want = torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None])[:, 0]
    (want * weights).sum().backward()
    expected, hidden.grad = hidden.grad, None
    got = HeadLogProbs.apply(hidden, weight, targets, False)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(hidden.grad, expected)


def test_head_log_probs_under_bf16_autocast_as_the_head_would():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 32, generator=g, requires_grad=True)
    weight = torch.randn(64, 32, generator=g)
    targets = torch.randint(0, 64, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.log_softmax(torch.nn.functional.linear(hidden, weight).float(), -1).gather(1, targets[:, None])
        want[:, 0].sum().backward()
        expected, hidden.grad = hidden.grad, None
        got = HeadLogProbs.apply(hidden, weight, targets, False)
    got.sum().backward()
    assert got.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    torch.testing.assert_close(got, want[:, 0].detach(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(hidden.grad, expected, atol=2e-2, rtol=2e-2)


def test_sequence_log_probs_with_the_fused_head_equal_the_logits_path():
    model = tiny_llama()
    apply_method(model, "lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    assert _plain_head(model) is not None  # the adapted model's head is frozen: the fused path
    pairs = tokenize_pairs(tiny_tokenizer(), [row_to_pair(r) for r in (STANDARD, CONVERSATIONAL)], 64)
    batch = collate_pairs([p.row() for p in pairs], 0, packed=False)
    fused, _ = sequence_logps(model, batch)
    fused.sum().backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model.get_output_embeddings().weight.requires_grad_(True)  # a training head: the logits path
    assert _plain_head(model) is None
    plain, _ = sequence_logps(model, batch)
    plain.sum().backward()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for n, grad in fused_grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[n].grad, atol=1e-5, rtol=1e-4, msg=n)


def perturbed(method, config, seed=1, quantize=False):
    model = tiny_llama()
    base = tiny_llama()
    if quantize:
        from peftkit.core.context import Quantization
        from peftkit.quant import apply_quantization

        for m in (model, base):
            apply_quantization(m, Quantization("nf4", 64, True, "float32"), torch.float32)
    report = apply_method(model, method, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model, base, report


@pytest.mark.parametrize("method, config, quantize", [
    ("lora", {"r": 4}, False), ("lora", {"r": 4}, True), ("dora", {"r": 4}, False), ("ia3", {}, False),
    ("houlsby", {}, False), ("prompt_tuning", {"num_virtual_tokens": 3}, False),
    ("lora", {"r": 4, "init_lora_weights": "pissa"}, False), ("sparse", {"density": 0.1}, False),
])
def test_adapter_disabled_runs_the_base_model_and_always_comes_back(method, config, quantize):
    model, base, report = perturbed(method, config, quantize=quantize)
    with torch.no_grad():
        adapted, want = model(input_ids=IDS).logits, base(input_ids=IDS).logits
        assert not torch.allclose(adapted, want, atol=1e-3)
        with adapter_disabled(model, report):
            torch.testing.assert_close(model(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-5)  # PiSSA: W0 itself
        torch.testing.assert_close(model(input_ids=IDS).logits, adapted, atol=0, rtol=0)
        with pytest.raises(RuntimeError, match="boom"), adapter_disabled(model, report):
            raise RuntimeError("boom")
        torch.testing.assert_close(model(input_ids=IDS).logits, adapted, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_dpo_refuses_methods_that_train_the_base_weights(method, tmp_path):
    cfg = config(tmp_path, method=method, method_config={"include_norms": True} if method == "bitfit" else {})
    with pytest.raises(PeftkitError, match=f"objective=dpo needs a reference model: method '{method}' trains the "
                                           "base weights themselves") as e:
        Trainer(cfg, model=sharp_llama(), tokenizer=tiny_tokenizer())
    assert "\n" not in str(e.value)


def config(tmp_path, **kw):
    base = dict(data=write_pairs(tmp_path / "p.jsonl"), output_dir=str(tmp_path / "run"), precision="fp32",
                batch_size=4, lr=1e-2, method="lora", method_config={"r": 4}, max_length=64, progress=False,
                warmup_ratio=0.0, objective="dpo", max_steps=4)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_config_refusals():
    with pytest.raises(PeftkitError, match="objective: expected one of 'sft', 'dpo', 'orpo', got 'ppo'"):
        TrainConfig.from_dict({"objective": "ppo"})
    with pytest.raises(PeftkitError, match="loss_type: expected one of 'sigmoid', 'robust', 'hinge', 'ipo'"):
        TrainConfig.from_dict({"objective": "dpo", "loss_type": "kto"})
    with pytest.raises(PeftkitError, match="beta must be > 0"):
        TrainConfig.from_dict({"objective": "dpo", "beta": 0})
    with pytest.raises(PeftkitError, match="ewc_lambda is for objective=sft"):
        TrainConfig.from_dict({"objective": "orpo", "ewc_lambda": 0.1})


@pytest.mark.parametrize("objective, method, quantize", [("dpo", "lora", "none"), ("dpo", "lora", "nf4"),
                                                         ("dpo", "ia3", "none"), ("orpo", "full", "none")])
def test_training_logs_trl_metrics_and_the_first_dpo_step_is_ln2(tmp_path, objective, method, quantize):
    cfg = config(tmp_path, objective=objective, method=method, quantize=quantize, eval_fraction=0.25, eval_every=2,
                 method_config={"r": 4} if method == "lora" else {}, lr=3e-3 if method != "full" else 1e-3)
    trainer = Trainer(cfg, model=sharp_llama(), tokenizer=tiny_tokenizer())
    result = trainer.run()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "loss"}
    assert len(log) == 4 and all(keys <= set(r) for r in log)
    assert "eval_rewards/accuracies" in log[1] and "eval_rewards/accuracies" in result.final_scores
    first = log[0]
    if objective == "dpo":  # policy == reference at the start: every reward 0, the loss ln 2
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and first["rewards/margins"] == 0
    else:
        assert first["nll_loss"] > 0 and first["loss"] > first["nll_loss"]
    data = trainer.data  # the pairs trained on: their loss fell below where it started
    after = trainer.objective.evaluate(trainer.model, data.rows, data.pad_id, data.packing, 8)
    assert after["eval_loss"] < (math.log(2) if objective == "dpo" else first["loss"])
    assert after["eval_rewards/margins"] > 0 or objective == "orpo"  # ORPO's NLL raises both answers here


def test_resume_gives_the_uninterrupted_curve_and_refuses_a_changed_beta(tmp_path):
    whole = Trainer(config(tmp_path, output_dir=str(tmp_path / "whole"), save_every=2), model=sharp_llama(),
                    tokenizer=tiny_tokenizer())
    whole.run()
    cut = config(tmp_path, output_dir=str(tmp_path / "cut"), save_every=2)
    Trainer(cut, model=sharp_llama(), tokenizer=tiny_tokenizer()).run(until_step=2)
    resumed = Trainer(cut, model=sharp_llama(), tokenizer=tiny_tokenizer(), resume=True)
    resumed.run()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    for key, value in (("beta", 0.5), ("objective", "orpo")):
        changed = config(tmp_path, output_dir=str(tmp_path / "cut"), save_every=2, max_steps=6, **{key: value})
        with pytest.raises(PeftkitError, match=key):
            Trainer(changed, model=sharp_llama(), tokenizer=tiny_tokenizer(), resume=True).run()


def test_orpo_loss_is_nll_plus_the_odds_ratio_term():
    from peftkit.train.preference import orpo_loss

    policy = torch.tensor([[-3.0, -6.0]])
    counts = torch.tensor([[3, 2]])
    losses, rewards = orpo_loss(policy, counts, beta=0.2)
    a = policy / counts
    odds = a - torch.log(1 - torch.exp(a))
    assert float(losses[0]) == pytest.approx(float(-0.2 * F.logsigmoid(odds[0, 0] - odds[0, 1])), rel=1e-6)
    torch.testing.assert_close(rewards, 0.2 * a)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path, objective):
    import subprocess
    import sys
    from pathlib import Path

    from test_distributed import free_port

    worker = Path(__file__).with_name("preference_ddp_worker.py")
    data = write_pairs(tmp_path / "p.jsonl", n=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    runs = {}
    for nproc, batch_size in ((2, 2), (1, 4)):
        out = tmp_path / f"n{nproc}"
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
        cmd = [sys.executable, *(launcher if nproc > 1 else []), str(worker), data, str(out), str(batch_size),
               objective]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[nproc] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    (rank0, rank1), (single,) = runs[2], runs[1]
    assert rank0["world"] == rank1["world"] == 2
    # the pairs dealt without duplicates, together exactly what one process saw
    assert not set(rank0["rows"]) & set(rank1["rows"])
    assert sorted(rank0["rows"] + rank1["rows"]) == sorted(single["rows"])
    # the same losses and TRL metrics (averaged over the step's pairs of both processes) and the same adapter
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"]
    assert len(rank0["metrics"]) == len(single["metrics"]) == 4
    for ours, theirs in zip(rank0["metrics"], single["metrics"], strict=True):
        assert [ours[k] for k in keys] == pytest.approx([theirs[k] for k in keys], rel=1e-4, abs=1e-5)
    assert rank0["weights"] == rank1["weights"]
    # Adam divides by the gradients' running magnitude: where a gradient is near zero, the processes' other summation
    # order moves an update by a little of its size (lr 1e-2); a wrong scale across processes moves it by all of it
    for name, values in single["weights"].items():
        assert rank0["weights"][name] == pytest.approx(values, rel=1e-4, abs=2e-5), name
    assert single["metrics"][-1]["loss"] < single["metrics"][0]["loss"]
