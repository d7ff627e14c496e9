"""Precision chosen from the hardware (both branches, forced by PEFTKIT_NATIVE_BF16), the matmul peak cache, and
the model-FLOP count the trainer's MFU rests on."""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from test_train import make_cfg, sharp_llama
from torch.utils.flop_counter import FlopCounterMode

from peftkit import hardware
from peftkit.core.adapter_io import apply_method
from peftkit.data.sequences import collate
from peftkit.errors import PeftkitError
from peftkit.methods import lora_native
from peftkit.train import Trainer
from peftkit.train.flops import FlopCount, attention_pairs
from peftkit.train.loss import sequence_loss


@pytest.fixture
def native(monkeypatch):
    """Force the answer to "does this hardware compute bf16 natively?"."""
    def force(value: bool) -> None:
        monkeypatch.setenv(hardware.ENV, "1" if value else "0")
    return force


def test_auto_is_bf16_with_native_bf16_and_fp32_on_a_cpu_without(native):
    native(True)
    p = hardware.resolve_precision("auto", "cpu")
    assert (p.name, p.compute_dtype, p.weight_dtype, p.autocast, p.grad_scaler) == (
        "bf16", torch.bfloat16, torch.bfloat16, True, False)
    assert p.warning is None and hardware.ENV in p.reason and "chosen automatically" in p.line()
    native(False)
    p = hardware.resolve_precision("auto", "cpu")
    assert (p.name, p.compute_dtype, p.weight_dtype, p.autocast) == ("fp32", torch.float32, torch.float32, False)


def test_explicit_bf16_without_native_bf16_runs_with_one_warning_line(native, capsys):
    native(False)
    p = hardware.resolve_precision("bf16", "cpu")
    assert p.name == "bf16" and "slower" in p.warning
    assert "fp32" in p.warning  # says what auto would pick instead
    hardware._warned.clear()
    hardware.warn_if_slow(p)
    hardware.warn_if_slow(p)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peftkit: warning: precision bf16")
    native(True)
    assert hardware.resolve_precision("bf16", "cpu").warning is None
    assert hardware.resolve_precision("fp32", "cpu").warning is None


def test_the_real_hardware_answer_matches_torch(monkeypatch):
    monkeypatch.delenv(hardware.ENV, raising=False)
    native, why = hardware.native_bf16("cpu")
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        assert native
    elif hardware.platform.machine() == "x86_64":
        assert not native and hardware.cpu_capability() in why
    assert hardware.resolve_precision("auto", "cpu").name == ("bf16" if native else "fp32")


def test_cuda_before_ampere_gets_fp16_with_a_grad_scaler(monkeypatch):
    monkeypatch.delenv(hardware.ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    p = hardware.resolve_precision("auto", "cuda")
    assert (p.name, p.compute_dtype, p.grad_scaler) == ("fp16", torch.float16, True)
    assert "7.5 < 8.0" in p.reason
    assert "slower" in hardware.resolve_precision("bf16", "cuda").warning
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert hardware.resolve_precision("auto", "cuda").name == "bf16"


def test_bad_precision_and_bad_override_are_named(monkeypatch):
    with pytest.raises(PeftkitError, match="precision must be one of"):
        hardware.resolve_precision("bf17")
    monkeypatch.setenv(hardware.ENV, "yes")
    with pytest.raises(PeftkitError, match="PEFTKIT_NATIVE_BF16 must be 0 or 1"):
        hardware.resolve_precision("auto")


def test_matmul_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(hardware, "_measure", lambda dtype: calls.append(dtype) or 1.5e10)
    hardware._cached_peak.cache_clear()
    try:
        assert hardware.matmul_peak(torch.float32) == 1.5e10
        hardware._cached_peak.cache_clear()  # a new process: read back from the file
        assert hardware.matmul_peak(torch.float32) == 1.5e10 and calls == [torch.float32]
        (tmp_path / "matmul_peak.json").write_text("{not json")  # a damaged cache is measured again
        hardware._cached_peak.cache_clear()
        assert hardware.matmul_peak(torch.float32) == 1.5e10 and len(calls) == 2
        assert json.loads((tmp_path / "matmul_peak.json").read_text())
    finally:
        hardware._cached_peak.cache_clear()


def test_measured_peak_is_a_real_rate():
    rate = hardware._measure(torch.float32, reps=1)
    assert 1e8 < rate < 1e14  # between 0.1 GFLOP/s and 100 TFLOP/s


@pytest.mark.parametrize("forced, weights", [(True, torch.bfloat16), (False, torch.float32)])
def test_trainer_follows_the_hardware_and_records_it(tmp_path, native, forced, weights):
    native(forced)
    cfg = make_cfg(tmp_path, precision="auto", max_steps=2)
    trainer = Trainer(cfg, model=sharp_llama(), tokenizer=tiny_tokenizer())
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert frozen == {weights} and {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    result = trainer.run()
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["precision"] == result.precision == ("bf16" if forced else "fp32")
    assert info["precision_requested"] == "auto" and hardware.ENV in info["precision_reason"]
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["model_flops_per_s"] > 0 and 0 < r["mfu"] for r in log)
    assert result.mfu is not None and result.mfu > 0


def test_quantized_base_dequantizes_to_the_chosen_dtype(tmp_path, native):
    from peftkit.quant import QuantLinear

    for forced, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        native(forced)
        cfg = make_cfg(tmp_path, precision="auto", quantize="nf4", quant_block_size=32)
        trainer = Trainer(cfg, model=tiny_llama(), tokenizer=tiny_tokenizer())
        layers = [m for m in trainer.model.modules() if isinstance(m, QuantLinear)]
        assert layers and {m.compute_dtype for m in layers} == {dtype}


def test_fp16_trains_with_a_grad_scaler_and_resumes_it(tmp_path):
    cfg = make_cfg(tmp_path, precision="fp16", max_steps=12, save_every=6, epochs=4.0)
    trainer = Trainer(cfg, model=sharp_llama(), tokenizer=tiny_tokenizer())
    assert {p.dtype for p in trainer.model.parameters() if not p.requires_grad} == {torch.float16}
    result = trainer.run(until_step=6)
    state = json.loads((tmp_path / "run" / "checkpoint-6" / "trainer_state.json").read_text())
    assert 0 < state["grad_scaler"]["scale"] < 2.0**16  # overflowing first steps lowered the initial scale
    resumed = Trainer(cfg, model=sharp_llama(), tokenizer=tiny_tokenizer(), resume=True)
    result = resumed.run()
    losses = [h["loss"] for h in resumed.history]
    assert result.precision == "fp16" and result.steps == 12 and all(map(math.isfinite, losses))
    assert sum(losses[-3:]) < sum(losses[:3])


def flops_counted(model, batch) -> float:
    # LoRA accumulates B's product into the base output in place (addmm_), which torch's table does not list, and
    # frozen products go to oneDNN's linear primitive while training (peftkit.core.matmul): counted with its formula.
    # LoRA's compiled skinny products (peftkit.methods.lora_native) are invisible to the counter: PyTorch's here.
    in_place = {torch.ops.aten.addmm_: lambda out, a, b, *args, **kwargs: 2 * a[0] * a[1] * b[1],
                torch.ops.mkldnn._linear_pointwise: lambda x, w, *args, **kwargs: 2 * x[0] * x[1] * w[0]}
    with mock.patch.object(lora_native, "lora_kernel", lambda: None), \
            FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        loss, n = sequence_loss(model, batch)
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("method, settings", [("lora", {"r": 4}), ("full", {}), ("top_k_layers", {"k": 1}),
                                              ("norms", {})])
def test_flop_count_equals_torch_flop_counter(method, settings):
    """The analytic count against torch's own FLOP counter on a real forward + backward (eager attention: its
    matmuls cover the full square, so the pairs are given as the square here)."""
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    apply_method(model, method, settings)
    tok = tiny_tokenizer()
    from peftkit.data.sequences import Example

    rows = [[Example(input_ids=list(range(3, 3 + 24)), labels=[-100] * 14 + list(range(17, 27)))] for _ in range(2)]
    batch = collate(rows, tok.pad_token_id)
    assert not batch["segment_ids"].lt(0).any()  # no padding: every position is a real token
    count = FlopCount.of(model)
    tokens, targets = 2 * 24, int(batch["labels"][:, 1:].ne(-100).sum())
    square = 2 * 24 * 24
    counted = flops_counted(model, batch)
    # Where nothing below the lowest trainable block needs a gradient, autograd also skips the input gradients of
    # that block's q, k, v projections (they read the block's input only); the count keeps them (documented).
    skipped = 0
    if method == "lora":  # (top_k_layers trains the block's input norm: q, k, v then need input gradients)
        attn = model.model.layers[0].self_attn
        skipped = 2 * tokens * sum(p.numel() for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
                                   for name, p in proj.named_parameters() if p.ndim == 2 and "lora_B" not in name)
    assert count.step(tokens, targets, square) - skipped == pytest.approx(counted, rel=1e-9)
    assert skipped <= 0.05 * counted


def test_attention_pairs_are_causal_within_each_packed_example():
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    assert attention_pairs(segments) == (6 + 3) + 10


def test_attention_pairs_count_each_example_against_the_shared_prefix():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1]])  # prefix of 3, then examples of 2 and 1 tokens
    assert attention_pairs(segments, torch.tensor([3])) == (6 + 3 + 1) + 3 * 3


def brute_force_pairs(segment_ids: torch.Tensor, prefix_lengths: torch.Tensor, window: int | None) -> int:
    """Every (query, key) pair packed attention computes, one by one: keys of the query's example and of its row's
    shared prefix, no later than the query and (with a window) less than `window` positions back."""
    total = 0
    for ids, prefix in zip(segment_ids.tolist(), prefix_lengths.tolist(), strict=True):
        for s in set(ids) - {-1}:
            first = prefix if prefix and s > 0 else 0  # segment 0 of a row with a prefix is the prefix
            for i in range(ids.count(s)):
                total += sum(1 for key in range(first + i + 1) if window is None or first + i - key < window)
    return total


@pytest.mark.parametrize("window", [None, 1, 2, 3, 5, 50])
def test_attention_pairs_within_a_sliding_window(window):
    ids = torch.full((3, 30), -1)
    for r, lengths in enumerate(([4, 7, 1, 9], [12, 3], [2, 2, 6, 5, 8])):
        start = 0
        for s, n in enumerate(lengths):
            ids[r, start:start + n] = s
            start += n
    for prefixes in (torch.tensor([4, 0, 2]), torch.zeros(3, dtype=torch.long)):
        assert attention_pairs(ids, prefixes, window) == brute_force_pairs(ids, prefixes, window)
    assert attention_pairs(ids, None, window) == brute_force_pairs(ids, torch.zeros(3, dtype=torch.long), window)
    # a prefix of 3, then examples of 2 and 1 tokens, window 2: 1 + 2 + 2 for the prefix, 2 + 2, 2
    assert attention_pairs(torch.tensor([[0, 0, 0, 1, 1, 2, -1]]), torch.tensor([3]), 2) == 11


def attend_seen_pairs_only(query, key, value, segments, scale, window):
    """Packed attention with each query against exactly the keys it sees: its matmul FLOPs are those of the
    attended pairs, so torch's counter measures what `attention_pairs` counts."""
    from peftkit.train.packed_attention import PackedCausalAttention

    batch, heads, length, d = query.shape
    groups = heads // key.shape[1]
    out = [[query.new_zeros(heads, value.shape[-1]) for _ in range(length)] for _ in range(batch)]
    for r, start, end, prefix in PackedCausalAttention._pieces(segments):
        tokens = list(range(prefix)) + list(range(start, end))  # key j is the token at position j of the example
        for i in range(end - start):
            position = prefix + i
            seen = torch.tensor(tokens[0 if window is None else max(0, position - window + 1):position + 1])
            k, v = (t[r][:, seen].repeat_interleave(groups, 0) for t in (key, value))
            weights = torch.softmax((query[r, :, start + i, None] @ k.transpose(1, 2)) * scale, dim=-1)
            out[r][start + i] = (weights @ v)[:, 0]
    return torch.stack([torch.stack(row) for row in out])


@pytest.mark.parametrize("model_name", ["tiny_gemma3", "tiny_mistral"])
def test_windowed_flop_count_equals_torch_flop_counter(model_name, monkeypatch):
    """Sliding-window layers count only the pairs in their window: against torch's FLOP counter on a real forward
    + backward of packed rows with shared prefixes, attention computing exactly the attended pairs."""
    import test_packed_attention as tpa

    import peftkit.train.packed_attention as pa

    model = getattr(tpa, model_name)()
    apply_method(model, "lora", {"r": 4})
    assert pa.use_packed_attention(model)
    batch = tpa.batches(True, True, tpa.SHARED)
    assert batch["prefix_lengths"].max() > tpa.WINDOW
    expected, _ = sequence_loss(model, batch)
    monkeypatch.setattr(pa.PackedCausalAttention, "apply", staticmethod(attend_seen_pairs_only))
    loss, _ = sequence_loss(model, batch)
    torch.testing.assert_close(loss, expected)  # the pair-by-pair attention is the same attention
    count = FlopCount.of(model)
    windows = pa.attention_windows(model.config)
    assert sorted(count.windows, key=str) == sorted(set(windows), key=str)
    positions, targets = batch["input_ids"].numel(), int(batch["labels"][:, 1:].ne(-100).sum())
    pairs = count.pairs(batch["segment_ids"], batch["prefix_lengths"])
    assert pairs[tpa.WINDOW] < attention_pairs(batch["segment_ids"], batch["prefix_lengths"])  # the window matters
    attn = model.model.layers[0].self_attn  # q, k, v input gradients autograd skips (see the test above)
    skipped = 2 * positions * sum(p.numel() for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
                                  for name, p in proj.named_parameters() if p.ndim == 2 and "lora_B" not in name)
    counted = flops_counted(model, batch)
    assert count.step(positions, targets, pairs) - skipped == pytest.approx(counted, rel=1e-9)
    unwindowed = count.step(positions, targets, attention_pairs(batch["segment_ids"], batch["prefix_lengths"]))
    assert unwindowed - skipped > counted * (1 + 1e-6)  # counting every layer as full would overstate it
