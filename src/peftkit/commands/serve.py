"""`peftkit serve`: an OpenAI-compatible HTTP server for a base model and any number of its LoRA adapters.

Requests for different adapters share one forward pass (continuous batching; see `peftkit.serve`). Needs the
``serve`` extra: ``pip install 'peftkit[serve]'`` (FastAPI and uvicorn).
"""

from __future__ import annotations

import argparse
import os
import sys


def _adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model and its LoRA adapters over an OpenAI-compatible HTTP API",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model folder, hub id, .gguf or bundled name")
    p.add_argument("--adapter", action="append", default=[], type=_adapter, metavar="NAME=PATH",
                   help="a LoRA adapter folder, asked for as model NAME (repeatable)")
    p.add_argument("--served-name", help="the name of the base model in requests (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("PEFTKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $PEFTKIT_API_KEY; unset: no key)")
    p.add_argument("--quantize", choices=["nf4", "fp4", "int4", "int8"],
                   help="quantize the base model's linear layers (a QLoRA adapter's base)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and compute (auto: bf16 where the hardware computes it natively, else fp32)")
    p.add_argument("--template", help="named chat template for models without one (chatml, alpaca)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 429")
    p.add_argument("--max-model-len", type=int, help="prompt + new tokens at most (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens of a chat request that sets none")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight may take to finish after Ctrl-C / SIGTERM")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from peftkit.serve.app import create_app
    except ImportError as e:
        raise ImportError(f"peftkit serve needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'peftkit[serve]'") from None
    from peftkit.errors import PeftkitError
    from peftkit.hardware import resolve_precision, warn_if_slow
    from peftkit.models import load_model
    from peftkit.serve.engine import Engine
    from peftkit.serve.lora_batch import read_lora

    names = [name for name, _ in args.adapter]
    if len(set(names)) != len(names):
        raise PeftkitError(f"--adapter names must differ; got {', '.join(names)}")
    precision = resolve_precision(args.precision)
    warn_if_slow(precision)
    model, tokenizer = load_model(args.model, dtype=precision.weight_dtype)
    if args.quantize:
        from peftkit.quant import quantize_model

        quantize_model(model, args.quantize, compute_dtype=precision.compute_dtype)
    base_name = args.served_name or args.model
    if base_name in names:
        raise PeftkitError(f"adapter name {base_name!r} is the base model's name; choose another")
    engine = Engine(model, tokenizer, base_name, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_model_len=args.max_model_len)
    for name, path in args.adapter:  # all read and checked before the port opens
        engine.add_adapter(name, read_lora(path, model))
    app = create_app(engine, api_key=args.api_key, template=args.template, default_max_tokens=args.max_tokens,
                     shutdown_timeout=args.shutdown_timeout)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            engine.close()  # new requests get 503 while the accepted ones finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    print(f"peftkit serve: {', '.join(engine.models())} on http://{args.host}:{args.port}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr)
    Server(config).run()
    return 0
