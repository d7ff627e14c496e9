"""`peftkit quantize-report`: each weight format on a real model: bits per parameter, weight error, perplexity.

Quantizes every linear layer but the output head in INT8, INT4, INT4 with clipping, FP4, NF4 and NF4 + double
quantization (block 64), evaluates each on held-out text next to the unquantized model (in bf16 where the hardware
computes it natively, else fp32: ``--precision``), prints the
table, and writes ``quantize_report.json`` and ``quantize_levels.png`` (a histogram of real weights of
``model.layers.0.self_attn.q_proj`` with the INT4 and NF4 levels over it) into ``--out``.

Text: the ``output`` fields of the last ``--samples`` rows (of 200+ characters) of Alpaca
(``shared/data/alpaca/alpaca_5000.json`` next to the repository, or ``--data``: JSON/JSONL rows with an ``output``
field, or a text file of paragraphs separated by blank lines); without it, the customer messages of the demo task
that ships with peftkit.

Example::

    peftkit quantize-report --samples 50 --out runs/quantize-report
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_LAYER = "model.layers.0.self_attn.q_proj"


def add_parser(sub: argparse._SubParsersAction) -> None:
    # the module name as an alias: `peftkit quantize_report` works too (tests call every command by module name)
    p = sub.add_parser("quantize-report", aliases=["quantize_report"],
                       help="bits/param, weight error and perplexity of each 4/8-bit format",
                       description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--model", default="smollm2-135m-instruct", help="model folder, hub id, .gguf or the bundled name")
    p.add_argument("--out", default="quantize-report", metavar="DIR", help="folder for the JSON and the PNG")
    p.add_argument("--samples", type=int, default=50, metavar="N", help="text samples to score (default 50)")
    p.add_argument("--data", default=None, help="text source (default: Alpaca outputs, else the demo task)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per sample at most")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layer", default=DEFAULT_LAYER, help="linear layer whose weights the histogram shows")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute dtype of the evaluation (auto: bf16 where native, else fp32)")
    p.set_defaults(func=run)


def default_text_source() -> Path | None:
    """Alpaca next to the repository (``../shared/data``), if present."""
    import peftkit

    path = Path(peftkit.__file__).resolve().parents[2].parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
    return path if path.is_file() else None


def sample_texts(n: int, path: str | Path | None = None, min_chars: int = 200) -> tuple[list[str], str]:
    """Up to `n` held-out texts and a description of where they came from.

    JSON/JSONL sources give the ``output`` field of their last rows with at least `min_chars` characters (the
    tail of the file: training runs take the head); a text file gives its paragraphs; without a source, the
    customer messages of the bundled demo task (all of them, whatever their length).
    """
    from peftkit.errors import PeftkitError

    if n <= 0:
        raise PeftkitError(f"--samples must be > 0, got {n}")
    source = Path(path) if path is not None else default_text_source()
    if source is None:
        from peftkit.demo import task_file

        rows = [json.loads(line) for line in task_file("test").read_text().splitlines() if line.strip()]
        texts = [r["input"] for r in rows][:n]
        return texts, f"demo task customer messages ({len(texts)})"
    if not source.is_file():
        raise PeftkitError(f"text source not found: {source}")
    if source.suffix in (".json", ".jsonl"):
        text = source.read_text()
        rows = json.loads(text) if source.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        outputs = [str(r["output"]).strip() for r in rows if isinstance(r, dict) and r.get("output")]
        if not outputs:
            raise PeftkitError(f"{source}: no rows with an 'output' field")
        long = [t for t in reversed(outputs) if len(t) >= min_chars]
        texts = (long or list(reversed(outputs)))[:n]
        return texts, f"{source.name}: 'output' of the last {len(texts)} rows with >= {min_chars} characters"
    texts = [p.strip() for p in source.read_text().split("\n\n") if p.strip()][:n]
    return texts, f"{source.name}: {len(texts)} paragraphs"


def token_batches(tokenizer: Any, texts: list[str], max_length: int = 256, batch_size: int = 8) -> list[dict]:
    """Tokenize, truncate to `max_length`, sort by length and pad (right) into batches with attention masks."""
    import torch

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    ids = sorted((x for x in ids if len(x) >= 2), key=len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for i in range(0, len(ids), batch_size):
        group = ids[i : i + batch_size]
        width = max(map(len, group))
        input_ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, x in enumerate(group):
            input_ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


def run(args: argparse.Namespace) -> int:
    import torch

    from peftkit.errors import PeftkitError
    from peftkit.hardware import resolve_precision, warn_if_slow
    from peftkit.models import load_model
    from peftkit.quant.report import format_model_report, model_report, plot_levels

    if args.max_length < 2 or args.batch_size <= 0:
        raise PeftkitError("--max-length must be >= 2 and --batch-size > 0")
    precision = resolve_precision(args.precision)
    print(precision.line())
    warn_if_slow(precision)
    texts, source = sample_texts(args.samples, args.data)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    batches = token_batches(tokenizer, texts, args.max_length, args.batch_size)
    if not batches:
        raise PeftkitError("no text sample has two tokens or more")
    rows = model_report(model, batches, compute_dtype=precision.compute_dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        layer = model.get_submodule(args.layer)
    except AttributeError:
        raise PeftkitError(f"--layer {args.layer!r} is not a module of the model") from None
    weight = layer.weight.detach().float()  # type: ignore[operator]
    png = plot_levels(weight.reshape(-1)[:64], weight, out / "quantize_levels.png",
                      title=f"{args.layer}: real weights vs INT4 and NF4 levels (block 64)")
    result = {"model": args.model, "text": source, "samples": len(texts), "max_length": args.max_length,
              "compute_dtype": str(precision.compute_dtype).removeprefix("torch."), "rows": rows,
              "histogram": {"layer": args.layer, "png": png.name}}
    (out / "quantize_report.json").write_text(json.dumps(result, indent=2))
    print(f"{args.model}: {rows[0]['params']:,} linear weights quantized; perplexity over {rows[0]['tokens']:,} "
          f"tokens of {source}; {precision.name} compute\n")
    print(format_model_report(rows))
    print(f"\nwrote {out / 'quantize_report.json'} and {png}")
    return 0
