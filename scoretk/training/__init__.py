"""Training: a run directory, the step the benchmarks also time, and the loop around it."""
from scoretk.training.batches import StepBatches
from scoretk.training.loop import Interrupted, TrainingError, train

__all__ = ["Interrupted", "StepBatches", "TrainingError", "train"]
