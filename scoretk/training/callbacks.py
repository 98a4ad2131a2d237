"""The periodic work of the training loop, one small object each: log, preview grid,
checkpoint. Each says when it is due and does its work; the loop runs whatever is due after
a step, in list order, once the step's numbers are known to be finite."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

import scoretk

from scoretk.execution.policy import ExecutionPolicy
from scoretk.recipe import Recipe
from scoretk.generation.sample import init_rows
from scoretk.rng import PerSampleNoise, derive_seed, global_rng_state
from scoretk.training.builder import Trainer
from scoretk.training.log import LogWindow, write_record
from scoretk.training.quality import EvalSetup, EvaluateSamples
from scoretk.training.run import TrainingRun


@dataclass
class StepInfo:
    step: int  # steps done
    stop: str | None  # "signal" or "time" when the run stops after this step (all ranks agree)
    final: bool  # the recipe's last step


@dataclass
class Session:
    """One training command's state, shared by the loop and its periodic work."""

    recipe: Recipe  # resolved
    run: TrainingRun
    trainer: Trainer
    policy: ExecutionPolicy
    item_shape: tuple[int, ...]
    window: LogWindow
    bar: tqdm
    writer: Any  # a tensorboard SummaryWriter or None
    last_checkpoint: Path | None = None
    step: int = 0  # steps done
    best: dict[str, Any] | None = None  # train.eval_every's best figure so far, and its step

    @property
    def is_main(self) -> bool:
        return self.policy.dist.is_main

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        """Everything a resume needs."""
        return {**self.trainer.state_dict(), "step": step, "recipe": self.recipe.dump(),
                "shape": list(self.item_shape), "rng": global_rng_state(),
                "eval_best": self.best, "scoretk_version": scoretk.__version__,
                "torch_version": str(torch.__version__)}

    def draw(self, purpose: str, count: int, batch: int, data: Any = None,
             bar: tqdm | None = None) -> Tensor:
        """`count` samples with the averaged weights, in batches, from noise seeded by
        (train.seed, purpose) alone: the same at every call, so only the weights differ.
        `data` gives data-started samplers their starting items."""
        t, device = self.trainer, self.policy.device
        sampler, seed = t.model.sampler, derive_seed(self.recipe.train.seed, purpose)
        net, out = self.policy.for_sampling_net(t.net), []
        was_training = t.net.training
        t.net.eval()
        with torch.no_grad(), t.averager.averaged(t.net):
            for start in range(0, count, batch):
                rows = range(start, min(start + batch, count))
                init = init_rows(data, seed, rows).to(device) if data is not None \
                    and sampler.starts_from_data else None
                out.append(sampler.sample(net, t.model.schedule, t.model.shape,
                                          PerSampleNoise(seed, rows, device), device=device,
                                          init=init).float().cpu())
                if bar is not None:
                    bar.update(len(rows))
        t.net.train(was_training)
        return torch.cat(out)

    def save(self, step: int) -> Path:
        """Write a numbered checkpoint (rank 0 only)."""
        self.last_checkpoint = self.run.save(self.checkpoint_state(step), step,
                                             self.recipe.train.keep_checkpoints)
        return self.last_checkpoint


class Periodic(Protocol):
    def due(self, info: StepInfo) -> bool:
        """Whether to run after this step; the same answer on every rank."""

    def __call__(self, info: StepInfo) -> None: ...


class LogMetrics:
    """Averages over the window to metrics.jsonl, TensorBoard and the progress bar."""

    def __init__(self, session: Session):
        self.s, self.every = session, session.recipe.train.log_every

    def due(self, info: StepInfo) -> bool:
        return info.step % self.every == 0 or info.final

    def __call__(self, info: StepInfo) -> None:
        record = self.s.window.flush(info.step)
        self.s.bar.set_postfix(loss=f"{record['loss']:.4g}",
                               img_s=f"{record['items_per_s']:.0f}")
        if self.s.is_main:
            write_record(self.s.run.dir, record, self.s.writer)


class PreviewGrid:
    """A PNG of samples with the averaged weights, from the same noise every time, so the
    grids of one run can be compared (images only; rank 0)."""

    def __init__(self, session: Session):
        self.s, self.every = session, session.recipe.train.sample_every

    def due(self, info: StepInfo) -> bool:
        return bool(self.every) and info.step % self.every == 0 and len(self.s.item_shape) == 3

    def __call__(self, info: StepInfo) -> None:
        if not self.s.is_main:
            return
        from scoretk.images import save_grid

        size = self.s.recipe.train.grid_size
        x = self.s.draw("grid", size, size)
        run = self.s.run.dir
        save_grid(x, run.claim(run.samples / f"step-{info.step:08d}.png"))


class SaveCheckpoint:
    """Every `checkpoint_every` steps, at the last step and before any stop."""

    def __init__(self, session: Session):
        self.s, self.every = session, session.recipe.train.checkpoint_every

    def due(self, info: StepInfo) -> bool:
        return info.step % self.every == 0 or info.final or info.stop is not None

    def __call__(self, info: StepInfo) -> None:
        if self.s.is_main:
            self.s.save(info.step)
        self.s.policy.dist.barrier()


def default_callbacks(session: Session, evaluation: EvalSetup | None = None) -> list[Periodic]:
    return [LogMetrics(session), PreviewGrid(session), EvaluateSamples(session, evaluation),
            SaveCheckpoint(session)]
