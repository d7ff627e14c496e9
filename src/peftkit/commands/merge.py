"""`peftkit merge`: fold an adapter into its base model and save a plain Hugging Face model folder.

Every method whose update folds into the base weights merges (LoRA, sparse updates, intrinsic SAID, and the
methods that train base weights: full, top-k layers, BitFit, norms); adapters, prompt and prefix tuning are refused.

The base is the one the adapter records (`peftkit.core.context`; ``--model`` overrides it). An adapter trained on a
quantized base (QLoRA) is merged into the weights it trained on: the base is quantized as training quantized it,
dequantized, and the update added (one line says so); ``--quantized-base none`` merges into the full-precision base
instead. ``--requantize`` quantizes the merged model again (in the recorded format unless one is named) and prints
what that costs (relative weight error, and the held-out loss change on ``--eval-data``).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into the base model, save a normal HF model folder",
                       description=__doc__)
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("output", help="folder for the merged model (written atomically)")
    p.add_argument("--model", help="the base model the adapter was trained on (default: the adapter's recorded "
                                   "base, else smollm2-135m-instruct)")
    p.add_argument("--quantized-base", choices=["none", "nf4", "fp4", "int4", "int8"],
                   help="the format the base was stored in while training (default: as the adapter records; "
                        "none = merge into the full-precision base)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--requantize", nargs="?", const="recorded", choices=["recorded", "nf4", "fp4", "int4", "int8"],
                   help="quantize the merged model again (default format: the recorded one) and report the error")
    p.add_argument("--eval-data", help="instruction data to measure the held-out loss change of --requantize")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=run)


def check_output(adapter: str, output: str, overwrite: bool) -> None:
    """Refuse an output folder that is or contains the adapter, lies inside a training run (even with `overwrite`),
    or holds anything, unless `overwrite`."""
    from pathlib import Path

    from peftkit.errors import PeftkitError

    src, dst = Path(adapter).resolve(), Path(output).resolve()
    if dst == src or dst in src.parents:
        raise PeftkitError(f"output {output} is or contains the adapter {adapter}: the merge would delete its own "
                           "input; choose another folder")
    for folder in (dst, *dst.parents):  # a run's checkpoints and adapter are its resume state: never replaced
        if any((folder / marker).is_file() for marker in ("latest", "run.json", "metrics.jsonl")):
            raise PeftkitError(f"output {output} is inside the training run {folder} (it holds the run's checkpoints "
                               "and adapter, which a merge would replace); choose a folder outside it")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise PeftkitError(f"output {output} exists and is not empty; use --overwrite to replace it")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from peftkit.core.adapter_io import atomic_dir
    from peftkit.core.context import Quantization, read_context
    from peftkit.errors import PeftkitError
    from peftkit.quant import save_quantized

    check_output(args.adapter, args.output, args.overwrite)
    dtype = getattr(torch, args.dtype)
    context = read_context(args.adapter)
    recorded = context.quantization if context is not None else None
    if args.requantize == "recorded" and (args.quantized_base == "none" or not (args.quantized_base or recorded)):
        raise PeftkitError("--requantize: the adapter was not trained on a quantized base; name a format "
                           "(--requantize nf4)")
    merged, tokenizer, name, quant = merge_adapter(args.adapter, context, args.model, args.quantized_base)
    if args.requantize:
        from peftkit.quant.requantize import requantize_with_report

        if args.requantize == "recorded":
            target = quant
        else:  # the named format, with the recorded block size and double quantization
            target = dataclasses.replace(quant, format=args.requantize) if quant else Quantization(args.requantize)
        loss_fn = _held_out_loss(tokenizer, args.eval_data) if args.eval_data else None
        report = requantize_with_report(merged, target.format, block_size=target.block_size,
                                        double_quant=target.double_quant, compute_dtype=dtype, loss_fn=loss_fn)
        print(report)
        with atomic_dir(args.output) as tmp:
            save_quantized(merged, tmp)
            tokenizer.save_pretrained(tmp)
        print(f"{args.output} holds peftkit's packed {target.format} layout: load it with `peftkit generate --model "
              f"{args.output}` or peftkit.quant.load_quantized (transformers' from_pretrained cannot read it; merge "
              "without --requantize for a folder any loader reads)")
    else:
        merged.to(dtype)
        with atomic_dir(args.output) as tmp:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    print(f"merged {name} adapter into {args.model or (context and context.base) or 'smollm2-135m-instruct'}; "
          f"saved to {args.output}")
    return 0


def merge_adapter(adapter, context, model: str | None = None, quantized_base: str | None = None):
    """`adapter` folded into its base, as `peftkit merge` (and `peftkit export`) do: the merged model (fp32, every
    layer plain), its tokenizer, the method's name, and the quantization of the base it was merged into (None: full
    precision). `context` is the adapter's `read_context`; the base is the recorded one unless `model` names
    another; `quantized_base` overrides the recorded quantization ("none": the full-precision base). One line says
    which base weights the update went into."""
    import torch

    from peftkit.core.adapter_io import load_adapter, read_adapter
    from peftkit.core.merging import merge_and_unload, method_merging
    from peftkit.loading import load_base
    from peftkit.quant import dequantize_model

    name = read_adapter(adapter)[0].name
    method_merging(name)  # refuse a method that cannot merge before loading the model
    base, tokenizer, quant = load_base(context, model, quantized_base)
    print(_base_line(context, quant, quantized_base))
    load_adapter(base, adapter)
    merged = merge_and_unload(base, dtype=torch.float32)
    dequantize_model(merged, torch.float32)  # quantized layers the adapter did not change
    return merged, tokenizer, name, quant


def _base_line(context, quant, asked: str | None) -> str:
    """One line: which base weights the update is added to, and why."""
    recorded = context.quantization if context is not None else None
    if quant is not None:
        how = "as the adapter records" if asked is None else f"as asked (--quantized-base {asked})"
        return (f"base: {quant.describe()}, {how}: merging into the dequantized weights the adapter trained on "
                "(--requantize quantizes the result again)")
    if recorded is not None:
        return (f"base: full precision as asked (--quantized-base none), although the adapter trained on a "
                f"{recorded.describe()} base")
    if context is None:
        return ("base: full precision (the adapter records no training context; --quantized-base FORMAT if it "
                "was trained on a quantized base)")
    return "base: full precision, as the adapter was trained"


def _held_out_loss(tokenizer, path: str, n: int = 32):
    """Mean target-token loss on the first `n` examples of `path`."""
    from peftkit.data import make_rows, read_conversations, tokenize_conversations
    from peftkit.train.evaluator import evaluation_loss

    examples = tokenize_conversations(tokenizer, read_conversations(path)[:n], max_length=512)
    rows = make_rows(examples, 512, packing=False)

    def loss(model) -> float:
        return evaluation_loss(model, rows, tokenizer.pad_token_id, batch_size=8)

    return loss
