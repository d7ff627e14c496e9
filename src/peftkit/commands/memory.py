"""`peftkit memory`: the analytical memory estimate of a training setup, as a table, JSON or a stacked-bar PNG.

Examples::

    peftkit memory smollm2-135m-instruct --method lora r=16 "target_modules=[q_proj,v_proj]" --batch-size 8
    peftkit memory llama-2-7b --method qlora --optimizer paged_adamw_32bit --gradient-checkpointing --device-memory 24GB
    peftkit memory path/to/config.json --compare --plot memory.png
    peftkit memory --lora-table
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from peftkit import memory as M
from peftkit.core.config import parse_override

_LABELS = {
    "weights_frozen": "frozen weights",
    "quant_constants": "quant. constants",
    "weights_trainable": "trainable weights",
    "gradients": "gradients",
    "optimizer_device": "optimizer (device)",
    "activations": "activations",
    "logits_loss": "logits / loss",
    "temp_weights": "temp. weights",
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("memory", help="estimate training memory from the architecture (no weights loaded)",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("model", nargs="?", help="preset name, config.json or model folder (see --list-presets)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="keys of the method's config, as `peftkit train` reads them (values in YAML): r=16 "
                        "target_modules=[q_proj,v_proj]")
    p.add_argument("--method", default="lora", choices=M.METHODS,
                   help="a registered method (peftkit info --list-methods), or qlora: lora over an NF4 + "
                        "double-quantized base")
    p.add_argument("--precision", default="bf16", metavar="{" + ",".join(M.PRECISIONS) + "}",
                   help="the training precision (TrainConfig.precision): bf16/fp16: frozen weights 16-bit, trainable "
                        "ones fp32, 16-bit autocast; bf16-autocast: every weight fp32, bf16 autocast; fp32; auto: "
                        "what training would pick on this machine. Default: bf16")
    p.add_argument("--quant", default=None, choices=[q for q in M.QUANTS if q])
    p.add_argument("--double-quant", action="store_true")
    p.add_argument("--optimizer", default="adamw", choices=M.OPTIMIZERS)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--activation-model", default="hf", choices=("hf", "korthikanti"))
    p.add_argument("--device-memory", default=None, help="e.g. 24GB (1e9) or 24GiB (2**30): say whether it fits")
    p.add_argument("--compare", action="store_true", help="all methods side by side")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a stacked-bar chart")
    p.add_argument("--lora-table", action="store_true", help="the lecture's LoRA parameter table + real counts")
    p.add_argument("--list-presets", action="store_true")
    p.set_defaults(func=run)
    return p


def human(n: float) -> str:
    """Binary units: ``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _table(rows: dict[str, M.Breakdown], device: int | None) -> str:
    names = list(rows)
    width = max(12, *(len(n) for n in names))
    lines = ["".ljust(20) + "".join(n.rjust(width + 2) for n in names)]

    def line(label: str, values: list[str]) -> None:
        lines.append(label.ljust(20) + "".join(v.rjust(width + 2) for v in values))

    line("trainable params", [f"{b.params_trainable:,}" for b in rows.values()])
    for key, label in _LABELS.items():
        line(label, [human(getattr(b, key)) for b in rows.values()])
    line("total (device)", [human(b.total_bytes) for b in rows.values()])
    line("peak (modelled)", [human(b.peak_bytes) for b in rows.values()])
    if any(b.optimizer_host for b in rows.values()):
        line("optimizer (host)", [human(b.optimizer_host) for b in rows.values()])
    line("activ. no ckpt", [human(b.activations_no_ckpt) for b in rows.values()])
    line("activ. ckpt", [human(b.activations_ckpt) for b in rows.values()])
    line("activ. Korthikanti", [human(b.activations_korthikanti) for b in rows.values()])
    if device is not None:
        line(f"fits {human(device)}", ["yes" if b.total_bytes <= device else "NO" for b in rows.values()])
    notes = [f"{n}: {note}" if len(rows) > 1 else note for n, b in rows.items() for note in b.notes]
    return "\n".join(lines + [f"note: {n}" for n in dict.fromkeys(notes)])


def _plot(rows: dict[str, M.Breakdown], path: str, title: str, device: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 3), 5))
    bottom = [0.0] * len(rows)
    for key, label in _LABELS.items():
        vals = [getattr(b, key) / 2**30 for b in rows.values()]
        ax.bar(list(rows), vals, bottom=bottom, label=label)
        bottom = [a + v for a, v in zip(bottom, vals, strict=True)]
    if device is not None:
        ax.axhline(device / 2**30, color="k", linestyle="--", label=f"device {human(device)}")
    ax.set_ylabel("GiB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _lora_table_text() -> str:
    t = M.lora_table()
    cols = ["7B", "13B", "70B", "180B"]
    out = ["Generalised (lecture): a model of N parameters as one sqrt(N) x sqrt(N) matrix, LoRA adds 2*r*sqrt(N)",
           "Rank".ljust(8) + "".join(c.rjust(8) for c in cols)]
    for r, cells in t["generalised"].items():
        out.append(str(r).ljust(8) + "".join(c.rjust(8) for c in cells))
    out += ["", "Real per-architecture counts (LoRA r*(d_in+d_out) per adapted matrix; '-' = rank above a layer's",
            "size; Falcon's q,v = its fused query_key_value)"]
    header = "Rank".ljust(8) + "".join(f"{m} {k}".rjust(17) for m in t["models"] for k in ("q,v", "all"))
    out.append(header)
    for r in M.LECTURE_RANKS:
        cells = []
        for m in t["models"]:
            for k in ("q,v", "all-linear"):
                v = t["real"][m][k][r]
                cells.append("-" if v is None else f"{v:,}")
        out.append(str(r).ljust(8) + "".join(c.rjust(17) for c in cells))
    out.append("Full".ljust(8) + "".join(f"{t['real'][m]['params'][0]:,}".rjust(34) for m in t["models"]))
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    if args.list_presets:
        for name in M.PRESETS:
            print(f"{name:24s} {M.load_arch(name).num_params:>18,} params")
        return 0
    if args.lora_table:
        if args.json:
            print(json.dumps(M.lora_table(), indent=2, default=str))
        else:
            print(_lora_table_text())
        return 0
    if not args.model:
        raise ValueError("name a model (preset, config.json or folder), or give --lora-table / --list-presets")
    arch = M.load_arch(args.model)
    settings = dict(parse_override(o) for o in args.overrides)
    setup = M.TrainSetup(method=args.method, method_args=settings, precision=args.precision,
                         quant=args.quant, double_quant=args.double_quant, optimizer=args.optimizer,
                         batch_size=args.batch_size, seq_len=args.seq_len,
                         gradient_checkpointing=args.gradient_checkpointing, attention=args.attention,
                         activation_model=args.activation_model)
    device = M.parse_bytes(args.device_memory) if args.device_memory else None
    rows = M.compare(arch, setup) if args.compare else {args.method: M.estimate(arch, setup)}
    if args.json:
        data: Any = {k: b.as_dict() for k, b in rows.items()} if args.compare else rows[args.method].as_dict()
        if device is not None:
            for d in data.values() if args.compare else [data]:
                d["device_bytes"], d["fits"] = device, d["total_bytes"] <= device
        print(json.dumps(data, indent=2))
    else:
        print(f"{arch.name}: {arch.num_params:,} params, batch {setup.batch_size} x {setup.seq_len} tokens, "
              f"{setup.precision}, {setup.optimizer}" + (", gradient checkpointing" if
                                                         setup.gradient_checkpointing else ""))
        print(_table(rows, device))
    if args.plot:
        _plot(rows, args.plot, f"{arch.name}, b={setup.batch_size}, s={setup.seq_len}", device)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0
