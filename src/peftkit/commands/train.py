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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peftkit.hardware import resolve_precision
    from peftkit.train import Trainer, load_recipe

    recipe = args.recipe
    overrides = list(args.overrides)
    if recipe and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, overrides = None, [recipe, *overrides]
    cfg = load_recipe(recipe, overrides)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(resolve_precision(cfg.precision).line())
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
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
