"""`peftkit merge`: fold an adapter into its base model and save a plain Hugging Face model folder."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into the base model, save a normal HF model folder",
                       description=__doc__)
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("output", help="folder for the merged model (written atomically)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the base model the adapter was trained on")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from peftkit.core.adapter_io import atomic_dir, load_adapter
    from peftkit.core.registry import get_method
    from peftkit.errors import PeftkitError
    from peftkit.methods.lora import merge_and_unload
    from peftkit.models import load_model

    model, tokenizer = load_model(args.model)
    load_adapter(model, args.adapter)
    name = model.peftkit_method[0]
    if not get_method(name).can_merge:
        raise PeftkitError(f"method {name!r} cannot be merged into the base weights")
    dtype = getattr(torch, args.dtype)
    merged = merge_and_unload(model).to(dtype)
    del merged.peftkit_method

    with atomic_dir(args.output) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged {name} adapter into {args.model}; saved to {args.output}")
    return 0
