"""Benchmark: a QLoRA training step, peftkit vs Hugging Face peft + bitsandbytes, on CPU.

The bundled SmolLM2-135M-Instruct with its 210 block linear layers in NF4 + double quantization (block 64, bf16
compute), LoRA r=8 alpha=16 dropout 0.05 on q,k,v,o,gate,up,down, the Alpaca sample, loss on the answer only,
batch 8 padded rows (the same batches in the same order for both), AdamW lr 2e-4:

  * ``peftkit``: `TrainConfig(quantize="nf4", double_quant=True, precision="bf16", packing=False)` through
    peftkit's Trainer, i.e. ``quantize_model(model, "nf4", double_quant=True, compute_dtype=torch.bfloat16)``,
    LoRA, frozen non-quantized weights in bf16, LoRA weights fp32, bf16 autocast;
  * ``peft-bnb``: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))``,
    ``prepare_model_for_kbit_training`` (without gradient checkpointing, as peftkit here), ``get_peft_model``,
    transformers ``Trainer`` with ``bf16=True``.

No eval or no-grad forward runs before training (SPECS 6: bitsandbytes 0.50 on CPU then drops gradients). After
training, each worker checks that gradients still flow through one 4-bit layer (input gradient of a quantized
projection vs the dense dequantized weight) and that every LoRA tensor moved. Each run is a fresh subprocess,
the libraries alternate; timing and memory as in `bench/train_throughput.py` (memory baseline: just before
training, after quantization; the whole-process peak is the headline). Writes section "qlora_step".

    python bench/qlora_step.py            # ~8 minutes on an idle 2-core CPU
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section  # noqa: E402
from train_throughput import (  # noqa: E402
    BATCH,
    MODEL,
    TARGETS,
    alternate_workers,
    in_worker,
    medians,
    peft_run,
    peftkit_run,
    rss_mib,
    worker_parser,
)

warnings.filterwarnings("ignore")
CONFIGS = ("peftkit", "peft-bnb")
PROBE = "model.layers.10.mlp.down_proj"  # the layer whose input gradient is checked after training


def grad_check(layer, weight) -> str:
    """Relative error of the input gradient through a frozen 4-bit `layer` vs `ones @ weight` (dense)."""
    import torch

    x = torch.randn(4, weight.shape[1], dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    if x.grad is None:
        return "no gradient"
    want = torch.ones(4, weight.shape[0]) @ weight.float()
    return f"{float((x.grad.float() - want).norm() / want.norm()):.3f}"


def worker_peftkit(warmup: int, steps: int, examples: int) -> dict:
    def check(model) -> dict:
        layer = model.get_submodule(PROBE)
        base = layer._base_cls  # the LoRA layer is a QuantLinear with the LoRA mixin in front
        return {"grad_check": grad_check(lambda x: base.forward(layer, x), layer.dequantize_weight()),
                "base_layer": base.__name__}

    overrides = {"quantize": "nf4", "double_quant": True, "precision": "bf16", "packing": False, "batch_size": BATCH}
    return peftkit_run(overrides, warmup, steps, examples, baseline="train", check=check)


def worker_peft_bnb(warmup: int, steps: int, examples: int) -> dict:
    import bitsandbytes.functional as bnbf
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from peftkit.models import resolve_model_path

    path = resolve_model_path(MODEL)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))

    def check(model) -> dict:
        layer = model.get_submodule("base_model.model." + PROBE).base_layer
        weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        return {"grad_check": grad_check(layer, weight), "base_layer": type(layer).__name__}

    return peft_run(model, tokenizer, True, warmup, steps, examples, rss_mib(), baseline="train", check=check)


def main() -> None:
    args = worker_parser(__doc__, CONFIGS, repeats=3, steps=4, examples=200).parse_args()
    worker = worker_peftkit if args.worker == "peftkit" else worker_peft_bnb
    if in_worker(args, lambda: worker(args.warmup, args.steps, args.examples)):
        return

    t_start, load = time.perf_counter(), os.getloadavg()[0]
    runs = alternate_workers(list(CONFIGS), args, __file__, lambda r: (
        f"training peak +{r['peak'] - r['rss_after_load']:.0f} MiB  process peak {r['process_peak']:.0f} MiB  "
        f"first loss {r['first_loss']}  moved {r['moved']}  grad check {r['grad_check']} ({r['base_layer']})"))
    elapsed = time.perf_counter() - t_start
    s = {c: {**medians(runs[c], args.steps), "before": statistics.median(r["rss_after_load"] for r in runs[c]),
             "grad_check": runs[c][0]["grad_check"], "base_layer": runs[c][0]["base_layer"]} for c in CONFIGS}
    for c, v in s.items():
        print(c, json.dumps(v))
    if args.no_write:
        return
    same_batches = runs["peftkit"][0]["targets_per_step"] == runs["peft-bnb"][0]["targets_per_step"]
    speed = s["peftkit"]["tok_s"] / s["peft-bnb"]["tok_s"]
    mem = s["peftkit"]["process"] / s["peft-bnb"]["process"]
    command = (f"python bench/qlora_step.py --repeats {args.repeats} --warmup {args.warmup} --steps {args.steps} "
               f"--examples {args.examples} --threads {args.threads}")
    names = {"peftkit": "peftkit QLoRA (NF4+DQ, bf16)", "peft-bnb": "peft + bitsandbytes 4-bit (NF4+DQ, bf16)"}
    lines = [
        f"## qlora_step — `{command}` ({machine()}, torch threads per worker: {args.threads}, {elapsed:.0f} s, "
        f"load average {load:.1f} at the start)",
        "",
        f"Bundled SmolLM2-135M-Instruct, the 210 block linear layers in NF4 + double quantization (block 64, bf16 "
        f"compute), LoRA r=8 alpha=16 dropout 0.05 on q,k,v,o,gate,up,down, batch {BATCH} padded rows of the "
        f"Alpaca sample (the same batches in the same order: {'verified' if same_batches else 'NOT verified'}), "
        "answer-only loss, AdamW lr 2e-4. peftkit: its Trainer with `quantize: nf4`, `precision: bf16`, "
        "`packing: false`; peft: `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
        "bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)`, "
        "`prepare_model_for_kbit_training` (no gradient checkpointing), transformers `Trainer(bf16=True)`. "
        f"Fresh subprocess per run, alternating, {args.repeats} repetitions, medians of {args.steps} timed steps "
        f"after {args.warmup} warmup step(s). No eval/no-grad forward before training (SPECS 6). "
        "*process peak* = the worker's peak RSS (load + quantize + train); *training peak growth* = peak RSS "
        "during the timed steps minus RSS just before training. *grad check* = relative error of the input "
        f"gradient through the 4-bit `{PROBE}` after training vs the dense dequantized weight (must be ~0.01, "
        "not 'no gradient'); *moved* = LoRA tensors changed by training.",
        "",
        "| library | target tok/s | vs peft+bnb | positions/s | s/step | process peak (MiB) | RSS before training "
        "(MiB) | training peak growth (MiB) | loss of step 1 | moved | grad check | 4-bit layer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in CONFIGS:
        v = s[c]
        lines.append(
            f"| {names[c]} | {v['tok_s']:.1f} | {v['tok_s'] / s['peft-bnb']['tok_s']:.2f}x | {v['pos_s']:.0f} | "
            f"{v['step_s']:.2f} | {v['process']:.0f} | {v['before']:.0f} | {v['growth']:.0f} | "
            f"{v['first_loss']:.4f} | {v['moved']} | {v['grad_check']} | `{v['base_layer']}` |"
        )
    lines += [
        "",
        f"peftkit / peft+bitsandbytes: **{speed:.2f}x** target tok/s (target >= 1.5x), whole-process peak RSS "
        f"**{mem:.2f}x** (target < 1).",
    ]
    write_section("qlora_step", "\n".join(lines))
    print(f"wrote section qlora_step of BENCHMARKS.md ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
