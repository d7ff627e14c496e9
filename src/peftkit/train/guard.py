"""The divergence guard: whether a step may update the weights, and when a run must stop."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.train.checkpoint import latest_checkpoint

__all__ = ["DivergenceGuard"]


class DivergenceGuard:
    """Decides, before each optimizer step, whether the step may update the weights, and stops a run that has
    diverged or died, naming the cause and the last checkpoint.

    A step with a non-finite loss or gradient is skipped (up to `allowed` of them) or stops the run; with the fp16
    gradient scaler, an overflowing gradient is the scaler's to skip (it lowers its scale), unless it keeps
    overflowing. A run stops as dead when its gradient norm is exactly zero for `PATIENCE` steps in a row (nothing
    can learn: e.g. an output saturated by a huge update), and as diverged when its loss stays above
    ``max(2 x start, start + 2)`` for `PATIENCE` steps (start: the mean loss of the first `PATIENCE` steps).
    """

    PATIENCE = 3
    SCALER_PATIENCE = 20

    def __init__(self, allowed: int, output_dir: Path, precision: str, history: list[dict[str, Any]]) -> None:
        self.allowed, self.output_dir, self.precision = allowed, output_dir, precision
        self.skipped = self.zero = self.high = self.overflows = 0
        self.start_losses = [h["loss"] for h in history[:self.PATIENCE]]

    def check(self, step: int, loss: float, grad_norm: float, scaler: bool) -> str | None:
        """None (take the step) or "skip"; raises `PeftkitError` to stop the run."""
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            if scaler and math.isfinite(loss):
                self.overflows += 1
                if self.overflows < self.SCALER_PATIENCE:
                    return None  # the fp16 scaler skips this step and lowers its scale
                self.stop(step, f"fp16 gradients overflowed {self.overflows} steps in a row")
            self.skipped += 1
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
            if self.skipped > self.allowed:
                self.stop(step, f"{what} (non-finite){self._skips()}")
            print(f"peftkit: step {step} skipped: {what} ({self.skipped} of {self.allowed} allowed)", file=sys.stderr)
            return "skip"
        self.overflows = 0
        self.zero = self.zero + 1 if grad_norm == 0.0 else 0
        if self.zero >= self.PATIENCE:
            self.stop(step, f"the gradients were exactly zero for {self.zero} steps (a dead run: loss {loss:.4f})")
        if len(self.start_losses) < self.PATIENCE:
            self.start_losses.append(loss)
            return None
        start = sum(self.start_losses) / len(self.start_losses)
        self.high = self.high + 1 if loss > max(2 * start, start + 2) else 0
        if self.high >= self.PATIENCE:
            self.stop(step, f"the loss diverged: {loss:.4f} against {start:.4f} at the start")
        return None

    def _skips(self) -> str:
        return f", after {self.skipped - 1} skipped step(s)" if self.skipped > 1 else ""

    def stop(self, step: int, cause: str) -> None:
        last = latest_checkpoint(self.output_dir)
        advice = "try a lower lr" + (" or precision fp32" if self.precision != "fp32" else "")
        raise PeftkitError(f"training stopped at step {step}: {cause}. Last checkpoint (finite weights, verified when "
                           f"saved): {last or 'none (set save_every)'}; {advice}.")
