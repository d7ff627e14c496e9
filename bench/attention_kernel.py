"""Benchmark: packed training attention on CPU, the compiled kernel (`peftkit.train.attention_native`) vs PyTorch.

Two parts, both fp32, the paths called alternately, medians over rounds:
  * one layer's attention, forward + backward, on real packed batches of the orders task (the default's 2 rows x
    512 tokens, shared prefix): the bundled model's 9 query and 3 key/value heads of size 64. Three ways:
    PyTorch's ``scaled_dot_product_attention`` per example (what the CUDA path runs), peftkit's PyTorch path
    (examples padded into groups, batched matmuls) and the kernel;
  * training steps on the bundled model (same batches): the default LoRA and the demo's QLoRA, forward + backward
    with the kernel and with the PyTorch path (`attention_kernel` switched off in process).
Writes section "attention_kernel" of BENCHMARKS.md (per CPU class).

    python bench/attention_kernel.py            # ~3 minutes on a 2-core CPU
    python bench/attention_kernel.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, alternate, kernel_step_row, machine, write_section  # noqa: E402

from peftkit.train import attention_native  # noqa: E402
from peftkit.train import packed_attention as pa  # noqa: E402

warnings.filterwarnings("ignore")
HEADS, KV_HEADS, D = 9, 3, 64  # SmolLM2-135M


def _trainer(settings: dict):
    from peftkit.train import TrainConfig, Trainer

    cfg = TrainConfig.from_dict({**settings, "data": str(ROOT / "src/peftkit/data/tasks/orders_train.jsonl"),
                                 "max_steps": 1, "output_dir": "/tmp/peftkit-bench-attention", "progress": False,
                                 "precision": "fp32"})
    trainer = Trainer(cfg, overwrite=True)
    batches = iter(trainer.data.batches(0, 0))
    return trainer, [next(batches)[2] for _ in range(3)]


def _per_example(q, k, v, segments, scale):
    """Each example (and its row's shared prefix) by ``scaled_dot_product_attention``, as off the CPU path."""
    rows = []
    for r, (bounds, prefix) in enumerate(zip(segments[1], segments[2], strict=True)):
        parts, end = [], 0
        for start, end in bounds:
            qs, ks, vs = (t[r, :, start:end] for t in (q, k, v))
            if prefix and start >= prefix:
                ks, vs = torch.cat([k[r, :, :prefix], ks], 1), torch.cat([v[r, :, :prefix], vs], 1)
            parts.append(pa._one_example(qs, ks, vs, scale, 0.0, None))
        if end < segments[0]:
            parts.append(q.new_zeros(HEADS, segments[0] - end, D))
        rows.append(torch.cat(parts, 1))
    return torch.stack(rows).transpose(1, 2)


def layer(rounds: int) -> list[str]:
    from peftkit.train.packed_attention import segment_bounds

    _, batches = _trainer({})
    segments = [segment_bounds(b["segment_ids"], b.get("prefix_lengths")) for b in batches]
    gen = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(len(s[1]), h, s[0], D, generator=gen).requires_grad_() for h in (HEADS, KV_HEADS, KV_HEADS)]
              for s in segments]
    kernel, scale = attention_native.attention_kernel, D**-0.5

    def run(kind: str):
        for s, t in zip(segments, inputs, strict=True):
            if kind == "sdpa":
                out = _per_example(*t, s, scale)
            else:
                attention_native.attention_kernel = kernel if kind == "kernel" else (lambda: None)
                try:
                    out = pa.PackedCausalAttention.apply(*t, s, scale, None)
                finally:
                    attention_native.attention_kernel = kernel
            torch.autograd.grad(out, t, torch.ones_like(out))

    times = alternate({kind: (lambda kind=kind: run(kind)) for kind in ("sdpa", "groups", "kernel")}, rounds)
    ms = {k: statistics.median(v) * 1e3 / len(segments) for k, v in times.items()}
    examples = statistics.median(sum(len(bounds) for bounds in s[1]) for s in segments)
    return ["| per-example SDPA (ms) | peftkit PyTorch path (ms) | kernel (ms) | kernel vs SDPA "
            "| kernel vs PyTorch path |",
            "|---|---|---|---|---|",
            f"| {ms['sdpa']:.2f} | {ms['groups']:.2f} | {ms['kernel']:.2f} | {ms['sdpa'] / ms['kernel']:.2f}x | "
            f"{ms['groups'] / ms['kernel']:.2f}x |", "",
            f"(one layer, forward + backward, per batch: {len(segments)} real batches of {len(segments[0][1])} rows x "
            f"{segments[0][0]} tokens, ~{examples:.0f} examples each)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if attention_native.attention_kernel() is None:
        sys.exit(f"no attention kernel here: {attention_native.describe()}")
    layer_lines = layer(5 if args.quick else 15)
    print("\n".join(layer_lines))
    from peftkit.demo import DEMO_CONFIG

    step_lines = ["| forward + backward of | rounds | PyTorch path (s) | kernel (s) | speed-up |",
                  "|---|---|---|---|---|"]
    rounds = 3 if args.quick else 8
    for label, settings in (("default LoRA (r=8)", {}), ("the demo's QLoRA (r=16, NF4)", DEMO_CONFIG)):
        step_lines.append(kernel_step_row(attention_native, "attention_kernel", label, settings, rounds))
    print("\n".join(step_lines))
    body = "\n".join([
        "## Packed training attention on CPU: compiled kernel vs PyTorch (`python bench/attention_kernel.py`)", "",
        f"Machine: {machine()}; {torch.get_num_threads()} threads. fp32. Alternating, medians.", "",
        "One layer's attention (SmolLM2-135M: 9 query heads, 3 key/value heads, size 64) on real packed batches of "
        "the orders task:", "", *layer_lines, "",
        "In a training step on the bundled model (same batches both ways; everything but attention is the same "
        "code):", "", *step_lines])
    write_section("attention_kernel", body, per_cpu_class=True)


if __name__ == "__main__":
    main()
