"""Batch invariance and batched throughput of the serving engine on the bundled SmolLM2-135M-Instruct.

    PYTHONPATH=src python bench/serve_invariance.py [--precision bf16] [--reps 5] [--streams 8] [--tokens 64]

Prints how many of 8 mixed requests (4 prompts x the base and a random LoRA adapter) and of 8 identical adapter
requests give the same token ids sent concurrently as sent one at a time, then the batched decode throughput
(`--streams` concurrent requests of `--tokens` new tokens each, every repetition timed; the median printed). Run it
under two checkouts alternately (PYTHONPATH) to compare them on one machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-check", action="store_true", help="only the throughput")
    args = ap.parse_args()
    precision = resolve_precision(args.precision)
    model, tok = load_model(BUNDLED_NAME, dtype=precision.weight_dtype)
    engine = Engine(model, tok, "base", max_batch=16)
    with tempfile.TemporaryDirectory() as tmp:
        engine.add_adapter("lora", read_lora(random_lora(model, Path(tmp) / "lora"), model))
    engine.start()
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
           for p in PROMPTS]
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
    mixed = [(m, p) for p in ids for m in ("base", "lora")]
    same = [("lora", ids[0])] * 8
    print(f"precision {precision.name}; threads {torch.get_num_threads()}")
    for name, jobs in () if args.no_check else (("mixed", mixed), ("identical", same)):
        alone, _ = run(engine, jobs, False, 48)
        together, _ = run(engine, jobs, True, 48)
        equal = sum(a == b for a, b in zip(alone, together, strict=True))
        print(f"{name}: {equal}/{len(jobs)} equal concurrent vs one at a time;"
              f" distinct concurrent answers {len({tuple(t) for t in together})}")
    jobs = [mixed[i % len(mixed)] for i in range(args.streams)]
    rates = []
    for _ in range(args.reps):
        out, wall = run(engine, jobs, True, args.tokens, ignore_eos=True)
        rates.append(sum(len(o) for o in out) / wall)
    print(f"batched {args.streams}x{args.tokens}: median {statistics.median(rates):.1f} tok/s "
          f"({', '.join(f'{r:.1f}' for r in rates)})")
    engine.shutdown()


if __name__ == "__main__":
    main()
