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
    p.add_argument("--model", help="the base model of an adapter (default: the one it records)")
    p.add_argument("--quantized-base", choices=["none", "nf4", "fp4", "int4", "int8"],
                   help="the format the base was stored in while training (default: as the adapter records; none = "
                        "merge into the full-precision base), as `peftkit merge`")
    p.add_argument("--lora", action="store_true", help="write the LoRA adapter itself (llama.cpp's adapter format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from peftkit.core.adapter_io import CONFIG_NAME
    from peftkit.errors import PeftkitError
    from peftkit.export.gguf import check_output, export_gguf, export_lora_gguf

    out = check_output(args.output, args.overwrite)
    source = Path(args.source)
    if source.exists() and out.exists() and source.resolve() == out.resolve():
        raise PeftkitError(f"output {args.output} is the source itself; choose another file")
    is_adapter = (source / CONFIG_NAME).is_file()
    if not is_adapter and (args.lora or args.model or args.quantized_base):
        flag = "--lora" if args.lora else "--model" if args.model else "--quantized-base"
        raise PeftkitError(f"{flag} needs an adapter folder, and {args.source} is not one (no {CONFIG_NAME})")
    if args.lora:
        from transformers import AutoConfig

        from peftkit.core.context import read_context
        from peftkit.loading import base_name
        from peftkit.models import resolve_model_path

        base = base_name(read_context(source), args.model)  # only its config: llama.cpp's file holds the LoRA alone
        export_lora_gguf(source, AutoConfig.from_pretrained(resolve_model_path(base)), out, args.dtype,
                         overwrite=args.overwrite)
        what = f"LoRA adapter {args.source} (for {base})"
    else:
        if is_adapter:
            from peftkit.commands.merge import merge_adapter
            from peftkit.core.context import read_context

            context = read_context(source)
            model, tokenizer, method, _ = merge_adapter(source, context, args.model, args.quantized_base)
            what = f"{args.source} ({method}) merged into its base"
            if context is not None and context.template_text:
                tokenizer.chat_template = context.template_text  # the template the adapter was trained with
            if context is not None and (context.instruction or context.system):
                shown = ", ".join(f"{k} {v[:60]!r}" for k, v in (("instruction", context.instruction),
                                                              ("system message", context.system)) if v)
                print(f"note: the adapter was trained with a shared {shown}; llama.cpp and Ollama do not add it: "
                      f"put it in each prompt (as {context.input_format!r}) or in Ollama's SYSTEM/TEMPLATE")
        else:
            from peftkit.models import load_model

            model, tokenizer = load_model(args.source)
            what = args.source
        export_gguf(model, tokenizer, out, args.dtype, overwrite=args.overwrite)
    print(f"exported {what} to {out} ({args.dtype}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0
