"""Benchmark: a DoRA training step, peftkit LoRA vs peftkit DoRA vs Hugging Face peft DoRA, on CPU.

The bundled SmolLM2-135M-Instruct (``--model tiny``: a 4-block random Llama of the same widths), fp32, r=8 alpha=16
no dropout on q,k,v,o,gate,up,down, one fixed batch of random token ids (batch x seq below), AdamW lr 1e-4 (every
step changes A and B, so DoRA's column norm is recomputed every step: the cache saves nothing across steps here,
only within one). A step is forward + loss + backward + optimizer step. The three models are separate copies of
the same base weights and take turns, step by step (`_common.alternate`); medians. Writes section "dora".

    python bench/dora.py                  # ~3 minutes on an idle 2-core CPU
    python bench/dora.py --model tiny --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, machine, write_section  # noqa: E402

warnings.filterwarnings("ignore")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(name: str):
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536,
                                            num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3))
    from peftkit.models import load_model

    return load_model(name, dtype=torch.float32)[0]


def models(name: str) -> dict:
    from peft import LoraConfig, get_peft_model

    from peftkit.core.adapter_io import apply_method

    out = {}
    for method in ("lora", "dora"):
        model = base_model(name)
        apply_method(model, method, {"r": 8, "lora_alpha": 16, "target_modules": TARGETS})
        out[f"peftkit {method}"] = model
    out["peft dora"] = get_peft_model(base_model(name), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                   use_dora=True, lora_dropout=0.0))
    return out


def step_fn(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    model.train()

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="smollm2-135m-instruct or tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    ms = models(args.model)
    vocab = next(iter(ms.values())).config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times = alternate({k: step_fn(m, ids) for k, m in ms.items()}, args.steps, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    lora_s = med["peftkit lora"]
    rows = [f"| {k} | {v * 1000:.0f} | {v / lora_s:.2f}x |" for k, v in med.items()]
    body = "\n".join([
        "## DoRA training step (`bench/dora.py`)",
        "",
        f"Machine: {machine()}; torch CPU capability `{torch.backends.cpu.get_cpu_capability()}`.",
        f"Model {args.model}, fp32, r=8 alpha=16 on q,k,v,o,gate,up,down, batch {args.batch} x {args.seq} tokens, "
        f"forward + backward + AdamW step, {args.steps} alternating steps after 1 warm-up step, medians.",
        "",
        "| step | ms | vs peftkit LoRA |",
        "|---|---:|---:|",
        *rows,
        "",
        f"peftkit DoRA is {med['peft dora'] / med['peftkit dora']:.2f}x faster than peft DoRA "
        f"(target: peftkit DoRA <= 1.3x peftkit LoRA).",
    ])
    print(body)
    if not args.no_write:
        write_section("dora", body)


if __name__ == "__main__":
    main()
