"""`peftkit merge`: fold an adapter into its base model and save a plain Hugging Face model folder.

Every method whose update folds into the base weights merges (LoRA, sparse updates, intrinsic SAID, and the
methods that train base weights: full, top-k layers, BitFit, norms); adapters, prompt and prefix tuning are refused.

A 4-bit (QLoRA) base is dequantized before the merge. `--requantize nf4` quantizes the merged model again and
prints what that costs (relative weight error, and the held-out loss change on `--eval-data`).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into the base model, save a normal HF model folder",
                       description=__doc__)
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("output", help="folder for the merged model (written atomically)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the base model the adapter was trained on")
    p.add_argument("--quantized-base", choices=["nf4", "fp4", "int4", "int8"],
                   help="the adapter was trained on a base quantized to this format (QLoRA)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--requantize", choices=["nf4", "fp4", "int4", "int8"],
                   help="quantize the merged model again and report the error")
    p.add_argument("--eval-data", help="instruction data to measure the held-out loss change of --requantize")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=run)


def check_output(adapter: str, output: str, overwrite: bool) -> None:
    """Refuse an output folder that is or contains the adapter, or holds anything, unless `overwrite`."""
    from pathlib import Path

    from peftkit.errors import PeftkitError

    src, dst = Path(adapter).resolve(), Path(output).resolve()
    if dst == src or dst in src.parents:
        raise PeftkitError(f"output {output} is or contains the adapter {adapter}: the merge would delete its own "
                           "input; choose another folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise PeftkitError(f"output {output} exists and is not empty; use --overwrite to replace it")


def run(args: argparse.Namespace) -> int:
    import torch

    from peftkit.core.adapter_io import atomic_dir, load_adapter, read_adapter
    from peftkit.core.merging import merge_and_unload, method_merging
    from peftkit.models import load_model
    from peftkit.quant import quantize_model, save_quantized

    check_output(args.adapter, args.output, args.overwrite)
    method_merging(read_adapter(args.adapter)[0].name)  # refuse a method that cannot merge before loading the model
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(args.model)
    if args.quantized_base:
        quantize_model(model, args.quantized_base, compute_dtype=torch.float32)
    load_adapter(model, args.adapter)
    name = model.peftkit_method[0]
    merged = merge_and_unload(model, dtype=torch.float32)
    if args.requantize:
        from peftkit.quant.requantize import requantize_with_report

        loss_fn = _held_out_loss(tokenizer, args.eval_data) if args.eval_data else None
        report = requantize_with_report(merged, args.requantize, compute_dtype=dtype, loss_fn=loss_fn)
        print(report)
        with atomic_dir(args.output) as tmp:
            save_quantized(merged, tmp)
            tokenizer.save_pretrained(tmp)
    else:
        merged.to(dtype)
        with atomic_dir(args.output) as tmp:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    print(f"merged {name} adapter into {args.model}; saved to {args.output}")
    return 0


def _held_out_loss(tokenizer, path: str, n: int = 32):
    """Mean target-token loss on the first `n` examples of `path`."""
    import torch

    from peftkit.data import collate, make_rows, read_conversations, tokenize_conversations
    from peftkit.train.trainer import sequence_loss

    examples = tokenize_conversations(tokenizer, read_conversations(path)[:n], max_length=512)
    rows = make_rows(examples, 512, packing=False)

    @torch.no_grad()
    def loss(model) -> float:
        total, count = 0.0, 0
        for i in range(0, len(rows), 8):
            value, k = sequence_loss(model.eval(), collate(rows[i:i + 8], tokenizer.pad_token_id))
            total, count = total + float(value), count + k
        return total / max(count, 1)

    return loss
