"""Writing files so that a crash leaves either the old file or the new one, never half of one,
and holding back Ctrl-C / SIGTERM while such a write is under way.

Checkpoints, the run's pointer and recipe, and sample files all go through `replacing`: the
new content is written to a temporary name in the same directory, flushed to disk, renamed over
the target (an atomic step on POSIX file systems), and the directory entry is flushed too.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import io
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Callable, Iterator

TEMP_SUFFIX = ".tmp"
"""Temporary files are `.<target name>.<random>.tmp` beside their target."""


@contextlib.contextmanager
def replacing(path: str | Path, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, make its content durable
    and rename it over `path`. On any exception the temporary file is removed.

    With `exclusive`, `path` must not exist: it is made by a hard link, which fails with
    FileExistsError when another process created `path` in the meantime (where the file
    system has no hard links, by a rename after a last look).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide results from other users
        os.close(fd)
        yield tmp
        _fsync(tmp, os.O_RDONLY)
        (_link_new if exclusive else os.replace)(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def remove_stale_temps(path: str | Path, older_than: float) -> int:
    """Delete the temporary files of `replacing(path)` that are older than `older_than`
    seconds: left by a process that died before its rename (a live one's is younger).
    Returns how many went."""
    path, removed = Path(path), 0
    cutoff = time.time() - older_than
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
    return removed


def _link_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network file systems)
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def sync_directory(path: str | Path) -> None:
    """Make new names, renames and deletions in directory `path` durable (where the file
    system can: elsewhere this does nothing)."""
    with contextlib.suppress(OSError):
        _fsync(Path(path), os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through `write(fileobj)` and replace `path` atomically (see `replacing`)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


class HeldSignals:
    """SIGINT and SIGTERM are recorded in `received` instead of acting, inside the block.

    Training checks `received` after each step and stops cleanly; `deferred_signals` delivers
    them again once a write is complete. With `escalate`, a second signal raises
    KeyboardInterrupt at once (the user means it). Only the main thread can own signal
    handlers; elsewhere the block runs with the signals untouched.
    """

    def __init__(self, signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), *,
                 escalate: bool = False):
        self.signums, self.escalate = signums, escalate
        self.received: list[int] = []
        self._old: dict[int, object] = {}

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        if self.escalate and self.received:
            raise KeyboardInterrupt
        self.received.append(signum)

    def __enter__(self) -> "HeldSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._record) for s in self.signums}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._old = {}


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver them (a write is never cut)."""
    held = HeldSignals()
    try:
        with held:
            yield
    finally:
        for s in dict.fromkeys(held.received):
            signal.raise_signal(s)
