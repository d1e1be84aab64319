"""Training: the recipe (recipe.py), its loss (loss.py), its callbacks and reporter (callbacks.py),
the Trainer subclass (trainer.py), the speed paths (speed.py) and what a run leaves (report.py)."""

from nekotune.runs import COMPLETE, last_checkpoint
from nekotune.training.callbacks import TrainingInterrupted, TrainReporter
from nekotune.training.loss import chunked_trained_loss, loss_chunk, trained_positions_loss
from nekotune.training.recipe import build_peft_model, train, wants_grad_checkpointing, wants_liger

__all__ = ["COMPLETE", "TrainReporter", "TrainingInterrupted", "build_peft_model", "chunked_trained_loss",
           "last_checkpoint", "loss_chunk", "train", "trained_positions_loss", "wants_grad_checkpointing",
           "wants_liger"]
