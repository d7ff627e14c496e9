"""Parity with TRL (a test dependency only): DPO losses and gradients against TRL's own `DPOTrainer.compute_loss` on
the same pairs and the same LoRA weights (peftkit's adapter file loaded by peft), TRL's per-sequence log-probabilities
(its fused head, adapter off for the reference) against peftkit's packed forward; ORPO's odds-ratio term and
gradients against TRL's `ORPOTrainer.odds_ratio_loss` and `get_batch_logps`.

Note: TRL's ORPO NLL term covers the prompt tokens too ("computed over the full prompt and response"); peftkit's
covers the answer, as the ORPO paper's L_SFT does; that term is compared with TRL's cross-entropy on answer labels.
"""

from __future__ import annotations

import types

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from peftkit.core.adapter_io import apply_method, save_adapter
from peftkit.data.preference import collate_pairs, row_to_pair, tokenize_pairs
from peftkit.train.config import TrainConfig
from peftkit.train.packed_attention import use_packed_attention
from peftkit.train.preference_run import PreferenceObjective

trl = pytest.importorskip("trl", reason="trl is not installed (pip install trl: the parity tests need it)")

ROWS = [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "five, surely"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "Lyon, I think"}]},
        {"prompt": "Say yes", "chosen": "yes", "rejected": "no"}]


def pairs():
    return tokenize_pairs(tiny_tokenizer(), [row_to_pair(r) for r in ROWS], 256)


def trl_inputs(ps) -> dict[str, torch.Tensor]:
    """TRL's batch layout: the chosen sequences, then the rejected ones, right-padded; completion_mask on answers."""
    seqs = [p.chosen for p in ps] + [p.rejected for p in ps]
    width = max(len(e.input_ids) for e in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, e in enumerate(seqs):
        n = len(e.input_ids)
        ids[i, :n], attention[i, :n] = torch.tensor(e.input_ids), 1
        completion[i, :n] = torch.tensor([int(label != -100) for label in e.labels])
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """peftkit's LoRA model (random B: policy != reference) and the same adapter loaded by peft."""
    from peft import PeftModel

    folder = tmp_path_factory.mktemp("lora")
    ours = tiny_llama()
    report = apply_method(ours, "lora", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(ours, folder)
    use_packed_attention(ours)
    theirs = PeftModel.from_pretrained(tiny_llama(), str(folder), is_trainable=True)
    return ours, report, theirs, folder


def trl_trainer(theirs, folder, loss_type, beta, label_smoothing):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(folder / "trl"), beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing,
                     report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=3)
    trainer = DPOTrainer(model=theirs, args=args, processing_class=tiny_tokenizer(),
                         train_dataset=Dataset.from_list([{k: ROWS[0][k] for k in ("prompt", "chosen", "rejected")}]))
    # Given a trained adapter, TRL keeps a frozen copy of it ("ref") as the reference; without one its reference is
    # the adapter off, as for a new adapter (and as in peftkit): the case compared here.
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
    return trainer


def grads(model, names) -> dict[str, torch.Tensor]:
    out = {names(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def peft_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".default.", ".")


@pytest.mark.parametrize("loss_type, beta, label_smoothing", [("sigmoid", 0.1, 0.0), ("robust", 0.2, 0.1),
                                                              ("hinge", 0.5, 0.0), ("ipo", 0.3, 0.0)])
def test_dpo_loss_log_probs_and_gradients_equal_trl(models, loss_type, beta, label_smoothing):
    ours, report, theirs, folder = models
    trainer = trl_trainer(theirs, folder, loss_type, beta, label_smoothing)
    ps, inputs = pairs(), trl_inputs(pairs())
    want = trainer.compute_loss(trainer.model, inputs)
    want.backward()
    want_grads = grads(trainer.model, peft_name)
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, inputs)
    with torch.no_grad():
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        kw = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        policy = trainer.model(**kw, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(1)

    cfg = TrainConfig.from_dict({"objective": "dpo", "beta": beta, "label_smoothing": label_smoothing,
                                 "loss_type": loss_type})
    objective = PreferenceObjective(cfg, ours, report)
    ours.train()
    losses, _, our_policy, _ = objective.losses(ours, collate_pairs([p.row() for p in ps], 0, packed=True))
    losses.mean().backward()
    got_grads = grads(ours, str)
    with torch.no_grad():
        from peftkit.core.disable import adapter_disabled
        from peftkit.train.preference import sequence_logps

        with adapter_disabled(ours, report):
            reference, _ = sequence_logps(ours, collate_pairs([p.row() for p in ps], 0, packed=True))
    torch.testing.assert_close(our_policy.detach(), policy.view(2, -1).t(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(reference, torch.stack([ref_chosen, ref_rejected], 1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(losses.mean().detach(), want.detach(), atol=1e-5, rtol=1e-5)
    assert set(got_grads) == set(want_grads)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in want_grads.values())


def test_orpo_odds_ratio_term_and_gradients_equal_trl(models):
    from trl.experimental.orpo import ORPOTrainer

    ours, report, theirs, _ = models
    beta = 0.25
    ps, inputs = pairs(), trl_inputs(pairs())
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    logits = theirs(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    n = len(ps)
    fake = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(fake, logps[:n], logps[n:])
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].reshape(-1, logits.shape[-1]), labels[:n, 1:].reshape(-1))
    want = nll - losses.mean()
    want.backward()
    want_grads = grads(theirs, peft_name)

    cfg = TrainConfig.from_dict({"objective": "orpo", "beta": beta})
    objective = PreferenceObjective(cfg, ours, report)
    batch = collate_pairs([p.row() for p in ps], 0, packed=True)
    pair_losses, rewards, policy, counts = objective.losses(ours, batch)
    loss = pair_losses.mean() - policy[:, 0].sum() / counts[:, 0].sum()  # as `PreferenceObjective.accumulate`
    loss.backward()
    got_grads = grads(ours, str)
    torch.testing.assert_close(loss.detach(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rewards, torch.stack([chosen_rewards, rejected_rewards], 1), atol=1e-5, rtol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
