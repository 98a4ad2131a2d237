"""Writing files so that a crash leaves either the old file or the new one, never half of one,
holding back Ctrl-C / SIGTERM while such a write is under way, and locking a file against a
second process.

Checkpoints, the run's pointer and recipe, and sample files all go through `replacing`: the
new content is written to a temporary name in the same directory, flushed to disk, renamed over
the target (an atomic step on POSIX file systems), and the directory entry is flushed too.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import signal
import socket
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Callable, Container, Iterator

TEMP_SUFFIX = ".tmp"
"""Temporary files are `.<target name>.<random>.tmp` beside their target."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, make its content durable
    and rename it over `path`. On any exception the temporary file is removed."""
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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not every FS can)
        _fsync(path.parent, os.O_RDONLY)


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


def temp_target(name: str) -> str | None:
    """The target name of a temporary file `replacing` makes (`.<target>.<random>.tmp`)."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    target, dot, _random = name[1:-len(TEMP_SUFFIX)].rpartition(".")
    return target if dot and target else None


def stale_temps(directory: Path, targets: Container[str]) -> list[Path]:
    """Temporary files a crash left in `directory` (between `replacing`'s create and rename)
    whose target is one of `targets`: only those of files the caller owns."""
    if not directory.is_dir():
        return []
    return [p for p in directory.glob(f".*{TEMP_SUFFIX}") if temp_target(p.name) in targets]


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM ends the command. Its exit status is 128 + the signal number (130 for
    Ctrl-C, 143 for SIGTERM), what a shell reports for a process the signal ended; a
    KeyboardInterrupt, so code that cleans up after Ctrl-C cleans up after this too."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class HeldSignals:
    """SIGINT and SIGTERM are recorded in `received` instead of acting, inside the block.

    Training checks `received` after each step and stops cleanly; `deferred_signals` delivers
    them again once a write is complete. With `hold=n`, a signal arriving when n are already
    held raises `Stopped` (with the first signal's number) at once: `hold=0` makes the
    signals stop a command wherever it is, `hold=1` lets a second Ctrl-C stop at once what the
    first asked to stop cleanly. Only the main thread can own signal handlers; elsewhere the
    block runs with the signals untouched.
    """

    def __init__(self, signums: tuple[int, ...] = STOP_SIGNALS, *, hold: int | None = None):
        self.signums, self.hold = signums, hold
        self.received: list[int] = []
        self._old: dict[int, object] = {}

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        if self.hold is not None and len(self.received) >= self.hold:
            raise Stopped(self.received[0] if self.received else signum)
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


class LockedError(Exception):
    """Another process holds a lock; the message names it and its holder (one line)."""


class FileLock:
    """An exclusive lock on `path` (fcntl's POSIX record lock; the file is created if needed).

    The kernel drops the lock when its process ends, however it ends, so a killed holder never
    leaves a stale lock behind (a restarted job takes it again). The file holds the holder's
    pid and host, for the message another process gets. POSIX locks do not stop a second
    lock in the same process, so that is refused here too.
    """

    _held: set[tuple[int, int]] = set()  # (device, inode) of the files this process locks

    def __init__(self, path: str | Path, what: str):
        self.path, self.what = Path(path), what
        self._fd: int | None = None
        self._key = (0, 0)

    def acquire(self) -> "FileLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        try:
            if key in self._held:
                raise BlockingIOError(errno.EAGAIN, "locked by this process")
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise  # e.g. a file system without locks
            raise LockedError(f"{self.what} is in use by {holder} (lock {self.path}); wait "
                              "for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd, self._key = fd, key
        self._held.add(key)
        return self

    def release(self) -> None:
        if self._fd is not None:
            self._held.discard(self._key)
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
