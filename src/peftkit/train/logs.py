"""What a run writes as it goes: ``metrics.jsonl``, the trackers, the progress bar, ``run.json`` and the loss plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from peftkit.core.adapter_io import writing
from peftkit.hardware import Precision
from peftkit.train.checkpoint import write_text_atomic
from peftkit.train.flops import FlopCount
from peftkit.train.tracking import Tracking

__all__ = ["RunLog", "plot_loss", "significant", "write_run_info"]


def significant(x: float) -> float:
    return float(f"{x:.4g}")


class RunLog:
    """The step records of one run: to ``metrics.jsonl`` every `log_every` steps (main process), to the trackers
    and to the progress bar. A resumed run first cuts the log back to its checkpoint's step."""

    def __init__(self, output_dir: Path, tracking: Tracking, log_every: int, is_main: bool) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.tracking, self.log_every, self.is_main = tracking, log_every, is_main
        self.progress: Any = None

    def start(self, accelerator: Any, config: dict[str, Any], step: int, total_steps: int, bar: bool) -> None:
        from tqdm.auto import tqdm

        if self.is_main:
            _cut_log(self.path, step)
        self.tracking.start(accelerator, config)
        self.progress = tqdm(total=total_steps, initial=step, disable=not (bar and self.is_main), desc="train",
                             unit="step", dynamic_ncols=True)

    def step(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if self.is_main and step % self.log_every == 0:
            with writing(self.path), self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.tracking.log(record, step)
        self.progress.update(1)
        postfix = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['target_tokens_per_s']:.0f}",
                   "GFLOP/s": f"{record['model_flops_per_s'] / 1e9:.0f}"}
        if "mfu" in record:
            postfix["mfu"] = f"{record['mfu']:.0%}"
        self.progress.set_postfix(postfix)

    def finish(self, history: list[dict[str, Any]], final: dict[str, Any] | None, step: int) -> None:
        """Close the bar; with `final` scores (the run reached its end), the loss plot and the final scores."""
        if self.progress is not None:
            self.progress.close()
        if final is not None and self.is_main:
            plot = self.path.parent / "loss.png"
            plot_loss(history, plot)
            self.tracking.log({f"final/{k}": v for k, v in final.items()}, step)
            self.tracking.log_plot(plot, step)

    def close(self) -> None:
        self.tracking.finish()


def write_run_info(output_dir: Path, precision: Precision, device: torch.device, world: int, peak: float | None,
                   flops: FlopCount) -> None:
    """``run.json``: the precision the run uses and why, and the hardware it ran on."""
    from peftkit import hardware

    info = {"precision": precision.name, "precision_requested": precision.requested,
            "precision_reason": precision.reason, "hardware": hardware.describe(device),
            "processes": world, "threads": torch.get_num_threads(),
            "matmul_peak_flops_per_s": None if peak is None else significant(peak),
            "model_flops": dataclasses.asdict(flops)}
    with writing(output_dir / "run.json"):
        (output_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")


def _cut_log(path: Path, step: int) -> None:
    """Keep the rows of steps up to `step` (a resumed run redoes the later ones; a row cut short by a kill goes)."""
    kept = []
    if step and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    write_text_atomic(path, "".join(line + "\n" for line in kept))  # a full disk then keeps the old log whole


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, label="train loss")
    evals = [h for h in history if h.get("eval_loss") is not None]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", lw=1, ms=3, label="eval loss")
        ax.legend(loc="upper left")
        names = sorted({k for h in evals for k in h} - {"step", "loss", "eval_loss"})
        if names:  # generation metrics (eval_metric) on their own axis
            right = ax.twinx()
            for i, name in enumerate(names):
                points = [h for h in evals if h.get(name) is not None]
                right.plot([h["step"] for h in points], [h[name] for h in points], "s--", lw=1, ms=3,
                           color=f"C{i + 2}", label=name.removeprefix("eval_"))  # C0, C1: the losses
            right.set_ylabel("eval metric")
            right.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (target tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with writing(path):
            fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
