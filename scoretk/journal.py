"""A file that one run appends to while others read it, where no write can damage what the
previous writes left: a rollback journal under POSIX record locks, for h5py's `fileobj` driver.

HDF5 updates its metadata and compressed chunks in place, so a process killed inside a write,
or a disk that fills up, can leave a file whose earlier rows cannot be read any more. Here
HDF5 reads and writes an `Overlay` instead: the file's bytes on disk with the changed pages and
the new tail held in memory. `JournaledFile.writing` then commits them the way SQLite's
rollback journal does: the original content of every page about to be overwritten goes to a
journal beside the file (`.<name>.scoretk-journal`) and is made durable; then the new bytes go
to the file and are made durable; then the journal is retired (deleted, or made invalid in
place by a run that will commit again). Whoever next finds a valid journal puts those pages
back and cuts the file to its old length (or, without write access, reads through them): the
file is exactly as the last complete commit left it, whatever moment the writer stopped at.

Locks, both fcntl (POSIX) record locks on single bytes of the file, which name their holder:
`RUN_BYTE` is held by the process that owns a run on the file (`claim`), for the whole run;
`COMMIT_BYTE` is exclusive during a commit or a recovery and shared while reading. POSIX locks
belong to a process and an inode, and closing *any* descriptor of that inode drops them all,
so a process keeps one descriptor per file (`_handles`) and never opens these files otherwise.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from scoretk.files import sync_directory

PAGE = 4096
"""Unit of the journal: a page that will change is saved whole (cut at the file's end)."""
MAGIC = b"scoretk-journal-1\n"
JOURNAL_SUFFIX = ".scoretk-journal"
RUN_BYTE, COMMIT_BYTE = 0, 1
_HEADER = struct.Struct("<QQI")   # inode of the file, its length before the commit, pages
_ENTRY = struct.Struct("<QI")     # offset, length (then the bytes)
_CRC = struct.Struct("<I")


class FileBusy(Exception):
    """Another process holds the file's run lock (`pid` when the system says which)."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path}: in use by process {pid}" if pid else f"{path}: in use")
        self.path, self.pid = path, pid


class NotRegularFile(Exception):
    """The path names a device, pipe, socket or directory: never read as, or replaced by, a
    sample file."""


class Disk:
    """Every change this module makes to a file goes through here, so that a test can stop the
    process, or fail with ENOSPC, at any one of these steps."""

    def write(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view, offset = view[n:], offset + n

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def sync(self, fd: int) -> None:
        os.fsync(fd)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)


DISK = Disk()
"""The one `Disk` in use (looked up at each call: tests put a faulty one here)."""


def journal_path(path: Path) -> Path:
    return path.parent / f".{path.name}{JOURNAL_SUFFIX}"


# ---------------------------------------------------------------------------- the overlay

class Overlay:
    """A file as h5py's `fileobj` driver sees it: the first `base` bytes of descriptor `fd`,
    with changed pages (`pages`, page index -> bytes) and everything from `base` on (`tail`)
    held in memory. Nothing here writes to disk."""

    def __init__(self, fd: int, base: int, pages: dict[int, bytes] | None = None,
                 writable: bool = False):
        self.fd, self.base, self.writable = fd, base, writable
        self.pages: dict[int, bytearray] = {k: bytearray(v) for k, v in (pages or {}).items()}
        self.tail = bytearray()
        self.size, self.pos = base, 0

    @property
    def changed(self) -> bool:
        return bool(self.pages) or self.size != self.base

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence] \
            + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def read(self, size: int = -1) -> bytes:
        end = self.size if size < 0 else min(self.size, self.pos + size)
        data = self.bytes(self.pos, end) if end > self.pos else b""
        self.pos += len(data)
        return data

    def bytes(self, start: int, end: int) -> bytes:
        parts = []
        while start < end:
            if start >= self.base:
                parts.append(bytes(self.tail[start - self.base:end - self.base]))
                break
            page = start // PAGE
            if page in self.pages:
                stop = min(end, (page + 1) * PAGE, self.base)
                parts.append(bytes(self.pages[page][start - page * PAGE:stop - page * PAGE]))
            else:  # a clean stretch: read it up to the next changed page in one call
                later = [p for p in self.pages if p > page]
                stop = min(end, self.base, min(later) * PAGE if later else end)
                parts.append(_pread(self.fd, stop - start, start))
            start = stop
        return b"".join(parts)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if not self.writable:
            raise OSError(errno.EBADF, "opened for reading")
        view, at = memoryview(data).cast("B"), self.pos
        while view:
            if at >= self.base:
                self._write_tail(at - self.base, view)
                at += len(view)
                break
            page = at // PAGE
            buf = self._page(page)
            k = min(len(view), len(buf) - (at - page * PAGE))
            buf[at - page * PAGE:at - page * PAGE + k] = view[:k]
            view, at = view[k:], at + k
        written, self.pos = at - self.pos, at
        self.size = max(self.size, at)
        return written

    def _write_tail(self, offset: int, view: memoryview) -> None:
        if len(self.tail) < offset:
            self.tail.extend(bytes(offset - len(self.tail)))
        self.tail[offset:offset + len(view)] = view

    def _page(self, page: int) -> bytearray:
        """The page's bytes as a changeable copy (read from disk the first time)."""
        if page not in self.pages:
            length = min(PAGE, self.base - page * PAGE)
            self.pages[page] = bytearray(_pread(self.fd, length, page * PAGE).ljust(length,
                                                                                    b"\0"))
        return self.pages[page]

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if size >= self.base:
            del self.tail[size - self.base:]
            self.tail.extend(bytes(size - self.base - len(self.tail)))
        else:  # pages past the new end read as zeros if the file grows again
            self.tail.clear()
            for page in range(size // PAGE, (self.base + PAGE - 1) // PAGE):
                buf, cut = self._page(page), max(0, size - page * PAGE)
                buf[cut:] = bytes(len(buf) - cut)
        self.size = size
        return size

    def runs(self) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) to write to disk, contiguous changed pages joined, the tail last."""
        start, end, chunk = 0, 0, []
        for page in sorted(p for p in self.pages if p * PAGE < self.size):
            if chunk and page * PAGE != end:
                yield start, b"".join(chunk)
                chunk = []
            if not chunk:
                start = page * PAGE
            chunk.append(bytes(self.pages[page][:self.size - page * PAGE]))
            end = page * PAGE + len(chunk[-1])
        if chunk:
            yield start, b"".join(chunk)
        if self.size > self.base:
            yield self.base, bytes(self.tail)


def _pread(fd: int, size: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < size:
        data = os.pread(fd, size - got, offset + got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


# ---------------------------------------------------------------------------- the journal

def _encode(inode: int, size: int, before: list[tuple[int, bytes]]) -> bytes:
    """The journal: header, (offset, length, original bytes) per page, CRC32 of all that."""
    body = [MAGIC, _HEADER.pack(inode, size, len(before))]
    for offset, data in before:
        body += [_ENTRY.pack(offset, len(data)), data]
    blob = b"".join(body)
    return blob + _CRC.pack(zlib.crc32(blob))


def _decode(blob: bytes, inode: int) -> tuple[int, dict[int, bytes]] | None:
    """(the file's length before the commit, original pages by index), or None for a journal
    that was cut short (the crash came before the file was touched), retired, or belongs to
    another file that had this name. Bytes after the checksum are left over from a longer
    journal and ignored."""
    at = len(MAGIC) + _HEADER.size
    if not blob.startswith(MAGIC) or len(blob) < at:
        return None
    owner, size, count = _HEADER.unpack_from(blob, len(MAGIC))
    pages = {}
    for _ in range(count):
        if at + _ENTRY.size > len(blob):
            return None
        offset, length = _ENTRY.unpack_from(blob, at)
        at += _ENTRY.size
        pages[offset // PAGE] = blob[at:at + length]
        at += length
    if at + _CRC.size > len(blob) or _CRC.unpack_from(blob, at)[0] != zlib.crc32(blob[:at]):
        return None
    return (size, pages) if owner == inode else None


def _read_journal(path: Path) -> bytes | None:
    try:
        with open(journal_path(path), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write_journal(path: Path, blob: bytes) -> None:
    """Write the journal and make it durable before the file is touched (and its name, when
    this creates it: a run's writer keeps one journal file from commit to commit)."""
    jpath, flags = journal_path(path), os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd, created = os.open(jpath, flags | os.O_CREAT | os.O_EXCL, 0o666), True
    except FileExistsError:
        fd, created = os.open(jpath, flags), False
    try:
        DISK.write(fd, blob, 0)
        DISK.sync(fd)
    except BaseException:
        with contextlib.suppress(OSError):  # the file is untouched: a journal is not needed
            DISK.remove(jpath)
        raise
    finally:
        os.close(fd)
    if created:
        sync_directory(path.parent)


def _retire_journal(path: Path, keep: bool) -> None:
    """After a commit or a rollback: delete the journal, or with `keep` make it invalid in
    place (cheaper: no directory change). Neither needs to be durable: a journal that comes
    back after a power cut undoes the last commit, which leaves a consistent file too."""
    jpath = journal_path(path)
    if not keep:
        DISK.remove(jpath)
        return
    fd = os.open(jpath, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        DISK.write(fd, bytes(len(MAGIC)), 0)
    finally:
        os.close(fd)


def _roll_back(fd: int, size: int, pages: dict[int, bytes]) -> None:
    for page, data in sorted(pages.items()):
        DISK.write(fd, data, page * PAGE)
    DISK.truncate(fd, size)
    DISK.sync(fd)


# ---------------------------------------------------------------------------- locks

_FLOCK = {"linux": "hhqqi", "darwin": "qqihh"}.get(sys.platform)
"""struct flock's layout (l_type, l_whence, l_start, l_len, l_pid in the platform's order)."""


def _holder(fd: int, byte: int) -> int | None:
    """PID of the process whose lock stops ours on `byte`, where the system says."""
    if _FLOCK is None:
        return None
    fields = (fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    if _FLOCK == "qqihh":
        fields = (byte, 1, 0, fcntl.F_WRLCK, os.SEEK_SET)
    try:
        out = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(_FLOCK,
                                                                              *fields)))
    except OSError:
        return None
    pid = out[4] if _FLOCK == "hhqqi" else out[2]
    return pid if pid > 0 else None


def _lock(fd: int, byte: int, kind: int, wait: bool = True) -> bool:
    """Take (or with LOCK_UN drop) a lock on one byte; False when `wait` is off and another
    process holds a conflicting one. File systems without locks (ENOLCK) lock nothing."""
    try:
        fcntl.lockf(fd, kind | (0 if wait else fcntl.LOCK_NB), 1, byte, os.SEEK_SET)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    return True


# ---------------------------------------------------------------------------- one descriptor

@dataclass
class _Handle:
    """This process's one descriptor for a file, and what it holds on it."""

    fd: int
    key: tuple[int, int]  # (device, inode)
    writable: bool
    users: int = 0
    claimed: bool = False
    committing: bool = False  # this process holds COMMIT_BYTE
    spare: list[int] = field(default_factory=list)


_handles: dict[tuple[int, int], _Handle] = {}
os.register_at_fork(after_in_child=_handles.clear)  # a child inherits descriptors, not locks


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _regular(path: Path, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise NotRegularFile(f"{path}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{path}: not a regular file (a device, pipe or socket is never "
                             "read or replaced)")


def _acquire(path: Path) -> _Handle:
    st = os.stat(path)
    _regular(path, st)
    handle = _handles.get(_key(st))
    if handle is None:
        flags = os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd, writable = os.open(path, os.O_RDWR | flags), True
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise
            fd, writable = os.open(path, os.O_RDONLY | flags), False
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between stat and open
            os.close(fd)
            _regular(path, st)
        handle = _handles.get(_key(st))
        if handle is not None:  # the name moved to a file we hold between stat and open:
            handle.spare.append(fd)  # closing this one would drop our locks on it
        else:
            handle = _handles[_key(st)] = _Handle(fd, _key(st), writable)
    handle.users += 1
    return handle


def _release(handle: _Handle) -> None:
    handle.users -= 1
    if handle.users <= 0 and not handle.claimed:
        _handles.pop(handle.key, None)
        for fd in (handle.fd, *handle.spare):
            os.close(fd)


# ---------------------------------------------------------------------------- the file

class JournaledFile:
    """A file opened through this module (see the module docstring); close it, or use `with`."""

    def __init__(self, path: str | Path):
        """Raises FileNotFoundError, NotRegularFile or OSError."""
        self.path = Path(path)
        self._handle: _Handle | None = _acquire(self.path)
        self._claimed = False

    @property
    def key(self) -> tuple[int, int]:
        """(device, inode): which file this is, whatever its name is now."""
        return self._live.key

    @property
    def writable(self) -> bool:
        return self._live.writable

    @property
    def _live(self) -> _Handle:
        if self._handle is None:
            raise ValueError(f"{self.path}: closed")
        return self._handle

    @property
    def _fd(self) -> int:
        return self._live.fd

    def __enter__(self) -> "JournaledFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give up the run lock if this one took it (and the journal the run kept), and the
        descriptor with the process's last user of it."""
        if self._handle is None:
            return
        if self._claimed:
            with contextlib.suppress(OSError), self._commit_lock(fcntl.LOCK_EX):
                self._handle.claimed = False
                self.recover()  # and the journal kept for the run goes
            self._claimed = False
            _lock(self._fd, RUN_BYTE, fcntl.LOCK_UN)
        handle, self._handle = self._handle, None
        _release(handle)

    def claim(self) -> None:
        """Hold the run lock until `close`; FileBusy if another process holds it, or if the
        path was given to another file after this one was opened."""
        if not self.writable:
            raise PermissionError(errno.EACCES, "no write access", str(self.path))
        if not self._live.claimed:
            if not _lock(self._fd, RUN_BYTE, fcntl.LOCK_EX, wait=False):
                raise FileBusy(self.path, _holder(self._fd, RUN_BYTE))
            if not self._named():
                _lock(self._fd, RUN_BYTE, fcntl.LOCK_UN)
                raise FileBusy(self.path, None)
            self._live.claimed = self._claimed = True

    @contextlib.contextmanager
    def _commit_lock(self, kind: int) -> Iterator[bool]:
        """Hold COMMIT_BYTE for the block; yields False when this process held it already
        (POSIX locks do not nest: the outer block keeps it)."""
        handle = self._live
        if handle.committing:
            yield False
            return
        _lock(handle.fd, COMMIT_BYTE, kind)
        handle.committing = True
        try:
            yield True
        finally:
            handle.committing = False
            _lock(handle.fd, COMMIT_BYTE, fcntl.LOCK_UN)

    def _named(self) -> bool:
        """Whether the path still names this file."""
        try:
            return _key(os.stat(self.path)) == self.key
        except FileNotFoundError:
            return False

    def _journal(self) -> tuple[int, dict[int, bytes]] | None:
        """None without a journal; (length, pages) to roll back to; (-1, {}) for a journal
        that holds nothing to roll back (cut short, retired, another file's)."""
        blob = _read_journal(self.path)
        return None if blob is None else (_decode(blob, self._live.key[1]) or (-1, {}))

    def recover(self) -> None:
        """Put back what an unfinished commit changed, and delete a journal that is no longer
        needed (the caller holds COMMIT_BYTE exclusively). The run's writer keeps its own."""
        if not self._named():
            return  # the name is another file's now, and so is any journal beside it
        found = self._journal()
        if found is None:
            return
        size, pages = found
        if size >= 0:
            _roll_back(self._fd, size, pages)
            _retire_journal(self.path, keep=self._live.claimed)
        elif not self._live.claimed:
            DISK.remove(journal_path(self.path))

    @contextlib.contextmanager
    def reading(self) -> Iterator[Overlay]:
        """The file as the last complete commit left it, for h5py to read; a commit by another
        process waits until the block ends."""
        with self._commit_lock(fcntl.LOCK_SH) as outer:
            found = self._journal()
            if found is not None and outer and self.writable and self._try_recover():
                found = None
            if found is None or found[0] < 0:  # no journal, or one that changes nothing
                found = (os.fstat(self._fd).st_size, {})
            yield Overlay(self._fd, *found)

    def _try_recover(self) -> bool:
        """Recover now if no other process is reading (upgrading our shared lock)."""
        if not _lock(self._fd, COMMIT_BYTE, fcntl.LOCK_EX, wait=False):
            return False
        try:
            self.recover()
        finally:
            _lock(self._fd, COMMIT_BYTE, fcntl.LOCK_SH)
        return True

    @contextlib.contextmanager
    def writing(self) -> Iterator[Overlay]:
        """An overlay for h5py to change; when the block ends normally its changes are
        committed (see the module docstring), on an exception they are dropped."""
        if not self.writable:
            raise PermissionError(errno.EACCES, "no write access", str(self.path))
        with self._commit_lock(fcntl.LOCK_EX):
            self.recover()
            overlay = Overlay(self._fd, os.fstat(self._fd).st_size, writable=True)
            yield overlay
            if overlay.changed:
                self._commit(overlay)

    def _commit(self, overlay: Overlay) -> None:
        fd, base = self._fd, overlay.base
        before = {page: _pread(fd, len(buf), page * PAGE)
                  for page, buf in overlay.pages.items()}
        _write_journal(self.path, _encode(self._live.key[1], base, sorted(
            (page * PAGE, data) for page, data in before.items())))
        try:
            for offset, data in overlay.runs():
                DISK.write(fd, data, offset)
            if overlay.size < base:
                DISK.truncate(fd, overlay.size)
            DISK.sync(fd)
        except BaseException:
            with contextlib.suppress(OSError):  # if this fails too, the journal stays and
                _roll_back(fd, base, before)    # whoever opens the file next rolls back
                _retire_journal(self.path, keep=self._live.claimed)
            raise
        _retire_journal(self.path, keep=self._live.claimed)
