"""Benchmark: LoRA's skinny products on CPU, the compiled kernel (`peftkit.methods.lora_native`) vs PyTorch matmuls.

Two parts, both fp32, the two paths called alternately, medians over rounds:
  * the products alone, per rank: for the bundled model's seven projection shapes (q, k, v, o, gate, up, down) at
    T = 960 rows (a default batch), the forward's two products and the backward's four (what `_FusedLoRALinear`
    computes besides the base matmul), the sum over one block;
  * training steps on the bundled model, real batches of the orders task: the default LoRA (r = 8 on every
    projection) and the demo's QLoRA (r = 16 on an NF4 base), forward + backward with the kernel and with PyTorch's
    matmuls (`lora_kernel` switched off in process).
Writes section "lora_kernel" of BENCHMARKS.md (per CPU class).

    python bench/lora_kernel.py            # ~3 minutes on a 2-core CPU
    python bench/lora_kernel.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, kernel_step_row, machine, write_section  # noqa: E402

from peftkit.methods import lora_native  # noqa: E402

warnings.filterwarnings("ignore")
ROWS = 960
# the bundled model's projections (d_in, d_out): q, k, v, o, gate, up, down
BLOCK = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
RANKS = (4, 8, 16, 32)


def chain(native: bool, x, g, out, gx, a, b, scale=2.0):
    """The six products of one LoRA layer's forward and backward, by the kernel or as the PyTorch path writes them."""
    bt = b.t().contiguous()
    if native:
        h = lora_native.down(x, a, scale)
        if a.shape[0] <= lora_native.UP_ADD_MAX_RANK:  # as `_FusedLoRALinear` does
            lora_native.up_add(out, h, bt)
        else:
            out.addmm_(h, b.t())
        gh, gbt = lora_native.grad_out(g, bt, h, scale)
        return lora_native.grad_in(gx, x, gh, a), gbt
    h = (x @ a.t()).mul_(scale)
    out.addmm_(h, b.t())
    gh = (g @ bt.t()).mul_(scale)
    gx.addmm_(gh, a)
    return gh.t() @ x, (h.t() @ g).t().contiguous()


def products(rounds: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    lines = ["| rank | PyTorch matmuls (ms / block) | kernel (ms / block) | speed-up |", "|---|---|---|---|"]
    for r in RANKS:
        layers = []
        for d_in, d_out in BLOCK:
            t = [torch.randn(s, generator=gen) for s in ((ROWS, d_in), (ROWS, d_out), (ROWS, d_out), (ROWS, d_in))]
            layers.append((*t, torch.randn(r, d_in, generator=gen) * 0.02, torch.randn(d_out, r, generator=gen) * 0.02))
        times = alternate({kind: (lambda kind=kind, layers=layers: [chain(kind == "kernel", *t) for t in layers])
                           for kind in ("torch", "kernel")}, rounds)
        torch_ms, kernel_ms = (statistics.median(times[k]) * 1e3 for k in ("torch", "kernel"))
        lines.append(f"| {r} | {torch_ms:.1f} | {kernel_ms:.1f} | {torch_ms / kernel_ms:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if lora_native.lora_kernel() is None:
        sys.exit(f"no LoRA kernel here: {lora_native.describe()}")
    product_lines = products(5 if args.quick else 15)
    print("\n".join(product_lines))
    from peftkit.demo import DEMO_CONFIG

    step_lines = ["| forward + backward of | rounds | PyTorch matmuls (s) | kernel (s) | speed-up |",
                  "|---|---|---|---|---|"]
    for label, settings in (("default LoRA (r=8)", {}), ("the demo's QLoRA (r=16, NF4)", DEMO_CONFIG)):
        step_lines.append(kernel_step_row(lora_native, "lora_kernel", label, settings, 3 if args.quick else 8))
    print("\n".join(step_lines))
    body = "\n".join([
        "## LoRA's skinny products on CPU: compiled kernel vs PyTorch matmuls (`python bench/lora_kernel.py`)", "",
        f"Machine: {machine()}; {torch.get_num_threads()} threads. fp32. Alternating, medians.", "",
        f"The six r-wide products of one block's seven projections (forward 2, backward 4), T = {ROWS} rows; "
        f"peftkit uses the kernel up to rank {lora_native.MAX_RANK} (`MAX_RANK`), where it is faster (the kernel "
        f"column does the forward's out += h B^T by BLAS above rank {lora_native.UP_ADD_MAX_RANK}, as "
        "`_FusedLoRALinear` does):", "", *product_lines, "",
        "In a training step on the bundled model (same batches both ways; the base matmuls, attention and the rest "
        "are the same code):", "", *step_lines])
    write_section("lora_kernel", body, per_cpu_class=True)


if __name__ == "__main__":
    main()
