"""Checkpoints and run directories that survive crashes.

Every file is written through `scoretk.files.atomic_write` (temporary name, fsync, rename):
a crash or Ctrl-C leaves either the old complete file or the new complete one.
`latest` is a one-line text file naming the newest complete checkpoint, updated the same way
after the checkpoint itself is in place. Loading is weights-only: a checkpoint cannot run code.

A run directory may hold a user's files too (`--run-dir .`). scoretk records every file it
writes there in a manifest before writing it, never writes over a file the manifest does not
list, and `--restart` removes exactly the listed files (docs in README.md, "Runs,
checkpoints, resuming").
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch

from scoretk.files import (atomic_write, atomic_write_text, deferred_signals,
                           remove_stale_temps)

CHECKPOINT_FORMAT = "scoretk-checkpoint-1"
RUNS_ROOT = Path("runs")
CHECKPOINT_NAME = re.compile(r"ckpt-(\d+)\.pt")
"""The numbered checkpoints: the only files pruning deletes and `latest` may name."""
MANIFEST = ".scoretk-files"
LOCK = ".scoretk-lock"
_MANIFEST_HEADER = "# files scoretk wrote in this run directory; --restart removes exactly these"


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, unsafe or not scoretk's."""


class RunDirError(CheckpointError):
    """A run directory scoretk cannot use as asked (a file of the user's where scoretk would
    write, not writable, in use); the message is one line."""


class _KeepWriteErrors:
    """A file object that keeps the OSError its write raised: torch.save reports a failed
    write (disk full, file too large) only as an 'unexpected pos' RuntimeError."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:  # the rest is the file's own
        return getattr(self.f, name)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically; a failed write (disk full, read-only, too large) is one
    CheckpointError naming the file, and leaves whatever was at `path` before."""
    state = {"format": CHECKPOINT_FORMAT, **state}

    def write(f: BinaryIO) -> None:
        out = _KeepWriteErrors(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None

    with _write_errors(path, "checkpoint"):
        atomic_write(path, write)


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


@contextlib.contextmanager
def _write_errors(path: str | Path, what: str) -> Iterator[None]:
    """An OSError while writing `path` -> one CheckpointError line naming it."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise CheckpointError(f"{path}: cannot write the {what}: {reason} (what was written "
                              "before is intact)") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RunDir:
    """runs/<name>/: recipe.yaml, checkpoints/ckpt-<step>.pt, latest, metrics.jsonl, samples/.

    Reading (`latest`, sampling) needs only these names. Writing goes through `claim`, which
    records the name in the manifest first: see the module docstring.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.samples = self.path / "samples"
        self.metrics = self.path / "metrics.jsonl"
        self.recipe = self.path / "recipe.yaml"
        self.latest_pointer = self.path / "latest"
        self.manifest = self.path / MANIFEST
        self.lock_file = self.path / LOCK
        self._owned: list[str] | None = None

    # --- what scoretk wrote here ------------------------------------------------------------

    @property
    def owned(self) -> list[str]:
        """Manifest entries: paths relative to the run, `dir/` for a folder scoretk made, or
        a glob for files a library names (tensorboard's event files)."""
        if self._owned is None:
            if self.manifest.is_file():
                lines = self.manifest.read_text().splitlines()
                self._owned = [line for line in lines if line and not line.startswith(("#", "/"))
                               and ".." not in line.split("/")]
            else:
                self._owned = []
                self._record(*self._legacy_files())
        return self._owned

    def _legacy_files(self) -> list[str]:
        """A run an older scoretk wrote (checkpoints but no manifest): its files, by name."""
        if not (self.numbered() or self.latest_pointer.is_file()):
            return []
        grids = sorted(self.samples.glob("step-*.png")) if self.samples.is_dir() else []
        fixed = [p for p in (self.latest_pointer, self.recipe, self.metrics) if p.is_file()]
        return ["checkpoints/", "samples/"] + [self._rel(p) for p in
                                               fixed + self.numbered() + grids]

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.path).as_posix()

    def _record(self, *entries: str) -> None:
        """Append to the manifest, durably, before the files are written."""
        if not entries:
            return
        new = not self.manifest.exists()
        with _write_errors(self.manifest, "run's list of files"), open(self.manifest, "a") as f:
            if new:
                f.write(_MANIFEST_HEADER + "\n")
            f.write("".join(f"{e}\n" for e in entries))
            f.flush()
            os.fsync(f.fileno())
        self.owned.extend(entries)

    def owns(self, path: Path) -> bool:
        """Whether the manifest lists `path` (a file, a folder, or a glob matching it)."""
        rel = self._rel(path)
        return any(rel == e.rstrip("/") or fnmatch.fnmatchcase(rel, e) for e in self.owned)

    def claim(self, path: Path, *more: Path) -> Path:
        """`path` (and `more`, inside the run) as scoretk's to write: recorded in the manifest
        unless there already. Refused, with nothing recorded, when one exists that scoretk did
        not write."""
        new = [p for p in (path, *more) if not self.owns(p)]
        for p in new:
            if p.exists() or p.is_symlink():
                raise RunDirError(f"{p}: scoretk did not write this file and will not replace "
                                  f"it (it is not listed in {self.manifest}); move it away, "
                                  "or train into another --run-dir")
        self._record(*[self._rel(p) for p in new])
        return path

    def forget_missing(self) -> None:
        """Drop the entries of files that were claimed but never written (a failed write),
        so that a file a user later puts under that name stays the user's."""
        kept = [e for e in self.owned if any(c in e for c in "*?[") or (self.path / e).exists()]
        if kept != self.owned and self.manifest.exists():
            self.write_text(self.manifest, "".join(f"{e}\n" for e in [_MANIFEST_HEADER, *kept]),
                            "run's list of files", claim=False)
            self._owned = kept

    def claim_folder(self, name: str, files: str) -> Path:
        """A folder whose file names a library picks (tensorboard's event files): scoretk's
        are the files matching the glob `files`, and the folder if scoretk makes it."""
        folder = self.path / name
        entries = [f"{name}/{files}"] + ([] if folder.exists() else [f"{name}/"])
        self._record(*[e for e in entries if e not in self.owned])
        return folder

    def append_line(self, path: Path, line: str, what: str) -> None:
        with _write_errors(path, what), open(self.claim(path), "a") as f:
            f.write(line + "\n")

    def write_text(self, path: Path, text: str, what: str, *, claim: bool = True) -> None:
        """Replace `path` atomically (claiming it first); a failure is one line naming it."""
        if claim:
            self.claim(path)
        with _write_errors(path, what):
            atomic_write_text(path, text)

    def create(self) -> "RunDir":
        """The run directory and its checkpoints/ and samples/ folders."""
        self.path.mkdir(parents=True, exist_ok=True)
        for folder in (self.checkpoints, self.samples):
            if not folder.is_dir():
                self._record(self._rel(folder) + "/")
                folder.mkdir()
        return self

    def clear(self) -> None:
        """Remove every file the manifest lists, then its folders where they are empty; a
        user's files stay. The manifest starts again empty."""
        folders = [self.path / e for e in self.owned if e.endswith("/")]
        for entry in (e for e in self.owned if not e.endswith("/")):
            for path in self.path.glob(entry):
                if path.is_file() or path.is_symlink():
                    path.unlink()
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self.manifest.unlink(missing_ok=True)
        self._owned = None

    def remove_stale_temps(self) -> None:
        """Temporary files a crash left beside the files scoretk writes here; with the run's
        lock held, none can be a live writer's."""
        for entry in self.owned:
            remove_stale_temps(self.path / entry, older_than=0)

    # --- checkpoints ------------------------------------------------------------------------

    def numbered(self) -> list[Path]:
        """The ckpt-<step>.pt files, lowest step first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted((p for p in self.checkpoints.glob("ckpt-*.pt")
                       if CHECKPOINT_NAME.fullmatch(p.name)), key=checkpoint_step)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. `latest` is followed only to a
        ckpt-<step>.pt in checkpoints/; without a usable pointer (e.g. a crash between the
        checkpoint rename and the pointer rename) the highest step wins."""
        try:
            with open(self.latest_pointer, "rb") as f:
                name = f.read(256).decode(errors="replace").strip()
        except OSError:
            name = ""
        if CHECKPOINT_NAME.fullmatch(name) and (self.checkpoints / name).is_file():
            return self.checkpoints / name
        found = self.numbered()
        return found[-1] if found else None

    def newest_first(self) -> list[Path]:
        """`latest`, then the other numbered checkpoints from the highest step down: the
        order in which a resume tries them."""
        latest = self.latest()
        return [] if latest is None else \
            [latest] + [p for p in reversed(self.numbered()) if p != latest]

    def save(self, state: dict[str, Any], step: int, keep: int) -> Path:
        """Checkpoint, then `latest`, then pruning. Ctrl-C/SIGTERM wait until all three are
        done: a stop never cuts a checkpoint write."""
        path = self.checkpoints / f"ckpt-{step:08d}.pt"
        with deferred_signals():
            save_checkpoint(state, self.claim(path))
            self.write_text(self.latest_pointer, path.name + "\n", "latest pointer")
            self.prune(keep)
        return path

    def kept(self, name: str) -> Path:
        """checkpoints/<name>.pt: a checkpoint kept by name (e.g. `best`), never pruned."""
        if CHECKPOINT_NAME.fullmatch(f"{name}.pt") or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"{name!r} cannot name a kept checkpoint")
        return self.checkpoints / f"{name}.pt"

    def save_named(self, state: dict[str, Any], name: str) -> Path:
        """Write the kept checkpoint `name` (see `kept`), which pruning leaves alone."""
        path = self.kept(name)
        with deferred_signals():
            save_checkpoint(state, self.claim(path))
        return path

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` numbered checkpoints scoretk wrote."""
        for old in [p for p in self.numbered() if self.owns(p)][:-keep]:
            old.unlink(missing_ok=True)

    # --- metrics ----------------------------------------------------------------------------

    def cut_metrics(self, step: int) -> None:
        """Keep the metrics records up to `step`: a resume at `step` writes the later ones
        again (a torn last line from a crash goes too)."""
        if not self.metrics.is_file():
            return
        lines = self.metrics.read_text().splitlines(keepends=True)
        kept = [line for line in lines
                if line.endswith("\n") and -1 < _record_step(line) <= step]
        if kept != lines:
            self.write_text(self.metrics, "".join(kept), "metrics")


def _record_step(line: str) -> int:
    """The step of a metrics.jsonl line, or -1 when it is not a record."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return -1
    return step if isinstance(step, int) else -1


BEST = "best"
"""The kept checkpoint `train.eval_every` writes and `scoretk sample --best` reads."""


def checkpoint_step(path: str | Path) -> int:
    """The step in a checkpoint's name (ckpt-<step>.pt), or -1 for another name."""
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else -1


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
