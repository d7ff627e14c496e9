"""Experiment tracking: TensorBoard, Weights & Biases and MLflow through Accelerate's trackers.

`report_to` (a TrainConfig key) names the trackers; the trainer passes `accelerator_kwargs` to its `Accelerator`,
calls `start` once the run owns its folder, `log` every logged step and `finish` at the end. Everything is written
under the run's folder and works offline: TensorBoard event files in ``<output_dir>/logs/``, W&B in offline mode in
``<output_dir>/wandb/`` (unless ``WANDB_MODE`` says otherwise; `wandb sync` uploads it later), MLflow in a file store
``<output_dir>/mlruns/`` (unless ``MLFLOW_TRACKING_URI`` points elsewhere).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

__all__ = ["TRACKERS", "Tracking", "check_report_to"]

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""Tracker name -> the package it needs (``pip install <package>``)."""


def check_report_to(report_to: Sequence[str]) -> list[str]:
    """The trackers `report_to` names, validated: known names, "none" alone, their packages installed."""
    names = list(dict.fromkeys(report_to))
    if "none" in names:
        if len(names) > 1:
            raise PeftkitError(f"report_to: 'none' cannot be combined with other trackers, got {names}")
        return []
    for name in names:
        if name not in TRACKERS:
            raise PeftkitError(f"report_to: unknown tracker {name!r} (known: none, {', '.join(TRACKERS)})")
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            raise PeftkitError(f"report_to: {name} needs the {package!r} package: pip install {package}")
    return names


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """A flat mapping of scalars (what every tracker accepts): nested keys dotted, lists and None as text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _hparams(value).items()})
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = str(value)
    return flat


class Tracking:
    """The trackers of one run (a no-op without any)."""

    def __init__(self, report_to: Sequence[str], output_dir: Path):
        self.names = check_report_to(report_to)
        self.output_dir = output_dir
        self.accelerator = None
        self._mlflow_uri: str | None = None

    def accelerator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `Accelerator(...)`."""
        if not self.names:
            return {}
        from accelerate.utils import ProjectConfiguration

        return {"log_with": self.names,
                "project_config": ProjectConfiguration(project_dir=str(self.output_dir),
                                                       logging_dir=str(self.output_dir / "logs"))}

    def start(self, accelerator, config: dict[str, Any]) -> None:
        """Open the trackers (main process only, as Accelerate does) and record the run's configuration."""
        if not self.names:
            return
        self.accelerator = accelerator
        init: dict[str, dict[str, Any]] = {"wandb": {"dir": str(self.output_dir)}}
        if "WANDB_MODE" not in os.environ:
            init["wandb"]["mode"] = "offline"
        if "mlflow" in self.names and "MLFLOW_TRACKING_URI" not in os.environ and accelerator.is_main_process:
            import mlflow

            # a local file store needs no server and no database package (MLflow 3 asks for this opt-in)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self._mlflow_uri = mlflow.get_tracking_uri()  # put back by finish()
            mlflow.set_tracking_uri((self.output_dir / "mlruns").resolve().as_uri())
        accelerator.init_trackers(self.output_dir.name or "peftkit", config=_hparams(config),
                                  init_kwargs={k: v for k, v in init.items() if k in self.names})

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.accelerator is not None:
            numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.accelerator.log(numbers, step=step)

    def log_plot(self, path: Path, step: int) -> None:
        """The loss plot (a PNG the trainer wrote) as an image / artifact."""
        if self.accelerator is None or not path.is_file() or not self.accelerator.is_main_process:
            return
        import matplotlib.image

        image = matplotlib.image.imread(path)[..., :3]
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"loss_curve": image[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"loss_curve": [image]}, step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_artifact(str(path))

    def finish(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()
            self.accelerator = None
        if self._mlflow_uri is not None:
            import mlflow

            mlflow.set_tracking_uri(self._mlflow_uri)
            self._mlflow_uri = None
