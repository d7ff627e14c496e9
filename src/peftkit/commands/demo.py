"""`peftkit demo`: fine-tune the bundled model on the shipped order-extraction task, before/after table."""

from __future__ import annotations

import argparse

from peftkit.core.config import parse_override


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="fine-tune the bundled model on a shipped task and show before/after",
                       description=__doc__)
    p.add_argument("--n-test", type=int, default=60, help="held-out messages to score (default 60)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides, e.g. epochs=2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peftkit.demo import run_demo

    run_demo(n_test=args.n_test, overrides=dict(parse_override(o) for o in args.overrides))
    return 0
