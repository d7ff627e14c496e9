"""Training: the config, the one loop and its parts (pipeline, step, loss, evaluator, checkpoints, events)."""

from peftkit.train.config import TrainConfig, load_recipe
from peftkit.train.events import RunHandle, RunPlan, StepEvent, TrainResult
from peftkit.train.model import count_parameters
from peftkit.train.trainer import Trainer

__all__ = ["RunHandle", "RunPlan", "StepEvent", "TrainConfig", "TrainResult", "Trainer", "count_parameters",
           "load_recipe"]
