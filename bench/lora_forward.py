"""Benchmark: inference latency of a LoRA model, merged and unmerged, against the plain base model.

On the bundled SmolLM2-135M-Instruct: a no-grad forward of a 4 x 128-token batch and a greedy generation of 32
new tokens (batch 1, 32-token prompt), for
  * the plain base model,
  * LoRA r=8 on every linear layer, merged in place (`lora.merge`: still LoRA layers, flagged merged),
  * the same after `merge_and_unload` (plain layers again),
  * LoRA unmerged (the update computed on the side: two extra small matmuls per layer).
B is randomized so the update is not zero. The variants are called in turn each round, medians over rounds, in
fp32 and in bf16 (weights and activations bf16). Writes section "lora_forward" of BENCHMARKS.md.

    python bench/lora_forward.py            # ~4 minutes on a 2-core CPU
    python bench/lora_forward.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, machine, write_section  # noqa: E402

from peftkit.core.adapter_io import apply_method  # noqa: E402
from peftkit.methods import lora  # noqa: E402
from peftkit.models import load_model  # noqa: E402

warnings.filterwarnings("ignore")
MODEL = "smollm2-135m-instruct"
BATCH, SEQ = 4, 128
PROMPT, NEW_TOKENS = 32, 32


def build_variants(dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """base, merged, merge_and_unload and unmerged models (same random LoRA weights), eval mode."""
    base, _ = load_model(MODEL, dtype=torch.float32)
    base.eval()
    unmerged = copy.deepcopy(base)
    torch.manual_seed(0)
    apply_method(unmerged, "lora", {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"})
    with torch.no_grad():
        for _, layer in lora.lora_layers(unmerged):
            layer.lora_B.weight.normal_(0.0, 0.02)  # a non-zero update, as after training
    # the same LoRA weights in both dtypes: made in fp32, then cast
    base.to(dtype)
    unmerged.to(dtype).eval()
    merged = copy.deepcopy(unmerged)
    lora.merge(merged)
    unloaded = lora.merge_and_unload(copy.deepcopy(unmerged))
    return {"base": base, "LoRA merged": merged, "LoRA merge_and_unload": unloaded, "LoRA unmerged": unmerged}


def check_outputs(models: dict[str, torch.nn.Module], ids: torch.Tensor, ref: torch.Tensor | None
                  ) -> tuple[dict[str, float], torch.Tensor]:
    """Max |logit difference| of each variant vs `ref` (default: this dtype's unmerged LoRA model's logits)."""
    with torch.no_grad():
        if ref is None:
            ref = models["LoRA unmerged"](input_ids=ids).logits.float()
        return {name: float((m(input_ids=ids).logits.float() - ref).abs().max()) for name, m in models.items()}, ref


def run(dtype: torch.dtype, repeats: int, ref: torch.Tensor | None
        ) -> tuple[dict[str, dict[str, float]], dict[str, float], torch.Tensor]:
    models = build_variants(dtype)
    vocab = models["base"].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (BATCH, SEQ), generator=gen)
    prompt = torch.randint(100, vocab, (1, PROMPT), generator=gen)
    diffs, ref = check_outputs(models, ids[:1, :32], ref)

    def forward(m: torch.nn.Module) -> Callable[[], object]:
        def fn() -> object:
            with torch.no_grad():
                return m(input_ids=ids, use_cache=False).logits

        return fn

    def generate(m: torch.nn.Module) -> Callable[[], object]:
        def fn() -> object:
            with torch.no_grad():
                return m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

        return fn

    fwd = alternate({n: forward(m) for n, m in models.items()}, repeats)
    gen_t = alternate({n: generate(m) for n, m in models.items()}, gen_repeats(repeats), warmup=0)
    table = {n: {"forward": statistics.median(fwd[n]), "generate": statistics.median(gen_t[n])} for n in models}
    return table, diffs, ref


def gen_repeats(repeats: int) -> int:
    return max(3, repeats // 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="5 rounds: a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a loaded shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else args.repeats
    t_start = time.perf_counter()
    load = os.getloadavg()[0]
    results = {}
    ref = None  # the fp32 unmerged logits: the bf16 variants are checked against them too
    for dtype in (torch.float32, torch.bfloat16):
        table, diffs, ref = run(dtype, repeats, ref)
        results[dtype] = (table, diffs)
        name = str(dtype).removeprefix("torch.")
        for variant, row in table.items():
            print(f"{name:9s} {variant:22s} forward {row['forward'] * 1e3:8.1f} ms  generate "
                  f"{row['generate'] * 1e3:8.1f} ms  max|dlogit| vs fp32 unmerged {diffs[variant]:.2e}", flush=True)
    elapsed = time.perf_counter() - t_start

    lines = [
        f"## lora_forward — `python bench/lora_forward.py --repeats {repeats} --threads {args.threads}` ({machine()}, "
        f"torch threads: {args.threads}, {elapsed:.0f} s, load average {load:.1f} at the start)",
        "",
        f"Bundled SmolLM2-135M-Instruct, LoRA r=8 alpha=16 on all 210 linear layers of the blocks, B randomized "
        f"(N(0, 0.02)). *forward*: one no-grad forward of {BATCH} x {SEQ} tokens (logits for every position, no "
        f"KV cache). *generate*: greedy, batch 1, {PROMPT}-token prompt, exactly {NEW_TOKENS} new tokens (KV "
        f"cache). The four variants are called in turn each round; medians of {repeats} rounds (forward) and "
        f"{gen_repeats(repeats)} (generate). *merged* = `lora.merge(model)` (LoRA layers flagged merged, update "
        "folded into the weight); *merge_and_unload* = plain layers again; *unmerged* = update computed on the "
        "side. The last column checks the logits (one 32-token sequence) against the fp32 unmerged model's: merging "
        "must not change them beyond rounding (in bf16 the merged weight W + BA is rounded to bf16 once more).",
        "",
        "| dtype | variant | forward (ms) | vs base | generate 32 tok (ms) | vs base "
        "| max abs logit diff vs fp32 unmerged |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype, (table, diffs) in results.items():
        base = table["base"]
        for variant, row in table.items():
            lines.append(
                f"| {str(dtype).removeprefix('torch.')} | {variant} | {row['forward'] * 1e3:.1f} | "
                f"{row['forward'] / base['forward']:.3f} | {row['generate'] * 1e3:.1f} | "
                f"{row['generate'] / base['generate']:.3f} | {diffs[variant]:.1e} |"
            )
    write_section("lora_forward", "\n".join(lines))
    print(f"wrote section lora_forward of BENCHMARKS.md ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
