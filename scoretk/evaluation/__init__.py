"""Evaluation: sample quality against real data."""
from scoretk.evaluation.evaluate import (evaluate, format_report, frechet_distance, main,
                                         precision_recall)

__all__ = ["evaluate", "format_report", "frechet_distance", "main", "precision_recall"]
