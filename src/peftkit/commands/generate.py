"""`peftkit generate`: answer prompts with a base model, or base + adapter (chat template applied)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate answers (base model or base + adapter)", description=__doc__)
    p.add_argument("prompts", nargs="*", help="user messages (default: read one per line from stdin)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model folder, hub id, .gguf or bundled name")
    p.add_argument("--adapter", help="adapter folder (peftkit or Hugging Face peft format)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default)")
    p.add_argument("--template", help="named chat template for models without one (chatml, alpaca)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and compute (auto: bf16 where the hardware computes it natively, else fp32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peftkit.core.adapter_io import load_adapter
    from peftkit.eval.generate import generate
    from peftkit.hardware import resolve_precision, warn_if_slow
    from peftkit.models import load_model

    prompts = args.prompts or [line.strip() for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompts given (as arguments or on stdin)")
    precision = resolve_precision(args.precision)
    warn_if_slow(precision)
    model, tokenizer = load_model(args.model, dtype=precision.weight_dtype)
    if args.adapter:
        load_adapter(model, args.adapter)
    answers = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                       template=args.template)
    for prompt, answer in zip(prompts, answers, strict=True):
        print(f">>> {prompt}\n{answer}\n")
    return 0
