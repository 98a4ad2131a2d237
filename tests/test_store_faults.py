"""The sample store under faults: a process that ends, a write cut in half, a full disk, at
every change it makes to disk over its first two appends, and SIGKILL at random moments.

Each case runs in a forked child (cheap: torch is already imported) that writes through a
`journal.Disk` stopping it at its n-th change; the parent then opens the file, compares the
rows it says are written with an uninterrupted run's, and resumes it to the end.
"""
from __future__ import annotations

import errno
import os
import random
import signal
import time

import h5py
import numpy as np
import pytest
import torch

from scoretk import journal
from scoretk.journal import journal_path
from scoretk.store import SAMPLES, SAMPLES_FLOAT, SampleStore, StoreError

ITEM, BATCH, BATCHES = (1, 4, 4), 4, 3
ATTRS = {"recipe": {"name": "faults"}, "seed": 1, "num_samples": BATCH * BATCHES,
         "checkpoint_sha256": "ab" * 32}
EXIT_DIED, EXIT_FULL = 9, 3


def batch(i: int) -> torch.Tensor:
    return torch.rand((BATCH, *ITEM), generator=torch.Generator().manual_seed(i))


class QuickDisk(journal.Disk):
    """Counts the changes; skips fsync (a dead process loses nothing the kernel holds)."""

    def __init__(self) -> None:
        self.count = 0

    def step(self, fd: int | None, data: bytes | None, offset: int) -> None:
        self.count += 1

    def write(self, fd, data, offset):
        self.step(fd, data, offset)
        super().write(fd, data, offset)

    def truncate(self, fd, size):
        self.step(fd, None, size)
        super().truncate(fd, size)

    def sync(self, fd):
        self.step(fd, None, 0)

    def remove(self, path):
        self.step(None, None, 0)
        super().remove(path)


class FaultAt(QuickDisk):
    """At the n-th change: `exit` ends the process; `torn` writes half, then ends it; `full`
    writes half and raises ENOSPC, and from then on every write that would grow a file."""

    def __init__(self, n: int, mode: str):
        super().__init__()
        self.n, self.mode, self.full = n, mode, False

    def step(self, fd, data, offset):
        super().step(fd, data, offset)
        grows = data is not None and offset + len(data) > os.fstat(fd).st_size
        if self.count != self.n and not (self.full and grows):
            return
        if data is not None and self.count == self.n:
            os.pwrite(fd, data[:len(data) // 2], offset)
        if self.mode != "full":
            os._exit(EXIT_DIED)
        self.full = True
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def first_two_appends(path) -> None:
    store = SampleStore.create(path, ITEM, ATTRS, keep_float=True)
    for i in range(2):
        store.append(batch(i), start=i * BATCH)
    store.close()


def in_child(fn, disk: journal.Disk) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            journal.DISK = disk
            fn()
            code = 0
        except StoreError as exc:
            code = EXIT_FULL if "disk full" in str(exc) else 2
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def reference(tmp_path_factory, monkeypatch) -> dict[str, np.ndarray]:
    monkeypatch.setattr(journal, "DISK", QuickDisk())
    path = tmp_path_factory.mktemp("ref") / "ref.h5"
    store = SampleStore.create(path, ITEM, ATTRS, keep_float=True)
    for i in range(BATCHES):
        store.append(batch(i))
    store.close()
    with h5py.File(path) as f:
        return {SAMPLES: f[SAMPLES][:], SAMPLES_FLOAT: f[SAMPLES_FLOAT][:]}


def check_and_resume(path, reference) -> int:
    """The file opens, its written rows are the reference's, plain h5py reads it too, and
    resuming completes it bit for bit; returns the rows found."""
    if not path.exists():  # stopped before the empty file appeared: nothing to lose
        SampleStore.create(path, ITEM, ATTRS, keep_float=True).close()
    store = SampleStore(path)
    n = store.num_written
    assert n % BATCH == 0 and store.rows == n
    for name in (SAMPLES, SAMPLES_FLOAT):
        np.testing.assert_array_equal(store.read(n, name), reference[name][:n])
    with h5py.File(path) as f:  # the file on disk is whole again, for any HDF5 reader
        np.testing.assert_array_equal(f[SAMPLES][:n], reference[SAMPLES][:n])
    for tmp in path.parent.glob("*.tmp"):  # left by a creator that died: make it old
        os.utime(tmp, (time.time() - 3600,) * 2)
    store.trim()  # which removes it
    for i in range(n // BATCH, BATCHES):
        store.append(batch(i), start=i * BATCH)
    store.close()
    with h5py.File(path) as f:
        for name in (SAMPLES, SAMPLES_FLOAT):
            np.testing.assert_array_equal(f[name][:], reference[name])
        assert f.attrs["num_written"] == BATCH * BATCHES and f.attrs["complete"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no journal, no temp
    return n


@pytest.mark.parametrize("mode", ["exit", "torn", "full"])
def test_every_write_position_of_the_first_two_appends(tmp_path, monkeypatch, reference, mode):
    counter = QuickDisk()
    monkeypatch.setattr(journal, "DISK", counter)
    first_two_appends(tmp_path / "count.h5")
    positions, rows_found = counter.count, set()
    monkeypatch.setattr(journal, "DISK", QuickDisk())
    for n in range(1, positions + 1):
        d = tmp_path / f"{mode}{n}"
        d.mkdir()
        status = in_child(lambda: first_two_appends(d / "s.h5"), FaultAt(n, mode))
        found = check_and_resume(d / "s.h5", reference)
        # a full disk at the last step, deleting the journal after the run, is no error
        assert status == {"full": EXIT_FULL}.get(mode, EXIT_DIED) or (
            mode == "full" and status == 0 and found == 2 * BATCH), (n, status)
        rows_found.add(found)
    print(f"{mode}: {positions} of {positions} write positions recovered, "
          f"rows found {sorted(rows_found)}")
    assert rows_found == {0, BATCH, 2 * BATCH}


def test_random_sigkills_while_appending(tmp_path, monkeypatch, reference):
    """Real fsyncs, so that kills also land inside commits; each file opens with its rows
    the reference's, and the next batch appends after them."""
    monkeypatch.setattr(journal, "DISK", journal.Disk())
    rng, inside_commit, kills = random.Random(0), 0, 20
    for k in range(kills):
        path = tmp_path / f"k{k}.h5"
        pid = os.fork()
        if pid == 0:
            try:
                store = SampleStore.create(path, ITEM, {**ATTRS, "num_samples": 10 ** 6})
                for i in range(10 ** 6):
                    store.append(batch(i % BATCHES), start=i * BATCH)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not path.exists():
            continue
        blob = journal_path(path).read_bytes() if journal_path(path).exists() else b""
        inside_commit += journal._decode(blob, path.stat().st_ino) is not None
        store = SampleStore(path)
        n = store.num_written
        expect = np.concatenate([reference[SAMPLES]] * (n // (BATCH * BATCHES) + 1))[:n]
        np.testing.assert_array_equal(store.read(n), expect)
        store.trim()
        store.append(batch(n // BATCH % BATCHES), start=n)
        store.close()
    print(f"random SIGKILLs: {kills} of {kills} recovered, {inside_commit} inside a commit")
