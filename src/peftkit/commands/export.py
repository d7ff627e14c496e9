"""`peftkit export`: write a model, or an adapter merged into its base, as a GGUF file for llama.cpp / Ollama.

`--lora` writes a LoRA adapter in llama.cpp's GGUF adapter format instead (``llama-cli -m base.gguf --lora
adapter.gguf``). The file is written atomically; an existing one is replaced only with `--overwrite`.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model or merged adapter (or, with --lora, a LoRA adapter) as GGUF",
                       description=__doc__)
    p.add_argument("source", help="an adapter folder (merged into --model), or a model: folder, .gguf, hub id or "
                                  "smollm2-135m-instruct")
    p.add_argument("output", help="the .gguf file to write")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16",
                   help="storage of the weight matrices (norms stay f32; default f16; --lora: f32, f16 or bf16)")
    p.add_argument("--model", help="the base model of an adapter (default smollm2-135m-instruct)")
    p.add_argument("--quantized-base", choices=["nf4", "fp4", "int4", "int8"],
                   help="the adapter was trained on a base quantized to this format (QLoRA): merge as `peftkit "
                        "merge` does")
    p.add_argument("--lora", action="store_true", help="write the LoRA adapter itself (llama.cpp's adapter format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from peftkit.core.adapter_io import CONFIG_NAME
    from peftkit.errors import PeftkitError
    from peftkit.export.gguf import check_output, export_gguf, export_lora_gguf
    from peftkit.models import BUNDLED_NAME

    out = check_output(args.output, args.overwrite)
    source = Path(args.source)
    if source.exists() and out.exists() and source.resolve() == out.resolve():
        raise PeftkitError(f"output {args.output} is the source itself; choose another file")
    is_adapter = (source / CONFIG_NAME).is_file()
    if not is_adapter and (args.lora or args.model or args.quantized_base):
        flag = "--lora" if args.lora else "--model" if args.model else "--quantized-base"
        raise PeftkitError(f"{flag} needs an adapter folder, and {args.source} is not one (no {CONFIG_NAME})")
    base = args.model or BUNDLED_NAME
    if args.lora:
        from transformers import AutoConfig

        from peftkit.models import resolve_model_path

        export_lora_gguf(source, AutoConfig.from_pretrained(resolve_model_path(base)), out, args.dtype,
                         overwrite=args.overwrite)
        what = f"LoRA adapter {args.source} (for {base})"
    else:
        if is_adapter:
            model, tokenizer, method = merged_model(source, base, args.quantized_base)
            what = f"{args.source} ({method}) merged into {base}"
        else:
            from peftkit.models import load_model

            model, tokenizer = load_model(args.source)
            what = args.source
        export_gguf(model, tokenizer, out, args.dtype, overwrite=args.overwrite)
    print(f"exported {what} to {out} ({args.dtype}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def merged_model(adapter, base: str, quantized_base: str | None = None):
    """The base model with the adapter folded in, its tokenizer, and the method's name (as `peftkit merge`)."""
    import torch

    from peftkit import get_method, load_adapter, load_model, merge_and_unload, quantize_model
    from peftkit.errors import PeftkitError

    model, tokenizer = load_model(base)
    if quantized_base:
        quantize_model(model, quantized_base, compute_dtype=torch.float32)
    load_adapter(model, adapter)
    name = model.peftkit_method[0]
    if not get_method(name).can_merge:
        raise PeftkitError(f"method {name!r} cannot be merged into the base weights, so it cannot be exported "
                           "as one GGUF model")
    merged = merge_and_unload(model, dtype=torch.float32)
    del merged.peftkit_method
    return merged, tokenizer, name
