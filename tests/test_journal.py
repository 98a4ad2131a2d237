"""scoretk.journal: the in-memory overlay, commits and their rollback, and the file locks."""
from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal

import pytest

from scoretk import journal
from scoretk.journal import (COMMIT_BYTE, PAGE, FileBusy, JournaledFile, NotRegularFile,
                             journal_path)


def test_overlay_reads_what_was_written_and_commits_it_exactly(tmp_path):
    """Random writes (across page boundaries, past the end, with gaps), truncations and
    reads against a bytearray doing the same; the committed file equals the model."""
    rng = random.Random(0)
    path = tmp_path / "f"
    for trial in range(20):
        model = bytearray(rng.randbytes(rng.randrange(0, 5 * PAGE)))
        path.write_bytes(model)
        with JournaledFile(path) as jf, jf.writing() as o:
            for _ in range(30):
                at = rng.randrange(0, len(model) + PAGE)
                if rng.random() < 0.1:
                    o.truncate(at)
                    model = model[:at] + bytes(max(0, at - len(model)))
                elif rng.random() < 0.6:
                    data = rng.randbytes(rng.randrange(1, 2 * PAGE))
                    o.seek(at)
                    o.write(data)
                    model[len(model):at] = bytes(max(0, at - len(model)))
                    model[at:at + len(data)] = data
                o.seek(at)
                size = rng.randrange(0, 3 * PAGE)
                assert o.read(size) == bytes(model[at:at + size]), trial
                assert o.seek(0, os.SEEK_END) == len(model)
        assert path.read_bytes() == model, trial
        assert not journal_path(path).exists()


def _commit_pages(path, pages: dict[int, bytes], grow: bytes = b""):
    with JournaledFile(path) as jf, jf.writing() as o:
        for offset, data in pages.items():
            o.seek(offset)
            o.write(data)
        o.seek(0, os.SEEK_END)
        o.write(grow)


class Stop(Exception):
    pass


class StopAt(journal.Disk):
    """Raises Stop at its n-th change to a file and every one after (a process that died
    there: nothing more is written, not even a rollback)."""

    def __init__(self, n: int):
        self.n = n

    def _step(self) -> None:
        self.n -= 1
        if self.n <= 0:
            raise Stop

    def write(self, fd, data, offset):
        self._step()
        super().write(fd, data, offset)

    def truncate(self, fd, size):
        self._step()
        super().truncate(fd, size)

    def sync(self, fd):
        self._step()

    def remove(self, path):
        self._step()
        super().remove(path)


def test_a_commit_stopped_anywhere_leaves_the_old_or_the_new_file(tmp_path, monkeypatch):
    old = bytes(range(256)) * 40
    change = {0: b"A" * 100, PAGE - 10: b"B" * 5000}  # across pages, and past the end
    new = bytearray(old)
    for offset, data in change.items():
        new[offset:offset + len(data)] = data
    new += b"C" * 3000
    outcomes, n = set(), 0
    while True:
        n += 1
        path = tmp_path / f"f{n}"
        path.write_bytes(old)
        monkeypatch.setattr(journal, "DISK", StopAt(n))
        with contextlib.suppress(Stop):
            _commit_pages(path, change, b"C" * 3000)
        # without rolling back, another process only sees the journal: it reads the old file
        monkeypatch.setattr(journal, "DISK", journal.Disk())
        with JournaledFile(path) as jf, jf.reading() as o:
            seen = o.read()
        assert seen in (old, new), n
        assert path.read_bytes() == seen and not journal_path(path).exists()
        outcomes.add(seen == new)
        if seen == new:  # the commit got through: every step before it was tried
            break
    assert outcomes == {False, True} and n == 7  # journal: write, sync; file: changed pages,
    # new tail, sync; journal removed


def test_a_torn_or_foreign_journal_changes_nothing(tmp_path):
    path, other = tmp_path / "f", tmp_path / "g"
    path.write_bytes(b"x" * 3 * PAGE)
    other.write_bytes(b"y" * PAGE)
    blob = journal._encode(os.stat(path).st_ino, PAGE, [(0, b"z" * PAGE)])
    for bad in (blob[:-1], blob[:40], journal._encode(os.stat(other).st_ino, 1, [])):
        journal_path(path).write_bytes(bad)
        with JournaledFile(path) as jf, jf.reading() as o:
            assert o.read() == b"x" * 3 * PAGE
        assert not journal_path(path).exists()
    journal_path(path).write_bytes(blob + b"leftover of a longer journal")
    with JournaledFile(path) as jf, jf.reading() as o:  # a whole journal: rolled back
        assert o.read() == b"z" * PAGE
    assert path.read_bytes() == b"z" * PAGE


def _in_child(fn) -> tuple[int, int]:
    """Fork a child that runs fn(), says so on a pipe and waits to be killed; (pid, fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            fn()
            os.write(w, b"1")
            signal.pause()
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    return pid, r


def _end(pid: int, fd: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(fd)


def test_a_reader_that_cannot_recover_reads_through_the_journal(tmp_path):
    """While another process reads (shared lock), a hot journal cannot be rolled back: the
    file is read as the journal says it was."""
    path = tmp_path / "f"
    path.write_bytes(b"new!" * PAGE)
    journal_path(path).write_bytes(journal._encode(os.stat(path).st_ino, 2 * PAGE,
                                                   [(0, b"old!" * (PAGE // 4))]))
    holder = JournaledFile(path)
    pid, fd = _in_child(lambda: journal._lock(holder._fd, COMMIT_BYTE, fcntl.LOCK_SH))
    try:
        with JournaledFile(path) as jf, jf.reading() as o:
            assert o.read() == b"old!" * (PAGE // 4) + b"new!" * (PAGE // 4)
        assert path.read_bytes() == b"new!" * PAGE and journal_path(path).exists()
    finally:
        _end(pid, fd)
        holder.close()
    with JournaledFile(path) as jf, jf.reading() as o:  # nobody else now: rolled back
        o.read()
    assert path.read_bytes() == b"old!" * (PAGE // 4) + b"new!" * (PAGE // 4)


def test_the_run_lock_names_its_holder_and_ends_with_it(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"data")
    pid, fd = _in_child(lambda: JournaledFile(path).claim())
    try:
        with JournaledFile(path) as jf, pytest.raises(FileBusy) as caught:
            jf.claim()
        assert caught.value.pid == pid
    finally:
        _end(pid, fd)
    with JournaledFile(path) as jf:
        jf.claim()
        with JournaledFile(path) as again, again.reading() as o:  # same process: no conflict
            assert o.read() == b"data"
        assert not _claims_in_child(path)  # still held after the second one closed
    assert _claims_in_child(path)  # released by close


def _claims_in_child(path) -> bool:
    pid = os.fork()
    if pid == 0:
        try:
            JournaledFile(path).claim()
            os._exit(0)
        except FileBusy:
            os._exit(1)
        finally:
            os._exit(2)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_non_regular_files_are_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFile, match="not a regular file"):
        JournaledFile(fifo)
    with pytest.raises(NotRegularFile, match="directory"):
        JournaledFile(tmp_path)
