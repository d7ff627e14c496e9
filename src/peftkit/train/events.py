"""What a run tells the outside: its plan before it starts, a typed event per step, its summary at the end; and
how the outside controls it (stop at the next step boundary) from another thread.

The CLI and any UI are clients of the same objects: `Trainer.plan`, `Trainer.subscribe`, `Trainer.request_stop`,
`Trainer.start` and the `TrainResult` that `Trainer.run` returns.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftkit.train.pipeline import DataSummary

__all__ = ["RunControl", "RunHandle", "RunPlan", "StepEvent", "TrainResult"]


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run will do, known once its model and data are ready (before it trains)."""

    method: str
    params: dict[str, float]  # trainable, total, percent
    data: DataSummary
    total_steps: int
    output_dir: Path
    is_main: bool  # this process reports (rank 0)
    trackers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """One optimizer step, as logged: ``eval`` holds the evaluation's scores on the steps that evaluated."""

    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float
    target_tokens_per_s: float
    epoch: int
    skipped: bool = False
    eval: dict[str, float] = dataclasses.field(default_factory=dict)
    mfu: float | None = None
    ewc_penalty: float | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any], total_steps: int) -> StepEvent:
        return cls(step=record["step"], total_steps=total_steps, loss=record["loss"], lr=record["lr"],
                   grad_norm=float(record["grad_norm"]), target_tokens_per_s=record["target_tokens_per_s"],
                   epoch=record["epoch"], skipped=record.get("skipped", False),
                   eval={k: v for k, v in record.items() if k.startswith("eval_")}, mfu=record.get("mfu"),
                   ewc_penalty=record.get("ewc_penalty"))


@dataclasses.dataclass
class TrainResult:
    """The summary of a run (`Trainer.run`). `stopped`: it ended early on `request_stop` (or `until_step`) after
    a checkpoint, and ``--resume`` continues it; the adapter is written only when the run reached its last step."""

    output_dir: Path
    adapter_dir: Path | None
    steps: int
    train_loss: float
    eval_loss: float | None
    train_seconds: float
    target_tokens: int
    tokens: int
    params: dict[str, float]
    precision: str = "fp32"
    model_flops: float = 0.0
    matmul_peak: float | None = None  # FLOP/s per process in the compute dtype (CPU runs)
    processes: int = 1
    final_scores: dict[str, float] = dataclasses.field(default_factory=dict)  # eval loss and eval_metric scores
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per step: loss (and eval scores)
    best: dict[str, Any] | None = None  # the save_best metric's best evaluation
    stopped: bool = False
    is_main: bool = True
    trackers: tuple[str, ...] = ()

    @property
    def target_tokens_per_s(self) -> float:
        return self.target_tokens / max(self.train_seconds, 1e-9)

    @property
    def mfu(self) -> float | None:
        """Achieved model FLOP/s over the measured matmul peak (`peftkit.train.flops`, `peftkit.hardware`)."""
        if not self.matmul_peak:
            return None
        return self.model_flops / max(self.train_seconds, 1e-9) / (self.matmul_peak * self.processes)


class RunControl:
    """A stop flag any thread may set, and the listeners that receive a run's events (in the training thread;
    a listener that raises stops the run with its error)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._listeners: list[Callable[[StepEvent], None]] = []

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def subscribe(self, listener: Callable[[StepEvent], None]) -> None:
        """Call `listener(event)` after every step (e.g. ``queue.put`` to watch from another thread)."""
        self._listeners.append(listener)

    def emit(self, event: StepEvent) -> None:
        for listener in self._listeners:
            listener(event)


class RunHandle:
    """A run started in a background thread (`Trainer.start`): stop it, wait for its `TrainResult`."""

    def __init__(self, run: Callable[[], TrainResult], control: RunControl) -> None:
        self._control = control
        self._result: TrainResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(run,), name="peftkit-train", daemon=True)
        self._thread.start()

    def _main(self, run: Callable[[], TrainResult]) -> None:
        try:
            self._result = run()
        except BaseException as e:  # noqa: BLE001 - handed to the thread that waits
            self._error = e

    def stop(self) -> None:
        """Stop at the next step boundary (a checkpoint is written there, so ``--resume`` continues)."""
        self._control.request_stop()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> TrainResult:
        """Wait for the run; its summary, or the error it ended with."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the training run is still going after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
