"""E2E NLG: every method on the bundled SmolLM2-135M-Instruct, same data and budget (`peftkit compare`).

Runs ``peftkit compare --task e2e`` (or, with ``--from``, reads a finished run's folder), copies the plot to
``docs/e2e_compare.png`` and writes the ``e2e_compare`` section of BENCHMARKS.md: the exact command, the table, the
ICL spread, the reference numbers of SPECS.md section 6, and the headline ratios computed from the table.

    python bench/e2e_compare.py                      # the run (about 40 minutes on 2 idle CPU cores)
    python bench/e2e_compare.py --from runs/e2e_compare [runs/other ...] --notes "..."   # from finished runs
    python bench/e2e_compare.py --ewc-sweep runs/e2e_ewc_sweep   # full FT + EWC at several lambdas, and replay
    python bench/e2e_compare.py --lr-sweep runs/e2e_lr_sweep     # prompt, SAID, top-2 at higher learning rates

Several ``--from`` folders (parts of one comparison run side by side, same task and probe) are merged in the
order of ``METHODS``, from each method's ``<folder>/<method>/result.json``; a method in several folders is taken
from the last one given.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import ALPACA, ROOT, machine, write_section

N_TRAIN, N_EVAL = 300, 100
METHODS = "zero_shot,icl,lora,qlora,full,houlsby,prefix,prompt,top2,norms,said"
MITIGATIONS = "full+replay,full+ewc"  # forgetting mitigations, run separately (they need --replay-data)
REPLAY_DATA = str(ALPACA)
EWC_SWEEP = (0.01, 0.1, 1.0)
# the three methods still far from converged in the table (final train loss 1.44-1.48 vs 1.24-1.35), at higher rates
LR_SWEEP = {"prompt": (0.1, 0.3), "said": (0.03, 0.1), "top2": (5e-4, 1e-3)}
ARGS = ["--task", "e2e", "--n-train", str(N_TRAIN), "--n-eval", str(N_EVAL), "--probe-new-tokens", "32",
        "--timeout", "1500", "--methods", METHODS, "batch_size=2"]
SPECS6 = """Reference (SPECS.md section 6: HF transformers + peft + bitsandbytes, 1000 rows, batch 8 padded, 125 steps,
LoRA lr 2e-4, full lr 5e-5, same prompt and test MRs): 3-shot prompting BLEU 0.227; LoRA bf16 0.626 (NIST 6.43,
METEOR 0.417, ROUGE-L 0.677, CIDEr 2.51); QLoRA 0.592; full fine-tuning fp32 0.622; probe loss 0.710 before,
0.968 after LoRA, 1.044 after full fine-tuning (its probe scores the end-of-turn token and has other questions,
so only the direction of the change compares)."""


def _ratios(results: list[dict]) -> list[str]:
    by = {r["method"]: r for r in results if not r.get("error")}
    lines = []

    def bleu(name):
        return by[name]["BLEU"] if name in by else None

    if bleu("lora") is not None and bleu("full") is not None:
        lines.append(f"LoRA reaches {bleu('lora') / bleu('full'):.0%} of full fine-tuning's BLEU "
                     f"({bleu('lora'):.3f} vs {bleu('full'):.3f}) training {by['lora']['trainable_pct']:.2f}% "
                     f"of the parameters.")
    if bleu("qlora") is not None and bleu("lora") is not None:
        lines.append(f"QLoRA (NF4 base) reaches {bleu('qlora') / bleu('lora'):.0%} of LoRA's BLEU "
                     f"({bleu('qlora'):.3f}); peak RSS {by['qlora']['peak_rss_gb']:.2f} vs "
                     f"{by['lora']['peak_rss_gb']:.2f} GB.")
    if "icl" in by and bleu("lora") is not None:
        s = by["icl"]["spread"]["BLEU"]
        lines.append(f"3-shot ICL: BLEU {s['mean']:.3f} ± {s['std']:.3f} (min {s['min']:.3f}, max {s['max']:.3f} over "
                     f"{len(by['icl']['icl_runs'])} draws/orders), {bleu('lora') - s['mean']:.3f} below LoRA, at "
                     f"{by['icl']['prompt_tokens']:.0f} prompt tokens per prediction vs "
                     f"{by['icl']['zero_shot_prompt_tokens']:.0f} for a fine-tuned model "
                     f"({by['icl']['prompt_tokens'] / by['icl']['zero_shot_prompt_tokens']:.1f}x).")
    trained = [r for r in by.values() if r.get("trainable_params")]
    if trained:
        worst = max(trained, key=lambda r: r.get("probe_loss_increase", 0))
        least = min(trained, key=lambda r: r.get("probe_loss_increase", 0))
        lines.append(f"Forgetting (probe loss increase): most {worst['method']} ({worst['probe_loss_increase']:+.3f}), "
                     f"least {least['method']} ({least['probe_loss_increase']:+.3f}).")
    return lines


def _icl_table(results: list[dict]) -> str:
    icl = next((r for r in results if r.get("icl_runs")), None)
    if icl is None:
        return ""
    metrics = ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    lines = ["| ICL draw | order | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for r in icl["icl_runs"]:
        lines.append(f"| {r['draw']} | {r['order']} | " + " | ".join(f"{r[m]:.4f}" for m in metrics) + " |")
    for stat in ("mean", "std", "min", "max"):
        lines.append(f"| {stat} | | " + " | ".join(f"{icl['spread'][m][stat]:.4f}" for m in metrics) + " |")
    return "\n".join(lines)


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def ewc_sweep(out: Path) -> None:
    """Full fine-tuning with EWC at each lambda of EWC_SWEEP and with replay, same task and budget as the table."""
    entries = {f"ewc{lam}": {"method": "full", "lr": 1e-4, "ewc_lambda": lam} for lam in EWC_SWEEP}
    entries["replay"] = {"method": "full", "lr": 1e-4, "replay_fraction": 0.25}
    _sweep(out, entries, replay_data=REPLAY_DATA)


def lr_sweep(out: Path) -> None:
    """The methods that had not converged at the table's budget, at higher learning rates (same task and budget)."""
    from peftkit.eval.compare import DEFAULT_ENTRIES

    _sweep(out, {f"{name}@{lr:g}": {**DEFAULT_ENTRIES[name], "lr": lr} for name, lrs in LR_SWEEP.items() for lr in lrs})


def _sweep(out: Path, entries: dict[str, dict], replay_data: str | None = None) -> None:
    """Run `entries` on the table's task and budget into `out`; print each one's BLEU, final loss and forgetting."""
    from peftkit.eval.compare import e2e_task, run_compare

    task = e2e_task(out, n_train=N_TRAIN, n_eval=N_EVAL)
    results = run_compare(task, list(entries), out_dir=out, entries=entries, probe_new_tokens=32, timeout=1500,
                          overrides={"batch_size": 2}, replay_data=replay_data)
    for r in results:
        print(f"{r['method']}: BLEU {r.get('BLEU', float('nan')):.4f}, final train loss "
              f"{r.get('train_loss', float('nan')):.3f}, probe loss increase "
              f"{r.get('probe_loss_increase', float('nan')):+.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", nargs="+", help="finished `peftkit compare` folders (skip the run)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "e2e_compare"))
    parser.add_argument("--notes", default="", help="a paragraph of observations to add to the section")
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the run, when --from")
    parser.add_argument("--ewc-sweep", metavar="OUT", help="run the EWC lambda sweep into OUT and stop")
    parser.add_argument("--lr-sweep", metavar="OUT", help="run the learning-rate sweep (LR_SWEEP) into OUT and stop")
    args = parser.parse_args()
    if args.ewc_sweep:
        ewc_sweep(Path(args.ewc_sweep))
        return 0
    if args.lr_sweep:
        lr_sweep(Path(args.lr_sweep))
        return 0
    from peftkit.eval.compare import markdown_table, plot_bleu_vs_params

    folders = [Path(f) for f in args.source] if args.source else [Path(args.out)]
    seconds = args.seconds
    if not args.source:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "peftkit.cli", "compare", *ARGS, "--out", str(folders[0])], check=False)
        seconds = time.perf_counter() - t0
    # Each method's own result file: a part whose parent was stopped still counts for the methods it finished.
    # A method found in several folders is taken from the last one (a re-run after a change to that method).
    by_method = {p.parent.name: json.loads(p.read_text()) for f in folders for p in sorted(f.glob("*/result.json"))
                 if p.parent.name != "_probe"}
    results = list(by_method.values())
    # % of the base model's parameters (results written before base_params was recorded counted the parameters
    # after the method was applied, which for QLoRA leaves out the quantized weights): full fine-tuning trains them all.
    base = next((r["trainable_params"] for r in results if r["method"] == "full" and not r.get("error")), None)
    for r in results:
        if r.get("trainable_params") and "base_params" not in r and base:
            r["base_params"], r["trainable_pct"] = base, 100.0 * r["trainable_params"] / base
    rank = {m: i for i, m in enumerate(f"{METHODS},{MITIGATIONS}".split(","))}
    results.sort(key=lambda r: rank.get(r["method"], len(rank)))
    task = json.loads((folders[0] / "task.json").read_text())
    probe = folders[0] / "probe.json"
    base_loss = json.loads(probe.read_text())["base_loss"] if probe.is_file() else None
    md = markdown_table(results)
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    plot_bleu_vs_params(results, docs / "e2e_compare.png", f"E2E, SmolLM2-135M-Instruct, {N_TRAIN} training rows")
    took = f", {seconds / 60:.0f} min" if seconds else ""
    body = [
        f"## e2e_compare — `python bench/e2e_compare.py` ({machine()}{took})",
        "",
        f"Command: `peftkit compare {' '.join(ARGS)} --out {_relative(folders[0])}` (bundled SmolLM2-135M-Instruct, "
        "bf16 weights + packing (peftkit's defaults), 1 epoch, cosine schedule, each method in its own process).",
        f"Data: {task['description']}. Prompt: chat template + the E2E instruction + MR; greedy decoding, at most 64 "
        "new tokens; official E2E metrics. Forgetting: mean CE of the base model's own greedy answers (at most 32 "
        "tokens) to the 50 shipped general questions, answer text only; probe ROUGE-L = agreement of the tuned "
        "model's answers with the base answers (1 = unchanged). Peak RSS: the method's process (load + train + "
        "eval). ICL's BLEU cell is mean ± std (min-max) over draws and orders; its other metrics are means."
        + (f" Probe loss of the base model: {base_loss:.3f}." if base_loss is not None else ""),
        "",
        md.strip(),
        "",
        _icl_table(results),
        "",
        "![BLEU vs trainable parameters](docs/e2e_compare.png)",
        "",
        *[f"- {line}" for line in _ratios(results)],
        "",
        SPECS6,
    ]
    if args.notes:
        body += ["", args.notes]
    write_section("e2e_compare", "\n".join(body))
    print(f"wrote the e2e_compare section of {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
