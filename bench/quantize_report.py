"""`peftkit quantize-report` on the bundled model, written to BENCHMARKS.md (section "quantize_report").

Runs the command's own functions (`sample_texts`, `token_batches`, `model_report`, `plot_levels`) with 50 Alpaca
outputs, writes the JSON and the PNG to ``bench/out/quantize_report/`` and the table to BENCHMARKS.md.

Run: ``python bench/quantize_report.py [--samples 50]`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, machine, write_section  # noqa: E402

MODEL = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "quantize_report"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch

    from peftkit.commands.quantize_report import DEFAULT_LAYER, sample_texts, token_batches
    from peftkit.models import load_model
    from peftkit.quant.report import format_model_report, model_report, plot_levels

    torch.set_num_threads(1)  # a shared, oversubscribed CPU: one thread is much faster than two waiting threads
    t0 = time.perf_counter()
    texts, source = sample_texts(args.samples)
    model, tokenizer = load_model(MODEL)
    batches = token_batches(tokenizer, texts, 256, 8)
    rows = model_report(model, batches)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weight = model.get_submodule(DEFAULT_LAYER).weight.detach().float()
    png = plot_levels(weight.reshape(-1)[:64], weight, out / "quantize_levels.png",
                      title=f"{DEFAULT_LAYER}: real weights vs INT4 and NF4 levels (block 64)")
    (out / "quantize_report.json").write_text(json.dumps({"model": MODEL, "text": source, "rows": rows}, indent=2))
    wall = time.perf_counter() - t0
    table = format_model_report(rows)
    print(table)
    by = {r["label"]: r["perplexity"] for r in rows}
    order = sorted(("INT4", "FP4", "NF4", "NF4 + DQ"), key=by.get)
    paper = "NF4 + DQ < FP4 < INT4"
    clip, plain = by["INT4 + clip p99.9"], by["INT4"]
    clip_note = (
        f"Clipping: INT4 with |w| clipped at each tensor's 99.9th percentile has about the same weight error as plain "
        f"INT4 but perplexity {clip:,.1f} vs {plain:.2f}: "
        + ("the 0.1% largest weights carry the model (outliers matter more than the bulk's precision; compare "
           "LLM.int8's outlier features), so clipping them is not a free trade here." if clip > 2 * plain else
           "clipping the 0.1% largest weights costs little here.")
    )
    if max(by["NF4"], by["NF4 + DQ"]) < by["FP4"] < by["INT4"]:
        verdict = "It holds on this model."
    else:
        verdict = ("It does not fully hold on this model: its weights already sit on a uniform 4-bit grid (Q4_1), "
                   "which favours a uniform format more than a real bf16 checkpoint would; see the weight errors.")
    body = "\n".join([
        f"## quantize_report — `python bench/quantize_report.py` / `peftkit quantize-report` ({machine()}, "
        f"{wall:.0f} s)",
        "",
        f"Bundled `{MODEL}`: the {rows[0]['params']:,} weights of its 210 block linear layers "
        "quantized in each format (block 64; the tied embedding / output head and the norms stay bf16), every "
        "row evaluated in bf16 (dequantize-and-replace, which is what `QuantLinear` computes); perplexity over "
        f"{rows[0]['tokens']:,} tokens of {source} (each text on its own, up to 256 tokens). "
        "Note: the bundled weights come from a Q4_1 GGUF, so every weight is already on a 16-level grid per block "
        "of 32 (with its own offset): these formats re-quantize 4-bit values, and the errors are not those of "
        "the original bf16 model.",
        "",
        table,
        "",
        f"Perplexity order of the 4-bit formats here: {' < '.join(order)} (the QLoRA paper, Pile-CC on LLaMA: "
        f"{paper}, i.e. 27.41 < 31.07 < 34.34). "
        + verdict,
        "",
        clip_note,
        "",
        f"Histogram of real weights with the INT4 and NF4 levels: `bench/out/quantize_report/{png.name}` "
        f"({DEFAULT_LAYER}: one block of 64, and the whole matrix divided by each block's absmax).",
    ])
    if not args.no_write:
        write_section("quantize_report", body)


if __name__ == "__main__":
    main()
