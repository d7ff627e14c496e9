"""`peftkit info`: a model's summary and what a method would adapt and train, without training."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="model summary; what a method would adapt and its trainable parameters",
                       description=__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model folder, hub id, .gguf or bundled name")
    p.add_argument("--method", help="a registered method (see --list-methods)")
    p.add_argument("--all-methods", action="store_true", help="one row per registered method (default settings)")
    p.add_argument("--list-methods", action="store_true", help="list the registered methods")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="method settings, e.g. r=16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from peftkit.core.adapter_io import apply_method
    from peftkit.core.config import parse_override
    from peftkit.core.registry import get_method, list_methods
    from peftkit.errors import PeftkitError
    from peftkit.hardware import describe, matmul_peak, resolve_precision
    from peftkit.methods import lora_native
    from peftkit.models import load_model
    from peftkit.quant import native
    from peftkit.train import attention_native, count_parameters

    if args.list_methods:
        for name in list_methods():
            print(name)
        return 0
    model, tokenizer = load_model(args.model)
    cfg = model.config
    base = count_parameters(model)
    print(f"model: {args.model} ({type(model).__name__}), {base['total']:,} parameters, dtype {model.dtype}")
    print(f"  layers {getattr(cfg, 'num_hidden_layers', '?')}, hidden {getattr(cfg, 'hidden_size', '?')}, "
          f"vocab {getattr(cfg, 'vocab_size', '?')}, chat template: {'yes' if tokenizer.chat_template else 'no'}")
    print(f"4-bit dequantization on CPU: {native.describe()}")
    print(f"LoRA's rank <= {lora_native.MAX_RANK} products on CPU in fp32: {lora_native.describe()}")
    print(f"packed training attention on CPU in fp32: {attention_native.describe()}")
    print(f"this machine: {describe()}")
    print(f"training and generation {resolve_precision('auto').line()}")
    if not torch.cuda.is_available():
        peaks = ", ".join(f"{name} {matmul_peak(dtype) / 1e9:.1f}" for name, dtype in
                          (("fp32", torch.float32), ("bf16", torch.bfloat16)))
        print(f"matmul peak on this CPU (GFLOP/s, measured once and cached; what MFU is measured against): {peaks}")
    methods = list_methods() if args.all_methods else [args.method] if args.method else []
    settings = dict(parse_override(s) for s in args.settings)
    if methods:
        print("\n| method | trainable parameters | % of base | adapted modules |\n|---|---:|---:|---:|")
    for name in methods:
        fresh = model if len(methods) == 1 else load_model(args.model)[0]
        spec = get_method(name)
        try:
            report = apply_method(fresh, name, spec.config_cls.from_dict(settings if len(methods) == 1 else {}))
        except ValueError as e:
            if len(methods) == 1:  # the settings asked for do not fit this model: an error, not a table row
                given = " ".join(args.settings)
                raise PeftkitError(f"--method {name}{' ' + given if given else ''} on {args.model}: {e}") from None
            print(f"| {name} | error: {e} | | |")
            continue
        counts = count_parameters(fresh)
        print(f"| {name} | {counts['trainable']:,} | {100 * counts['trainable'] / base['total']:.3f}% "
              f"| {len(report.adapted)} |")
        if len(methods) == 1:
            for line in report.notes:
                print(f"  note: {line}")
            shown = report.adapted[:8]
            more = f" ... ({len(report.adapted)} in all)" if report.adapted[8:] else ""
            print("  adapts: " + ", ".join(shown) + more)
    return 0
