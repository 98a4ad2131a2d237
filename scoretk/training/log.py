"""Training metrics: sums over a logging window kept on the device, written as one JSON line
per window to <run>/metrics.jsonl, and to TensorBoard when it is installed."""
from __future__ import annotations

import json
import time

import torch

from scoretk.checkpoint import RunDir


class LogWindow:
    """Running sums over a logging window, kept on the device: no per-step host sync."""

    def __init__(self, num_levels: int, device: torch.device):
        self.num_levels, self.device = num_levels, device
        self.reset()

    def reset(self) -> None:
        zeros = lambda *s: torch.zeros(*s, device=self.device, dtype=torch.float64)  # noqa: E731
        self.loss, self.grad, self.n = zeros(()), zeros(()), 0
        self.level_sum, self.level_count = zeros(self.num_levels), zeros(self.num_levels)
        self.items, self.t0 = 0, time.perf_counter()

    def add(self, loss, grad_norm, stats: dict, items: int) -> None:
        self.loss += loss.double()
        self.grad += grad_norm.double()
        self.n += 1
        self.items += items
        if "level_loss_sum" in stats:
            self.level_sum += stats["level_loss_sum"].detach().double()
            self.level_count += stats["level_count"].detach().double()

    def flush(self, step: int) -> dict:
        elapsed = time.perf_counter() - self.t0
        per_level = (self.level_sum / self.level_count.clamp(min=1)).cpu()
        counts = self.level_count.cpu()
        # Four bands of levels, largest sigmas first: a compact view of where the loss sits.
        bands = {}
        for chunk in torch.arange(self.num_levels).chunk(4):
            seen = counts[chunk] > 0
            if seen.any():
                name = f"levels_{int(chunk[0])}-{int(chunk[-1])}"
                bands[name] = float(per_level[chunk][seen].mean())
        record = {"step": step, "loss": float(self.loss / max(self.n, 1)),
                  "grad_norm": float(self.grad / max(self.n, 1)),
                  "items_per_s": self.items / max(elapsed, 1e-9), "level_loss": bands,
                  "time": time.time()}
        self.reset()
        return record


def write_record(run: RunDir, record: dict, writer) -> None:
    """One line of metrics.jsonl (and the scalars to tensorboard, when it is there)."""
    run.append_line(run.metrics, json.dumps(record), "metrics")
    if writer is not None:
        for key in ("loss", "grad_norm", "items_per_s"):
            writer.add_scalar(f"train/{key}", record[key], record["step"])


def open_tensorboard(run: RunDir):
    """A SummaryWriter under <run>/tensorboard, or None: tensorboard is optional."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    folder = run.claim_folder("tensorboard", "events.out.tfevents.*")
    return SummaryWriter(str(folder))
