"""The `peftkit` command line: one entry point, one module per sub-command under `peftkit.commands`.

Each command module exposes `add_parser(subparsers)`, which registers its parser and sets `func=run`.
Errors are one clear line (exit status 2) unless `--debug` is given.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# One line per sub-command; the module is imported only when the CLI starts.
COMMANDS: tuple[str, ...] = (
    "demo",
    "train",
    "info",
    "generate",
    "merge",
    "export",
    "memory",
    "quantize_report",
    "compare",
    "serve",
    "studio",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"peftkit.commands.{name}").add_parser(sub)
    return parser


# The positional that collects a command's ``key=value`` settings.
_KEY_VALUE_DESTS = ("overrides", "settings")


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parse_args`, except that ``key=value`` settings may also follow options (``memory llama-2-7b --method lora
    r=16``): argparse fills a ``*`` positional only once, in the first run of positionals."""
    args, extra = parser.parse_known_args(argv)
    dest = next((d for d in _KEY_VALUE_DESTS if isinstance(getattr(args, d, None), list)), None)
    if extra and dest and all("=" in item and not item.startswith("-") for item in extra):
        getattr(args, dest).extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("peftkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's one place that turns errors into a line
        if args.debug:
            raise
        report_error(f"peftkit {args.command}: error: {type(e).__name__}: {e}")
        return 2


def report_error(line: str) -> None:
    """Print a command's error line to stderr.

    Under torchrun the line is also the process's recorded root cause (``TORCHELASTIC_ERROR_FILE``), which
    torchrun's failure summary shows instead of "<N/A>". A rank other than 0 prints only an error that names it
    ("rank 1 of 2: ..."): the others (recipe, data, resume checks) every rank raises alike, and rank 0 prints
    them once.
    """
    import json
    import os
    import time

    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        try:
            with open(error_file, "w") as f:
                json.dump(data, f)
        except OSError:
            pass  # the line below still says it
    if error_file and os.environ.get("PEFTKIT_LAUNCHER") == "1":
        return  # `peftkit train --nproc-per-node`: the launcher prints the failing rank's line, once
    rank = os.environ.get("RANK")
    if rank in (None, "0") or f"rank {rank} " in line:
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
