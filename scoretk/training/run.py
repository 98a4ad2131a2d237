"""A training run's directory: start over or resume, check the recipe against the
checkpoint's, write the resolved recipe and the checkpoints.

Only rank 0 writes, and it holds the run's lock (a file lock the kernel drops when the process
ends) while the command trains; the other ranks read the checkpoint rank 0 chose once it is
ready. scoretk writes only files it lists in the run's manifest (checkpoint.RunDir).
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from scoretk.checkpoint import CheckpointError, RunDir, RunDirError, load_checkpoint
from scoretk.execution.distributed import Dist
from scoretk.files import FileLock
from scoretk.recipe import FIXED_BY_RUN, Recipe, RecipeError
from scoretk.registry import Registry

MAY_CHANGE_ON_RESUME = ("optim", "train", "sampler", "sample")
"""Sections a resume applies when they changed (and says so); FIXED_BY_RUN must agree."""


class TrainingRun:
    """runs/<name>/ (or the given directory) as one training command uses it."""

    def __init__(self, path: str | Path, dist: Dist):
        self.dir, self.dist = RunDir(path), dist
        self.resumed_from: Path | None = None

    @classmethod
    def for_recipe(cls, recipe: Recipe, run_dir: str | Path | None, dist: Dist) -> "TrainingRun":
        return cls(run_dir or recipe.train.run_dir or Path("runs") / recipe.name, dist)

    @property
    def path(self) -> Path:
        return self.dir.path

    @contextlib.contextmanager
    def open(self, restart: bool) -> Iterator[dict[str, Any] | None]:
        """Hold the run for the block (rank 0 locks it) and yield the checkpoint state to
        resume from, or None for a fresh start. --restart removes the old run's files only
        after the checks here pass (the caller ran the others before), and only scoretk's.
        A directory this command made goes again if the command fails before writing in it."""
        made = [p for p in (self.path, *self.path.parents) if not p.exists()][::-1] \
            if self.dist.is_main else []
        lock = None
        try:
            if self.dist.is_main:
                lock = self._lock()
                self._prepare(restart)
            state = None if restart or not self.dist.is_main else self._latest_state()
            self.dist.barrier()
            if not restart and not self.dist.is_main:
                state = self._latest_state()
            yield state
        except BaseException:
            if made and lock is not None:
                self._remove_unused(made)
            raise
        finally:
            if lock is not None:
                self._release(lock)

    def _lock(self) -> FileLock:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            return FileLock(self.dir.lock_file, f"{self.path}").acquire()
        except OSError as exc:
            raise RunDirError(f"{self.path}: cannot write to the run directory "
                              f"({exc.strerror or exc})") from None

    def _release(self, lock: FileLock) -> None:
        """Forget claimed files that were never written; a directory in which scoretk wrote
        nothing keeps no lock file either."""
        if self.dir.manifest.exists():
            self.dir.forget_missing()
        else:
            self.dir.lock_file.unlink(missing_ok=True)
        lock.release()

    def _prepare(self, restart: bool) -> None:
        """Rank 0, holding the lock: refuse a user's file where scoretk writes (before
        anything is removed), clear the old run on --restart, drop stale temporary files."""
        d = self.dir
        fixed = (d.recipe, d.metrics, d.latest_pointer)
        d.claim(*fixed)
        if restart:
            d.clear()
            d.claim(*fixed)
        d.remove_stale_temps()
        d.create()

    def _latest_state(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads: an unreadable one is skipped with a warning."""
        first_error = None
        for path in self.dir.newest_first():
            try:
                state = load_checkpoint(path)
            except CheckpointError as exc:
                first_error = first_error or exc
                self._warn(f"{exc}; trying the checkpoint before it")
                continue
            if first_error is not None:
                self._warn(f"resuming from {path}, the newest checkpoint that loads")
            self.resumed_from = path
            return state
        if first_error is not None:
            raise first_error
        return None

    def _warn(self, text: str) -> None:
        if self.dist.is_main:
            print(f"warning: {text}", file=sys.stderr)

    def _remove_unused(self, made: list[Path]) -> None:
        """After a failure: the directories this command made, if nothing was written there
        but the lock and the manifest."""
        d = self.dir
        if not d.path.is_dir() or any(p.is_file() and p not in (d.manifest, d.lock_file)
                                      for p in d.path.rglob("*")):
            return
        for p in (d.manifest, d.lock_file):  # the lock is still held: nobody else is in here
            p.unlink(missing_ok=True)
        folders = sorted(d.path.rglob("*"), key=lambda p: len(p.parts), reverse=True)
        for folder in folders + made[::-1]:
            with contextlib.suppress(OSError):
                folder.rmdir()

    def check_resumable(self, state: dict[str, Any], resolved: Recipe,
                        registry: Registry) -> list[str]:
        """A resume must train the same model: the sections a run fixes must agree. Returns
        the settings that may change and did, as 'optim.lr 0.0003 -> 0.001'."""
        stored = Recipe.from_dict(state["recipe"], registry, source=str(self.resumed_from))
        mine, theirs = resolved.dump(), stored.dump()
        if any(mine[s] != theirs[s] for s in FIXED_BY_RUN):
            raise RecipeError(str(self.path), None, f"the recipe's {'/'.join(FIXED_BY_RUN)} "
                              "differ from the checkpoint's; use --restart to start over or "
                              "--run-dir for a new run")
        return [f"{section}.{key} {_show(theirs[section].get(key))} -> {_show(value)}"
                for section in MAY_CHANGE_ON_RESUME
                for key, value in mine[section].items() if theirs[section].get(key) != value]

    def begin(self, resolved: Recipe, step: int) -> None:
        """Rank 0, once the resume is checked: the resolved recipe, and metrics.jsonl cut
        back to `step` (the steps after it run again)."""
        if self.dist.is_main:
            self.dir.cut_metrics(step)
            self.dir.write_text(self.dir.recipe, resolved.to_yaml(), "resolved recipe")

    def save(self, state: dict[str, Any], step: int, keep: int) -> Path:
        return self.dir.save(state, step, keep)

    def latest(self) -> Path | None:
        return self.dir.latest()


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
