"""Training the course models: `train(model, data, TrainConfig(...)) -> History` (see loop.py)."""

from .loop import (History, TrainConfig, arithmetic_accuracy, arithmetic_predictions, evaluate, lr_at,
                   next_token_loss, param_groups, train)

__all__ = ["History", "TrainConfig", "arithmetic_accuracy", "arithmetic_predictions", "evaluate", "lr_at",
           "next_token_loss", "param_groups", "train"]
