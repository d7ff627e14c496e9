"""The training loop on a tiny model: learning, accumulation equivalence, resume equivalence, NaN stop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from peftkit.data.sequences import collate
from peftkit.errors import PeftkitError
from peftkit.train import TrainConfig, Trainer, load_recipe
from peftkit.train.loss import sequence_loss


def write_data(path, n=48):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Repeat {i % 7} twice", "output": f"{i % 7}{i % 7}"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def make_cfg(tmp_path, **kw):
    base = dict(data=write_data(tmp_path / "d.jsonl"), output_dir=str(tmp_path / "run"), precision="fp32",
                batch_size=4, lr=3e-3, method="lora", method_config={"r": 4}, max_length=64, progress=False,
                packing=False, warmup_ratio=0.0)
    base.update(kw)
    return TrainConfig.from_dict(base)


def sharp_llama():
    # A random tiny model's output head is so flat (std 0.02, unit-norm hidden states) that no adapter can make a
    # confident prediction: scale it up so that learning shows in the loss.
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def run(cfg, resume=False, until=None):
    trainer = Trainer(cfg, model=sharp_llama(), tokenizer=tiny_tokenizer(), resume=resume)
    return trainer, trainer.run(until_step=until)


def test_training_lowers_loss_and_writes_outputs(tmp_path):
    cfg = make_cfg(tmp_path, epochs=4.0, eval_fraction=0.25, lr=1e-2)
    trainer, result = run(cfg)
    losses = [h["loss"] for h in trainer.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.eval_loss is not None and result.adapter_dir is not None
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == result.steps and {"loss", "lr", "grad_norm", "target_tokens_per_s"} <= set(log[0])


def test_loss_is_normalised_over_all_accumulated_target_tokens():
    model = tiny_llama()
    tok = tiny_tokenizer()
    from peftkit.data.formats import read_conversations
    from peftkit.data.sequences import tokenize_conversations

    convs = read_conversations([{"instruction": "q" * (i + 1), "output": "a" * (3 * i + 1)} for i in range(4)])
    ex = tokenize_conversations(tok, convs, 128)
    big = collate([[e] for e in ex], 0)
    loss_big, n_big = sequence_loss(model, big)
    parts = [sequence_loss(model, collate([[e] for e in ex[i:i + 2]], 0)) for i in (0, 2)]
    assert n_big == sum(n for _, n in parts)
    torch.testing.assert_close(sum(loss for loss, _ in parts) / n_big, loss_big / n_big)
    # averaging per micro-batch (the bug) differs when micro-batches have different target counts
    naive = sum(loss / n for loss, n in parts) / 2
    assert abs(naive - loss_big / n_big) > 1e-3


def test_accumulation_equals_one_big_batch(tmp_path):
    a_trainer, a = run(make_cfg(tmp_path / "a", batch_size=8, grad_accum=1, max_steps=3))
    b_trainer, b = run(make_cfg(tmp_path / "b", batch_size=2, grad_accum=4, max_steps=3))
    for x, y in zip(a_trainer.history, b_trainer.history, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    wa = dict(a_trainer.model.named_parameters())
    for n, p in b_trainer.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, wa[n], atol=1e-6, rtol=1e-5)


def test_resume_gives_the_same_loss_curve(tmp_path):
    kw = dict(max_steps=8, save_every=2, method_config={"r": 4, "lora_dropout": 0.1}, packing=True)
    full_trainer, _ = run(make_cfg(tmp_path / "full", **kw))
    cfg = make_cfg(tmp_path / "cut", **kw)
    run(cfg, until=5)  # "killed" after step 5; the last checkpoint is step 4
    resumed, result = run(cfg, resume=True)
    assert result.steps == 8
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full_trainer.history]


def test_nan_loss_stops_with_clear_error(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=3, lr=1e30, max_grad_norm=0.0)
    with pytest.raises(PeftkitError, match="training stopped at step .*non-finite"):
        run(cfg)


def test_recipe_errors_name_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\nzzz_colour: 1e-4\n")
    with pytest.raises(PeftkitError, match="unknown key 'zzz_colour'.*known keys: model"):
        load_recipe(recipe)
    recipe.write_text("method: lora\nbatch_size: eight\n")
    with pytest.raises(PeftkitError, match="batch_size: expected int"):
        load_recipe(recipe)
    recipe.write_text("method: lora\n")
    with pytest.raises(PeftkitError, match="unknown key 'rank'"):
        load_recipe(recipe, ["method_config.rank=4"])
    cfg = load_recipe(recipe, ["method_config.r=4", "lr=1e-3", "packing=false"])
    assert cfg.method_config == {"r": 4} and cfg.lr == 1e-3 and cfg.packing is False


@pytest.mark.parametrize("method", ["full", "houlsby", "pfeiffer", "prompt_tuning", "prefix_tuning", "top_k_layers",
                                    "norms", "sparse", "intrinsic_said", "lora"])
def test_every_method_trains_with_the_one_loop(tmp_path, method):
    from peftkit.core.registry import list_methods

    assert method in list_methods()
    settings = {"prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
                "sparse": {"density": 0.1}, "intrinsic_said": {"d": 64}}.get(method, {})
    cfg = make_cfg(tmp_path, method=method, method_config=settings, max_steps=6, lr=1e-2, packing=True,
                   batch_size=2, save_every=3)
    trainer, result = run(cfg)
    losses = [h["loss"] for h in trainer.history]
    assert all(torch.isfinite(torch.tensor(losses))) and min(losses[3:]) < losses[0]
    assert (result.adapter_dir / "adapter_config.json").is_file()
    resumed, _ = run(cfg.replace(max_steps=6), resume=True)  # finished: resuming does nothing more
    assert resumed.history[-1]["step"] == 6


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "prefix_tuning", "houlsby"])
@pytest.mark.parametrize("packing", [False, True])
def test_sequence_loss_equals_per_example_loss(method, packing):
    """The trainer's loss (logits only where a target is predicted, packed rows) equals the plain per-example sum."""
    import torch.nn.functional as F

    from peftkit.core.adapter_io import apply_method
    from peftkit.data import make_rows, read_conversations, tokenize_conversations

    model = tiny_llama()
    apply_method(model, method, {"num_virtual_tokens": 3} if "tuning" in method else {})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    rows = [{"instruction": "abc", "output": "xyz"}, {"instruction": "hello there", "output": "q"}]
    examples = tokenize_conversations(tiny_tokenizer(), read_conversations(rows), 64)
    loss, count = sequence_loss(model, collate(make_rows(examples, 64, packing), 0))
    expected = 0.0
    for e in examples:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        expected += F.cross_entropy(logits, torch.tensor(e.labels[1:]), ignore_index=-100, reduction="sum")
    assert count == sum(e.num_targets for e in examples)
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-5)


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    from peftkit.train import checkpoint

    cfg = make_cfg(tmp_path, max_steps=4, save_every=2)
    calls = {"n": 0}
    real_save = checkpoint.save_file

    def dying_save(tensors, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's trainable weights: die mid-save
            raise KeyboardInterrupt("killed")
        return real_save(tensors, path, *a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    out = tmp_path / "run"
    assert (out / "latest").read_text() == "checkpoint-2"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # the half-written folder was removed
    monkeypatch.undo()
    resumed, result = run(cfg, resume=True)  # and the run continues from it
    assert result.steps == 4 and resumed.history[1]["step"] == 2


@pytest.mark.parametrize("rows", [1, 300])
def test_summed_cross_entropy_equals_torch(rows):
    from peftkit.train.loss import SummedCrossEntropy

    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, 70, generator=g, dtype=torch.float64) * 4
    targets = torch.randint(0, 70, (rows,), generator=g)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    mine = SummedCrossEntropy.apply(a * 1.0, targets)  # a non-leaf, as the head's output is
    ref = torch.nn.functional.cross_entropy(b, targets, reduction="sum")
    torch.testing.assert_close(mine, ref)
    (mine * 3).backward()
    (ref * 3).backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_summed_cross_entropy_of_16_bit_logits_is_the_fp32_one_rounded(dtype):
    """16-bit logits (the head's output under autocast) go in without an fp32 copy: the loss is the fp32 loss of the
    same values, the gradient the fp32 gradient rounded to the logits' dtype, over several chunks."""
    from peftkit.train.loss import SummedCrossEntropy

    g = torch.Generator().manual_seed(1)
    rows = 3 * SummedCrossEntropy.CHUNK + 5
    base = (torch.randn(rows, 300, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 300, (rows,), generator=g)
    a, b = base.clone().requires_grad_(), base.float().requires_grad_()
    mine = SummedCrossEntropy.apply(a * 1.0, targets)
    ref = torch.nn.functional.cross_entropy(b, targets, reduction="sum")
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, ref)
    (mine * 0.7).backward()
    (ref * 0.7).backward()
    assert a.grad.dtype == dtype
    torch.testing.assert_close(a.grad, b.grad.to(dtype), atol=0, rtol=2**-7)  # one rounding at most


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast"])
def test_packed_rows_train_in_every_16_bit_precision(tmp_path, precision):
    # under bf16 autocast, RoPE leaves q and k in fp32 while v is bf16: packed attention's backward mixes dtypes
    cfg = make_cfg(tmp_path, max_steps=2, packing=True, precision=precision)
    trainer, result = run(cfg)
    assert result.steps == 2 and all(math.isfinite(h["loss"]) for h in trainer.history)
