"""`peftkit compare`: run several methods (and in-context learning) on the same model, data and budget.

Each method runs in its own process (a crash is reported in its row, the others still run; peak memory is that
process's own). Writes results.md, results.csv, results.json and bleu_vs_params.png to --out.

Examples:
    peftkit compare --task e2e --n-train 1000 --n-eval 100 --methods icl,lora,qlora,full
    peftkit compare --data train.jsonl --eval-data test.jsonl --methods lora,prompt epochs=2 batch_size=4
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from peftkit.eval.compare import DEFAULT_ENTRIES, DEFAULT_METHODS

    p = sub.add_parser("compare", help="compare methods on the same data and budget (table + plot)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["e2e"], default=None,
                   help="a built-in task: e2e = E2E NLG from ../shared/data/e2e (or --e2e-root)")
    p.add_argument("--data", help="training data file (instead of --task)")
    p.add_argument("--eval-data", help="evaluation rows (output = reference, or a 'references' list)")
    p.add_argument("--n-train", type=int, default=1000, help="e2e: first N training rows (default 1000)")
    p.add_argument("--n-eval", type=int, default=100, help="evaluation prompts (default 100)")
    p.add_argument("--e2e-root", default=None, help="folder with the E2E CSV files")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated entries (default {','.join(DEFAULT_METHODS)}); "
                        f"known: {', '.join(DEFAULT_ENTRIES)}, and every registered method and preset by its name")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model folder, hub id, .gguf or bundled name")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--no-probe", action="store_true", help="skip the forgetting probe")
    p.add_argument("--metrics", choices=["all", "bleu-nist"], default="all",
                   help="all five E2E metrics (needs Java) or BLEU and NIST only")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit for evaluation (64)")
    p.add_argument("--probe-new-tokens", type=int, default=48, help="answer length limit on the probe (48)")
    p.add_argument("--eval-batch-size", type=int, default=16, help="prompts per generation batch (16)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per method (default no limit)")
    p.add_argument("--replay-data", default=None,
                   help="general instruction data for the forgetting mitigations (full+replay, full+ewc)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="TrainConfig keys for every method, e.g. epochs=2 batch_size=4")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peftkit.core.config import parse_override
    from peftkit.errors import PeftkitError
    from peftkit.eval.compare import check_entries, e2e_task, file_task, run_compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    overrides = dict(parse_override(o) for o in args.overrides)
    check_entries(methods, replay_data=args.replay_data, overrides=overrides)  # before the task files are written
    if args.task == "e2e":
        task = e2e_task(args.out, n_train=args.n_train, n_eval=args.n_eval, root=args.e2e_root)
    elif args.data and args.eval_data:
        task = file_task(args.data, args.eval_data, args.n_eval)
    else:
        raise PeftkitError("give --task e2e, or --data and --eval-data")
    results = run_compare(task, methods, model=args.model, out_dir=args.out, overrides=overrides,
                          probe=not args.no_probe, metrics=args.metrics, max_new_tokens=args.max_new_tokens,
                          probe_new_tokens=args.probe_new_tokens, eval_batch_size=args.eval_batch_size,
                          timeout=args.timeout, replay_data=args.replay_data)
    failed = [r["method"] for r in results if r.get("error")]
    print((f"{len(failed)} of {len(results)} methods failed: {', '.join(failed)}; " if failed else "")
          + f"table: {args.out}/results.md  plot: {args.out}/bleu_vs_params.png")
    return 1 if failed and len(failed) == len(results) else 0
