"""Evaluation: sample quality against real data, in standard feature spaces."""
from scoretk.evaluation.evaluate import (Settings, evaluate, evaluate_file, figures,
                                         format_report, score_space)
from scoretk.evaluation.sources import EvaluationError, file_source, tensor_source

__all__ = ["EvaluationError", "Settings", "evaluate", "evaluate_file", "figures", "file_source",
           "format_report", "score_space", "tensor_source"]
