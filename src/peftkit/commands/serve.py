"""`peftkit serve`: an OpenAI-compatible HTTP server for a base model and any number of its LoRA adapters.

Requests for different adapters share one forward pass (continuous batching; see `peftkit.serve`). Needs the
``serve`` extra: ``pip install 'peftkit[serve]'`` (FastAPI and uvicorn).

The adapters' recorded training context (`peftkit.core.context`) decides the defaults, as in ``peftkit generate``:
the base is the one they were trained on and is stored as they were trained (a QLoRA adapter's NF4), and an adapter
trained on other base weights is refused. Adapters that disagree on the base need --model / --quantize.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from collections.abc import Callable
from typing import Any


def _adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model and its LoRA adapters over an OpenAI-compatible HTTP API",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder, hub id, .gguf or bundled name (default: the base the adapters "
                                   "were trained on, else smollm2-135m-instruct)")
    p.add_argument("--adapter", action="append", default=[], type=_adapter, metavar="NAME=PATH",
                   help="a LoRA adapter folder, asked for as model NAME (repeatable)")
    p.add_argument("--served-name", help="the name of the base model in requests (default: --model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback only; any other needs --api-key or --insecure-no-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("PEFTKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $PEFTKIT_API_KEY; unset: no key)")
    p.add_argument("--insecure-no-key", action="store_true",
                   help="listen on a non-loopback --host without an API key (anyone who reaches it may use it)")
    p.add_argument("--adapter-root", metavar="DIR",
                   help="adapters load only from folders under DIR (symlinks resolved), --adapter ones included, and "
                        "clients may load them with POST /v1/adapters (default: none: only --adapter ones, from "
                        "anywhere; POST /v1/adapters is refused)")
    p.add_argument("--quantize", choices=["none", "nf4", "fp4", "int4", "int8"],
                   help="store the base's linear layers in this format (default: as the adapters were trained, e.g. "
                        "a QLoRA adapter's NF4; none = full precision)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="serve adapters trained on other base weights (with a warning) instead of refusing them")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and compute (auto: bf16 where the hardware computes it natively, else fp32)")
    p.add_argument("--template", help="named chat template for models without one (chatml, alpaca)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 429")
    p.add_argument("--max-prefill-tokens", type=int, default=8192,
                   help="prompt tokens in one forward pass at most (each prompt alone, longer ones in chunks)")
    p.add_argument("--max-model-len", type=int, help="prompt + new tokens at most (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens of a chat request that sets none")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight may take to finish after Ctrl-C / SIGTERM")
    p.set_defaults(func=run)


def _agreed(recorded: dict[str, Any], what: str, flag: str, show: Callable[[Any], str] = str) -> Any:
    """The one value the adapters recorded for `what` (None when none recorded it); an error when they differ."""
    values = list(dict.fromkeys(recorded.values()))
    if len(values) > 1:
        from peftkit.errors import PeftkitError

        each = ", ".join(f"{name}: {show(value)}" for name, value in recorded.items())
        raise PeftkitError(f"the adapters were trained on different {what} ({each}); choose one with {flag}")
    return values[0] if values else None


def build_engine(args: argparse.Namespace):
    """The `Engine` `peftkit serve` runs: the base loaded and stored as the adapters were trained (unless the flags
    say otherwise), every adapter read and checked against it. Notes and warnings go to stderr."""
    from peftkit.core.context import read_context
    from peftkit.errors import PeftkitError
    from peftkit.serve.engine import Engine

    names = [name for name, _ in args.adapter]
    if len(set(names)) != len(names):
        raise PeftkitError(f"--adapter names must differ; got {', '.join(names)}")
    folders = _adapter_folders(args)  # outside --adapter-root: refused before anything is read
    contexts = {name: read_context(path) for name, path in folders.items()}  # a bad block fails before loading
    contexts = {name: c for name, c in contexts.items() if c is not None}
    model, tokenizer, model_name, base_fingerprint = _load_base(args, contexts)
    base_name = args.served_name or model_name
    if base_name in names:
        raise PeftkitError(f"adapter name {base_name!r} is the base model's name; choose another")
    engine = Engine(model, tokenizer, base_name, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_model_len=args.max_model_len, max_prefill_tokens=args.max_prefill_tokens,
                    base_fingerprint=base_fingerprint, allow_base_mismatch=args.allow_base_mismatch,
                    adapter_root=args.adapter_root)
    for name, folder in folders.items():  # all read and checked before the port opens
        engine.load_adapter(name, folder)
        for warning in engine.warnings[name]:
            print(f"peftkit serve: warning: {warning}", file=sys.stderr)
    return engine


def _adapter_folders(args: argparse.Namespace) -> dict[str, Any]:
    """NAME -> folder of every --adapter (relative to the current folder), each under --adapter-root if given."""
    from peftkit.errors import PeftkitError
    from peftkit.serve.registry import adapter_folder, resolve_root

    root = None if args.adapter_root is None else resolve_root(args.adapter_root)
    folders = {}
    for name, path in args.adapter:
        try:
            folders[name] = adapter_folder(root, os.path.abspath(path))
        except PeftkitError:
            raise PeftkitError(f"--adapter {name}={path}: not an adapter folder under --adapter-root {root}") from None
    return folders


def _load_base(args: argparse.Namespace, contexts: dict[str, Any]) -> tuple[Any, Any, str, str | None]:
    """(model, tokenizer, name, fingerprint): the base the flags or the adapters' records ask for, stored as they
    ask (quantized after its fingerprint is taken: the adapters' records were taken on the unquantized weights)."""
    from peftkit.hardware import resolve_precision, warn_if_slow
    from peftkit.loading import base_quantization, load_base_as
    from peftkit.models import BUNDLED_NAME

    model_name = args.model or _agreed({n: c.base for n, c in contexts.items() if c.base}, "bases", "--model")
    model_name = model_name or BUNDLED_NAME
    quant = None
    if args.quantize is None:
        quant = _agreed({n: c.quantization for n, c in contexts.items()}, "base formats", "--quantize none|nf4|...",
                        lambda q: "full precision" if q is None else q.describe())
    else:  # the format asked for, with the block size and source dtype the adapters recorded
        agreed = {c.quantization for c in contexts.values() if c.quantization is not None}
        quant = base_quantization(agreed.pop() if len(agreed) == 1 else None, args.quantize)
    precision = resolve_precision(args.precision)
    warn_if_slow(precision)
    base = load_base_as(model_name, quant, precision.weight_dtype, precision.compute_dtype)
    model, tokenizer, base_fingerprint = base.model, base.tokenizer, base.fingerprint
    if quant is not None:
        why = "as the adapters were trained" if args.quantize is None else "as asked"
        print(f"peftkit serve: base stored {quant.describe()}, {why}"
              + (" (--quantize none: full precision)" if args.quantize is None else ""), file=sys.stderr)
    return model, tokenizer, model_name, base_fingerprint


def check_exposure(host: str, api_key: str | None, insecure_no_key: bool) -> None:
    """Refuse to listen beyond loopback without an API key, unless asked to (`--insecure-no-key`)."""
    from peftkit.errors import PeftkitError

    if api_key or is_loopback(host):
        return
    if not insecure_no_key:
        raise PeftkitError(f"--host {host} is not a loopback address and no API key is set, so anyone who can reach "
                           "it could use it: set --api-key KEY (or $PEFTKIT_API_KEY), or pass --insecure-no-key")
    print(f"peftkit serve: warning: listening on {host} without an API key (--insecure-no-key)", file=sys.stderr)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening: a busy port fails here, in one line, before anything
    loads (uvicorn would only find out after the model has loaded)."""
    from peftkit.errors import PeftkitError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise PeftkitError(f"--host {host}: not an address to listen on ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses its port at once
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise PeftkitError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server on that port? "
                           "choose another with --port)") from None
    return sock


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from peftkit.serve.app import create_app
    except ImportError as e:
        raise ImportError(f"peftkit serve needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'peftkit[serve]'") from None

    check_exposure(args.host, args.api_key, args.insecure_no_key)
    sock = bind(args.host, args.port)
    try:
        engine = build_engine(args)
    except BaseException:
        sock.close()
        raise
    app = create_app(engine, api_key=args.api_key, template=args.template, default_max_tokens=args.max_tokens,
                     shutdown_timeout=args.shutdown_timeout)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            engine.close()  # new requests get 503 while the accepted ones finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=args.shutdown_timeout)
    sock.listen(config.backlog)  # connections wait from now on, so the URL below is good as soon as it is printed
    host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    print(f"peftkit serve: {', '.join(engine.models())} on http://{host}:{sock.getsockname()[1]}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr)
    Server(config).run(sockets=[sock])
    return 0
