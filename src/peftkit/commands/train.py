"""`peftkit train RECIPE.yaml [key=value ...]`: fine-tune as a recipe says (``method_config.r=16`` sets a method key).

Runs under torchrun / `accelerate launch` unchanged: every process reads the same recipe, rank 0 writes.
SIGTERM (``kill PID``: what a process manager or a UI sends) stops the run at the next step boundary after a
checkpoint; ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import json
import os


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a model from a YAML recipe", description=__doc__)
    p.add_argument("recipe", nargs="?", help="YAML recipe (keys of TrainConfig); omit to use only overrides")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="train with N processes on this machine (torchrun's launcher, run by peftkit: a process "
                        "that fails or is killed ends the run with one line naming it)")
    p.set_defaults(func=run)


def launch(args: argparse.Namespace) -> int:
    """`peftkit train --nproc-per-node N`: torchrun's elastic launcher in this process, its failure report turned
    into one line (the failing rank, how it ended, its own error line) instead of torchrun's traceback."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as elastic_run

    from peftkit.errors import PeftkitError

    if args.nproc_per_node < 1:
        raise PeftkitError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    again = [*([args.recipe] if args.recipe else []), *args.overrides, *(["--resume"] if args.resume else []),
             *(["--overwrite"] if args.overwrite else [])]
    launcher = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={args.nproc_per_node}",
                                             "-m", "peftkit.cli", "train", *again])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # one line below says it all
    os.environ["PEFTKIT_LAUNCHER"] = "1"  # the workers record their error lines; this process prints the first
    try:
        elastic_run(launcher)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        how = f"was stopped by {failure.signal_name()}" if failure.signal_name() != "<N/A>" else \
            f"exited with status {failure.exitcode}"
        reason = message.split(": error: ", 1)[-1] if message else "no error recorded (its output above says why)"
        others = f" ({len(e.failures) - 1} other rank(s) stopped too)" if len(e.failures) > 1 else ""
        raise PeftkitError(f"rank {rank} of {args.nproc_per_node} {how}{others}: {reason}") from None
    finally:
        os.environ.pop("PEFTKIT_LAUNCHER", None)
    return 0


def run(args: argparse.Namespace) -> int:
    from peftkit.hardware import resolve_precision
    from peftkit.train import Trainer, load_recipe
    from peftkit.train.checkpoint import finished_run

    if getattr(args, "nproc_per_node", None) and "LOCAL_RANK" not in os.environ:
        return launch(args)
    recipe = args.recipe
    overrides = list(args.overrides)
    if recipe and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, overrides = None, [recipe, *overrides]
    cfg = load_recipe(recipe, overrides)
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    if args.resume and (done := finished_run(trainer.output_dir, trainer.total_steps)):
        if trainer.plan.is_main:
            print(f"peftkit: {done}")  # the one line: a finished run resumed has nothing to train
        return 0
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(resolve_precision(cfg.precision).line())
    plan, data = trainer.plan, trainer.plan.data
    p = plan.params
    if plan.is_main:
        print(f"{plan.method}: {p['trainable']:,} trainable of {p['total']:,} parameters ({p['percent']:.3f}%)")
        print(f"data: {data.examples} examples, {data.target_tokens:,} target / {data.prompt_tokens:,} prompt "
              f"tokens; truncated {data.truncated}, dropped {data.dropped}, bad rows skipped {data.bad_rows_skipped}; "
              f"{data.rows} rows, {plan.total_steps} steps")
        for reason in data.skipped_reasons[:3]:
            print(f"  skipped: {reason}")
    _stop_on_sigterm(trainer)
    result = trainer.run()
    if result.stopped and result.is_main:
        print(f"stopped at step {result.steps} of {plan.total_steps}: --resume continues from the checkpoint there")
    if result.is_main:
        _print_result(result, cfg.save_best)
    return 0


def _stop_on_sigterm(trainer) -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        signal.signal(signal.SIGTERM, lambda signum, frame: trainer.request_stop())


def _print_result(result, save_best: str | None) -> None:
    mfu = f", {result.mfu:.0%} of the matmul peak" if result.mfu is not None else ""
    print(f"done: {result.steps} steps in {result.train_seconds:.0f} s ({result.target_tokens_per_s:.0f} target "
          f"tokens/s{mfu}); train loss {result.train_loss:.4f}"
          + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))
    scores = {k: v for k, v in result.final_scores.items() if k != "eval_loss"}
    if scores:
        print("eval: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in scores.items()))
    print(f"adapter: {result.adapter_dir}\nlog: {result.output_dir / 'metrics.jsonl'}  plot: "
          f"{result.output_dir / 'loss.png'}")
    best = result.output_dir / "best.json"
    if save_best and best.is_file():
        print(f"best: {result.output_dir / 'best'} ({json.loads(best.read_text())})")
    if result.trackers:
        print(f"tracking ({', '.join(result.trackers)}): under {result.output_dir}")
