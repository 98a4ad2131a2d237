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
import glob
import io
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Callable, Iterator

TEMP_SUFFIX = ".tmp"
"""Temporary files are `.<target name>.<random>.tmp` beside their target."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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

    Training checks `pending()` after each step and stops cleanly; `deferred_signals` delivers
    them again once a write is complete. With `hold=n`, a signal arriving when n are already
    held raises `Stopped` (with the first signal's number) at once: `hold=0` makes the
    signals stop a command wherever it is, `hold=1` lets a second Ctrl-C stop at once what the
    first asked to stop cleanly. Only the main thread can own signal handlers; elsewhere the
    block runs with the signals untouched.

    A raised Stopped can be lost: Python swallows exceptions raised inside finalisers and
    weakref callbacks, where a signal's handler may happen to run. So every signal is also
    recorded, and `pending()` sees those of the enclosing blocks too (see `raise_if_stopped`).
    """

    def __init__(self, signums: tuple[int, ...] = STOP_SIGNALS, *, hold: int | None = None):
        self.signums, self.hold = signums, hold
        self.received: list[int] = []
        self.outer: HeldSignals | None = None
        self._old: dict[int, object] = {}

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.hold is not None and len(self.received) > self.hold:
            raise Stopped(self.received[0])

    def pending(self) -> int | None:
        """The first signal this block or an enclosing one received, or None."""
        holder: HeldSignals | None = self
        while holder is not None:
            if holder.received:
                return holder.received[0]
            holder = holder.outer
        return None

    def __enter__(self) -> "HeldSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._record) for s in self.signums}
            self.outer = _holder(self._old.get(signal.SIGINT))
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._old = {}


def _holder(handler: object) -> HeldSignals | None:
    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, HeldSignals) else None


def raise_if_stopped() -> None:
    """Raise Stopped if a stop signal arrived under the signal handling in force and was
    lost on the way (see HeldSignals): loops call this between units of work."""
    holder = _holder(signal.getsignal(signal.SIGINT))
    signum = holder.pending() if holder is not None else None
    if signum is not None:
        raise Stopped(signum)


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
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise  # e.g. a file system without locks
            who = f"another process ({holder})" if holder else "another process"
            raise LockedError(f"{self.what}: in use by {who}; wait for it to finish or stop "
                              "it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
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
