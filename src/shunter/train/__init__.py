"""Train MoE language models here, on this machine, from text (the built-in model is made this way)."""

from shunter.train.trainer import TrainConfig, Trainer, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer"]
