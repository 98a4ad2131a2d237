"""A training run's directory: start over or resume, check the recipe against the
checkpoint's, write the resolved recipe and the checkpoints.

Only rank 0 writes; the other ranks read the checkpoint rank 0 chose once it is ready.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from scoretk.checkpoint import RunDir, load_checkpoint
from scoretk.execution.distributed import Dist
from scoretk.files import atomic_write_text
from scoretk.recipe import FIXED_BY_RUN, Recipe, RecipeError
from scoretk.registry import Registry


class TrainingRun:
    """runs/<name>/ (or the given directory) as one training command uses it."""

    def __init__(self, path: str | Path, dist: Dist):
        self.dir, self.dist = RunDir(path), dist

    @classmethod
    def for_recipe(cls, recipe: Recipe, run_dir: str | Path | None, dist: Dist) -> "TrainingRun":
        return cls(run_dir or recipe.train.run_dir or Path("runs") / recipe.name, dist)

    @property
    def path(self) -> Path:
        return self.dir.path

    def open(self, restart: bool) -> dict[str, Any] | None:
        """The checkpoint state to resume from, or None for a fresh start. --restart clears
        the old run first (rank 0), and every rank reads the same checkpoint."""
        state = None
        if self.dist.is_main:
            if restart:
                self._clear()
            else:
                state = self._latest_state()
            self.dir.create()
        self.dist.barrier()
        if not self.dist.is_main and not restart:
            state = self._latest_state()
        return state

    def _latest_state(self) -> dict[str, Any] | None:
        latest = self.dir.latest()
        return load_checkpoint(latest) if latest is not None else None

    def _clear(self) -> None:
        for path in (self.dir.checkpoints, self.dir.samples):
            shutil.rmtree(path, ignore_errors=True)
        for path in (self.dir.metrics, self.dir.latest_pointer):
            path.unlink(missing_ok=True)

    def check_resumable(self, state: dict[str, Any], resolved: Recipe,
                        registry: Registry) -> None:
        """A resume must train the same model: the sections a run fixes must agree."""
        stored = Recipe.from_dict(state["recipe"], registry, source=f"{self.dir.latest()}")
        mine, theirs = resolved.dump(), stored.dump()
        if any(mine[s] != theirs[s] for s in FIXED_BY_RUN):
            raise RecipeError(str(self.path), None, f"the recipe's {'/'.join(FIXED_BY_RUN)} "
                              "differ from the checkpoint's; use --restart to start over or "
                              "--run-dir for a new run")

    def write_recipe(self, resolved: Recipe) -> None:
        if self.dist.is_main:
            atomic_write_text(self.dir.recipe, resolved.to_yaml())

    def save(self, state: dict[str, Any], step: int, keep: int) -> Path:
        return self.dir.save(state, step, keep)

    def latest(self) -> Path | None:
        return self.dir.latest()
