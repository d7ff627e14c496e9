"""Batch invariance and batched throughput of the serving engine on the bundled SmolLM2-135M-Instruct.

    PYTHONPATH=src python bench/serve_invariance.py [--precision bf16] [--reps 5] [--streams 8] [--tokens 64]
    PYTHONPATH=src python bench/serve_invariance.py --against 2dc4753   # + the cost, side by side; writes BENCHMARKS.md

Prints how many of 8 mixed requests (4 prompts x the base and a random LoRA adapter) and of 8 identical adapter
requests give the same token ids sent concurrently as sent one at a time, then the batched decode throughput
(`--streams` concurrent requests of `--tokens` new tokens each, every repetition timed; the median printed).

With `--against REV` the throughput is measured for this checkout and for the commit REV (a temporary git worktree;
2dc4753 is main just before batch-invariant serving landed), alternating round by round in fresh processes, and the
section "serve_invariance" of BENCHMARKS.md is written: the equality counts in fp32 and bf16, and the medians and
their ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from peftkit.core.adapter_io import apply_method, save_adapter
from peftkit.hardware import resolve_precision
from peftkit.methods.lora import lora_layers
from peftkit.models import BUNDLED_NAME, load_model
from peftkit.serve.engine import Engine, Finished, SamplingParams
from peftkit.serve.lora_batch import read_lora

PROMPTS = ["Hello!", "What is the capital of France?", "Write a haiku about the sea.", "Give me three fruits."]


def random_lora(model: torch.nn.Module, folder: Path) -> Path:
    """A LoRA adapter with random B (std 0.02): it changes the answers, as a few training steps would."""
    model = copy.deepcopy(model).float()
    torch.manual_seed(0)
    apply_method(model, "lora", {"r": 8, "lora_alpha": 16})
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0.0, 0.02)
    return save_adapter(model, folder)


def run(engine: Engine, jobs: list[tuple[str, list[int]]], together: bool, tokens: int,
        ignore_eos: bool = False) -> tuple[list[list[int]], float]:
    """Token ids of each job and the wall time: all submitted at once, or each after the previous finished."""
    gens, done = [], set()
    params = SamplingParams(max_tokens=tokens, ignore_eos=ignore_eos)

    def submit(i: int) -> None:
        def emit(event, i=i):
            if isinstance(event, Finished):
                done.add(i)
        gens.append(engine.submit(jobs[i][0], jobs[i][1], params, emit, deltas=False))

    started = time.perf_counter()
    if together:
        with engine.hold():
            for i in range(len(jobs)):
                submit(i)
    for i in range(len(jobs)):
        if not together:
            submit(i)
        while i not in done:
            time.sleep(0.002)
    return [list(g.output.detokenizer.ids) for g in gens], time.perf_counter() - started


def prompt_ids(tok) -> list[list[int]]:
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
           for p in PROMPTS]
    return [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]


def check(precision_name: str) -> list[str]:
    """Lines: how many concurrent answers equal the one-at-a-time answers, mixed and identical requests."""
    precision = resolve_precision(precision_name)
    model, tok = load_model(BUNDLED_NAME, dtype=precision.weight_dtype)
    engine = Engine(model, tok, "base", max_batch=16)
    with tempfile.TemporaryDirectory() as tmp:
        engine.add_adapter("lora", read_lora(random_lora(model, Path(tmp) / "lora"), model))
    engine.start()
    ids = prompt_ids(tok)
    mixed = [(m, p) for p in ids for m in ("base", "lora")]
    lines = []
    for name, jobs in (("mixed", mixed), ("identical", [("lora", ids[0])] * 8)):
        alone, _ = run(engine, jobs, False, 48)
        together, _ = run(engine, jobs, True, 48)
        equal = sum(a == b for a, b in zip(alone, together, strict=True))
        lines.append(f"| {precision.name} | {name} | {equal}/{len(jobs)} | {len({tuple(t) for t in together})} |")
    engine.shutdown()
    return lines


def one_round(src: str, args) -> float:
    """Batched tok/s of one fresh process importing peftkit from `src` (one repetition)."""
    cmd = [sys.executable, __file__, "--no-check", "--reps", "1", "--json", "--precision", args.precision,
           "--streams", str(args.streams), "--tokens", str(args.tokens)]
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": src}, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rates"][0]


def against(args) -> None:
    """This checkout vs commit `args.against`, alternating; writes the section."""
    from _common import ROOT, machine, write_section

    started = time.time()
    rows = [line for p in ("fp32", "bf16") for line in check(p)]
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), args.against],
                       check=True)
        try:
            rates: dict[str, list[float]] = {"this checkout": [], args.against: []}
            for _ in range(args.reps):
                rates["this checkout"].append(one_round(str(ROOT / "src"), args))
                rates[args.against].append(one_round(str(old / "src"), args))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    new, base = (statistics.median(rates[k]) for k in rates)
    body = [f"## serve_invariance — `python bench/serve_invariance.py --against {args.against} --reps {args.reps}` "
            f"({machine()}, {time.time() - started:.0f} s)", "",
            "Greedy token ids of 8 requests sent concurrently vs one at a time (4 prompts x base and a random LoRA "
            "adapter; 8 identical adapter requests), 48 new tokens:", "",
            "| precision | requests | equal | distinct concurrent answers |", "|---|---|---|---|", *rows, "",
            f"Batched decode, {args.streams} streams x {args.tokens} tokens, precision {args.precision}, "
            f"alternating fresh processes, {args.reps} rounds (tok/s):", "",
            "| code | median | rounds |", "|---|---|---|",
            *(f"| {k} | {statistics.median(v):.1f} | {', '.join(f'{r:.1f}' for r in v)} |" for k, v in rates.items()),
            "", f"Ratio this checkout / {args.against}: {new / base:.3f} (batch invariance's cost where the code "
            "differs only by it)."]
    write_section("serve_invariance", "\n".join(body), per_cpu_class=True)
    print("\n".join(body))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-check", action="store_true", help="only the throughput")
    ap.add_argument("--json", action="store_true", help="last line: the rates as JSON")
    ap.add_argument("--against", metavar="REV", help="measure this checkout and commit REV alternately; write "
                    "BENCHMARKS.md")
    args = ap.parse_args()
    if args.against:
        return against(args)
    if not args.no_check:
        print("| precision | requests | equal | distinct concurrent answers |")
        print("\n".join(check(args.precision)))
    precision = resolve_precision(args.precision)
    model, tok = load_model(BUNDLED_NAME, dtype=precision.weight_dtype)
    engine = Engine(model, tok, "base", max_batch=16)
    with tempfile.TemporaryDirectory() as tmp:
        engine.add_adapter("lora", read_lora(random_lora(model, Path(tmp) / "lora"), model))
    engine.start()
    mixed = [(m, p) for p in prompt_ids(tok) for m in ("base", "lora")]
    print(f"precision {precision.name}; threads {torch.get_num_threads()}")
    jobs = [mixed[i % len(mixed)] for i in range(args.streams)]
    rates = []
    for _ in range(args.reps):
        out, wall = run(engine, jobs, True, args.tokens, ignore_eos=True)
        rates.append(sum(len(o) for o in out) / wall)
    print(f"batched {args.streams}x{args.tokens}: median {statistics.median(rates):.1f} tok/s "
          f"({', '.join(f'{r:.1f}' for r in rates)})")
    if args.json:
        print(json.dumps({"rates": rates}))
    engine.shutdown()


if __name__ == "__main__":
    main()
