"""`peftkit generate`: answer prompts with a base model, or base + adapter (chat template applied).

With an adapter, the prompts go in as its training saw them (`peftkit.core.context`): each message is put after
the instruction the training rows shared, with their system message, in the chat template they were rendered with,
on the base they were trained on (recorded name, quantized as it was). Flags override each part; ``--no-context``
sends the prompts as typed, in the model's own template, to the full-precision base.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate answers (base model or base + adapter)", description=__doc__)
    p.add_argument("prompts", nargs="*", help="user messages (default: read one per line from stdin)")
    p.add_argument("--model", help="model folder, hub id, .gguf or bundled name (default: the adapter's recorded "
                                   "base, else smollm2-135m-instruct)")
    p.add_argument("--adapter", help="adapter folder (peftkit or Hugging Face peft format)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default)")
    p.add_argument("--template", help="named chat template (chatml, alpaca, model = the tokenizer's own); default: "
                                      "the adapter's recorded one, else the model's")
    p.add_argument("--instruction", help="put each prompt after this instruction (default: the adapter's recorded "
                                         "one; '' for none)")
    p.add_argument("--system", help="system message (default: the adapter's recorded one; '' for none)")
    p.add_argument("--quantized-base", choices=["none", "nf4", "fp4", "int4", "int8"],
                   help="store the base in this format (default: as the adapter's training did; none = full precision)")
    p.add_argument("--no-context", "--raw", dest="no_context", action="store_true",
                   help="ignore what the adapter recorded: prompts as typed, the model's template, full-precision base")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and compute (auto: bf16 where the hardware computes it natively, else fp32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from peftkit.core.adapter_io import load_adapter
    from peftkit.core.context import TrainingContext, read_context
    from peftkit.generation import generate
    from peftkit.hardware import resolve_precision, warn_if_slow
    from peftkit.loading import load_base

    prompts = args.prompts or [line.strip() for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompts given (as arguments or on stdin)")
    precision = resolve_precision(args.precision)
    warn_if_slow(precision)
    recorded = read_context(args.adapter) if args.adapter and not args.no_context else None
    model, tokenizer, quantization = load_base(recorded, args.model, args.quantized_base,
                                               dtype=precision.weight_dtype, compute_dtype=precision.compute_dtype)
    if args.adapter:
        load_adapter(model, args.adapter)
    context = recorded or TrainingContext()
    changes: dict[str, Any] = {k: v or None for k, v in {"instruction": args.instruction, "system": args.system}.items()
               if v is not None}
    if args.template:
        changes.update(template=args.template, template_text=None)
    context = dataclasses.replace(context, base=args.model or context.base, quantization=quantization, **changes)
    if recorded is not None:
        print(f"peftkit: prompts as the adapter was trained: {context.describe()} (--no-context: as typed)",
              file=sys.stderr)
    answers = generate(model, tokenizer, [context.conversation(p) for p in prompts], max_new_tokens=args.max_new_tokens,
                       num_beams=args.num_beams, template=context.chat_template)
    for prompt, answer in zip(prompts, answers, strict=True):
        print(f">>> {prompt}\n{answer}\n")
    return 0
