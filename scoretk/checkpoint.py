"""Checkpoints and run directories that survive crashes.

Every file is written through `scoretk.files.atomic_write` (temporary name, fsync, rename):
a crash or Ctrl-C leaves either the old complete file or the new complete one.
`latest` is a one-line text file naming the newest complete checkpoint, updated the same way
after the checkpoint itself is in place. Loading is weights-only: a checkpoint cannot run code.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

from scoretk.files import atomic_write, atomic_write_text

CHECKPOINT_FORMAT = "scoretk-checkpoint-1"
RUNS_ROOT = Path("runs")


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, unsafe or not scoretk's."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    state = {"format": CHECKPOINT_FORMAT, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True; every failure becomes one CheckpointError line."""
    path = Path(path)
    state = load_weights_only(path, map_location)
    if isinstance(state, (list, tuple)):
        raise CheckpointError(f"{path}: not a scoretk checkpoint but a list, as the released "
                              "NCSN/NCSNv2 code saves them: convert it with `scoretk import "
                              f"{path} --recipe RECIPE --run-dir DIR`")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a scoretk checkpoint (no '{CHECKPOINT_FORMAT}' "
                              "format marker)")
    return state


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True) of any torch file (scoretk's, or the released NCSN
    code's lists); a missing, unreadable or unsafe file becomes one CheckpointError line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; pass a checkpoint file or use --run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "global" not in text.lower():  # garbage bytes, not a forbidden object
            raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or not a torch "
                                  "file)") from None
        what = next((line.strip() for line in text.splitlines() if "global" in line.lower()), "")
        raise CheckpointError(f"{path}: refused: the file holds Python objects that "
                              f"weights-only loading does not allow ({what[:160]})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types on garbage input
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated: "
                              f"{type(exc).__name__})") from None
    return state


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RunDir:
    """runs/<name>/: recipe.yaml, checkpoints/ckpt-<step>.pt, latest, metrics.jsonl, samples/."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.samples = self.path / "samples"
        self.metrics = self.path / "metrics.jsonl"
        self.recipe = self.path / "recipe.yaml"
        self.latest_pointer = self.path / "latest"

    def create(self) -> "RunDir":
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.samples.mkdir(parents=True, exist_ok=True)
        return self

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. Falls back to scanning if the pointer is
        missing (e.g. a crash between the checkpoint rename and the pointer rename)."""
        if self.latest_pointer.exists():
            target = self.checkpoints / self.latest_pointer.read_text().strip()
            if target.is_file():
                return target
        found = sorted(self.checkpoints.glob("ckpt-*.pt"), key=checkpoint_step)
        return found[-1] if found else None

    def save(self, state: dict[str, Any], step: int, keep: int) -> Path:
        path = self.checkpoints / f"ckpt-{step:08d}.pt"
        save_checkpoint(state, path)
        atomic_write_text(self.latest_pointer, path.name + "\n")
        for old in sorted(self.checkpoints.glob("ckpt-*.pt"), key=checkpoint_step)[:-keep]:
            old.unlink(missing_ok=True)
        return path


def checkpoint_step(path: str | Path) -> int:
    """The step in a checkpoint's name (ckpt-<step>.pt), or -1 for another name."""
    try:
        return int(Path(path).stem.split("-")[1])
    except (IndexError, ValueError):
        return -1


def most_recent_run(root: str | Path = RUNS_ROOT) -> RunDir | None:
    """The run under `root` whose latest checkpoint was written last."""
    root = Path(root)
    best: tuple[float, RunDir] | None = None
    if root.is_dir():
        for sub in root.iterdir():
            run = RunDir(sub)
            ckpt = run.latest() if sub.is_dir() else None
            if ckpt is not None:
                mtime = ckpt.stat().st_mtime
                if best is None or mtime > best[0]:
                    best = (mtime, run)
    return best[1] if best else None
