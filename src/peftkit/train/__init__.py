"""Training: the config, the one loop, checkpoints."""

from peftkit.train.config import TrainConfig, load_recipe
from peftkit.train.trainer import Trainer, TrainResult, count_parameters

__all__ = ["TrainConfig", "TrainResult", "Trainer", "count_parameters", "load_recipe"]
