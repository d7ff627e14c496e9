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
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"peftkit.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        print(f"peftkit {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
