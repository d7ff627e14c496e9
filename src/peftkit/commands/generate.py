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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peftkit.core.adapter_io import load_adapter
    from peftkit.eval.generate import generate
    from peftkit.models import load_model

    prompts = args.prompts or [line.strip() for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompts given (as arguments or on stdin)")
    model, tokenizer = load_model(args.model)
    if args.adapter:
        load_adapter(model, args.adapter)
    answers = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                       template=args.template)
    for prompt, answer in zip(prompts, answers, strict=True):
        print(f">>> {prompt}\n{answer}\n")
    return 0
