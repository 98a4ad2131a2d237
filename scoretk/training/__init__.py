"""Training: a run directory, the step the benchmarks also time, and the loop around it."""
from scoretk.training.loop import Interrupted, StepBatches, TrainingError, train

__all__ = ["Interrupted", "StepBatches", "TrainingError", "train"]
