"""`peftkit quantize-report`: the model report's table, its storage figures, the histogram and the command."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from peftkit.quant import quantize, storage_bits
from peftkit.quant.report import (
    BASELINE_LABEL,
    VARIANTS,
    format_model_report,
    model_report,
    perplexity,
    plot_levels,
    quantized_linears,
)

torch.set_num_threads(1)


def _batches(vocab: int = 128, rows: int = 4, length: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length // 2 :] = 0  # one padded row
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]}, ids[2:]]  # a dict batch and a bare tensor batch


@pytest.fixture(scope="module")
def report():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = model_report(model, _batches())
    return model, before, rows


def test_table_structure(report):
    model, before, rows = report
    assert [r["label"] for r in rows] == [BASELINE_LABEL] + [v.label for v in VARIANTS]
    keys = {"label", "format", "bits_per_param", "rel_error", "mean_abs_error", "clipped", "perplexity", "tokens",
            "params"}
    n_linear = sum(m.weight.numel() for m in quantized_linears(model).values())
    assert n_linear == 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)  # 2 blocks: q,o; k,v (GQA); gate, up, down
    for r in rows:
        assert keys <= set(r)
        assert r["params"] == n_linear and r["tokens"] == rows[0]["tokens"] > 0
        # a random model is close to uniform over its 128 tokens; a format's error moves that little
        assert 64 < r["perplexity"] < 256 and r["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=0.01)
        assert 0 <= r["rel_error"] < 0.2 and 0 <= r["clipped"] < 0.01
    assert rows[0]["bits_per_param"] == 16 and rows[0]["rel_error"] == 0
    by = {r["label"]: r for r in rows}
    assert by["INT8"]["rel_error"] < by["NF4"]["rel_error"] < by["FP4"]["rel_error"]
    assert by["INT4 + clip p99.9"]["clipped"] > 0 and by["INT4"]["clipped"] == 0
    # the input model is untouched (the report works on a bf16 copy)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    table = format_model_report(rows)
    assert table.count("\n") == len(rows) + 1 and "| NF4 + DQ |" in table and "+0.00%" in table


def test_bits_per_param_tiny_model(report):
    _, _, rows = report
    by = {r["label"]: r for r in rows}
    # every tiny weight is a multiple of 64 elements: 4 + 32/64 bits, 8 + 32/64 bits
    assert by["INT8"]["bits_per_param"] == pytest.approx(8.5)
    for label in ("INT4", "INT4 + clip p99.9", "FP4", "NF4"):
        assert by[label]["bits_per_param"] == pytest.approx(4.5)
    # double quantization: one fp32 scale + one fp32 offset per tensor dominate on tensors this small
    assert 4.127 < by["NF4 + DQ"]["bits_per_param"] < 4.5


def test_bits_per_param_large_tensor():
    w = torch.randn(1024, 1024)
    assert storage_bits(*quantize(w, "nf4", 64, double_quant=True)) == pytest.approx(4.127, abs=5e-4)
    assert storage_bits(*quantize(w, "int8", 64)) == pytest.approx(8.5)
    assert storage_bits(*quantize(w, "int4", 64, clip_percentile=99.9)) == pytest.approx(4.5)


def test_perplexity_matches_hand_computation():
    model = tiny_llama()
    batches = _batches()
    ppl, n = perplexity(model, batches)
    nll, count = 0.0, 0
    for b in batches:
        ids = b["input_ids"] if isinstance(b, dict) else b
        mask = b["attention_mask"] if isinstance(b, dict) else torch.ones_like(ids)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        nll -= float(logp[keep].sum())
        count += int(keep.sum())
    assert n == count == 2 * 23 + 23 + 11
    assert ppl == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-5)
    with pytest.raises(ValueError, match="no labelled"):
        perplexity(model, [torch.randint(0, 128, (2, 1))])


def test_no_linear_layer_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear"):
        model_report(tiny_llama(), _batches(), skip=(".*",))


def test_histogram_png(tmp_path):
    w = tiny_llama().model.layers[0].self_attn.q_proj.weight
    path = plot_levels(w.reshape(-1)[:64], w, tmp_path / "levels.png", title="q_proj")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_samples_and_batches(tmp_path):
    from peftkit.commands.quantize_report import sample_texts, token_batches

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"output": f"sample {i} " + "x" * (250 if i % 2 else 10)})
                              for i in range(10)))
    texts, source = sample_texts(3, data)
    assert [t.split()[1] for t in texts] == ["9", "7", "5"] and "last 3 rows" in source  # the tail, long ones
    demo, source = sample_texts(5)
    assert len(demo) == 5 and all(demo)
    batches = token_batches(tiny_tokenizer(), ["ab", "abcdef", "abc", "a"], max_length=4, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 3), (1, 4)]  # "a" (one token) dropped, sorted by length
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_cli_registered():
    from peftkit.cli import build_parser

    args = build_parser().parse_args(["quantize-report", "--samples", "7", "--out", "x"])
    assert args.samples == 7 and args.out == "x" and args.func.__module__ == "peftkit.commands.quantize_report"
