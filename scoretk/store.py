"""The HDF5 sample store: one file of generated samples plus everything needed to reproduce them.

Layout (contract): `samples` is uint8 (N, H, W, C) for images, float32 (N, D) for vectors,
chunked by whole samples, gzip-compressed, resizable along N; `samples_float` (N, C, H, W)
float32 is optional. Attributes carry the recipe, checkpoint path and sha256, sampler settings,
seed, versions, `num_written`, `complete`, and `network_evaluations`: the network evaluations
the written rows cost, summed over them (an adaptive solver's real count, which
`evaluations_per_sample` in the sampler settings only bounds).

Each batch is one commit through `scoretk.journal`: HDF5 writes into memory, and the bytes go
to disk behind a rollback journal, so no write (killed at any point, or failing for a full
disk) can damage the rows before it; the next process to open the file puts back a commit that
did not finish. Rows and `num_written` change together. Ctrl-C / SIGTERM are held back during
the few milliseconds of a commit.

The process that creates or resumes a file (`create`, `trim`) holds its run lock until
`close`: a second run on the same file is refused, naming the holder's PID. Other processes of
the same run (torchrun's ranks) append under that lock; readers wait for a commit to finish.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import weakref
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch
from torch import Tensor

from scoretk import __version__, journal
from scoretk.files import deferred_signals, remove_stale_temps, replacing
from scoretk.images import to_uint8
from scoretk.journal import FileBusy, JournaledFile, NotRegularFile, Overlay

FORMAT = "scoretk-samples-1"
SAMPLES, SAMPLES_FLOAT = "samples", "samples_float"
CHUNK_BYTES = 1 << 17
"""Target chunk size: a few whole samples (one for big images). A chunk never splits a
sample, so reading one image decodes one small chunk, and gzip still has enough to work on."""
VERIFY_BYTES = 1 << 25
"""`verify` decodes the rows this many (uncompressed) bytes at a time."""
IDENTITY = ("recipe", "checkpoint_sha256", "sampler_settings", "seed", "num_samples",
            "raw_weights", "item_shape", "keep_float", "control")
"""Attributes that decide the samples' values: a resume must agree on all of them."""
REQUIRED = ("num_written", "num_samples", "complete", "item_shape")
"""Attributes without which the rows cannot be interpreted or resumed."""
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
NOT_RESUMABLE = "it cannot be resumed: start over with `scoretk sample --force`"
STALE_TEMP = 600.0
"""Seconds after which a temporary file beside a store is a dead creator's (see `create`)."""

__all__ = ["SampleStore", "StoreError", "describe", "reading", "to_uint8"]


class StoreError(Exception):
    """A sample file that cannot be created, resumed or read; the message is one line."""


# ---------------------------------------------------------------------------- file access

def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _journaled(path: Path) -> JournaledFile:
    """The file opened through the journal, every failure one StoreError line."""
    try:
        return JournaledFile(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: file not found") from None
    except NotRegularFile as exc:
        raise StoreError(str(exc)) from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot open ({_first_line(exc)})") from None


@contextlib.contextmanager
def _h5(fileobj: Overlay, mode: str, path: Path) -> Iterator[h5py.File]:
    try:
        f = h5py.File(fileobj, mode)
    except (OSError, ValueError) as exc:
        text = str(exc)
        if "signature" in text.lower():
            raise StoreError(f"{path}: not an HDF5 file") from None
        raise StoreError(f"{path}: damaged or truncated HDF5 file ({_first_line(exc)})") from None
    with f:
        yield f


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[h5py.File]:
    """Any HDF5 file, read-only, as its last complete commit left it (a sample file cut off
    mid-write is read without the unfinished write)."""
    path = Path(path)
    with _journaled(path) as jf, jf.reading() as overlay, _h5(overlay, "r", path) as f:
        yield f


def _busy(path: Path, pid: int | None) -> str:
    who = f"another process (PID {pid})" if pid else "another process"
    return (f"{path}: in use by {who} writing samples to it; wait for it to finish or stop "
            "it, then try again")


def _claimed(jf: JournaledFile) -> JournaledFile:
    """`jf` holding the file's run lock, or StoreError naming the holder."""
    try:
        jf.claim()
    except FileBusy as exc:
        jf.close()
        raise StoreError(_busy(jf.path, exc.pid)) from None
    except PermissionError:
        jf.close()
        raise StoreError(f"{jf.path}: no permission to write it") from None
    return jf


def _write_failure(path: Path, exc: OSError, kept: int | None) -> StoreError:
    """One line for a failed write: `kept` rows are intact (None: the file was being created
    and nothing at `path` changed)."""
    full = exc.errno in DISK_FULL
    what = f"{'disk full' if full else 'cannot write'} ({_first_line(exc)})"
    if kept is None:
        return StoreError(f"{path}: {what} while creating it; nothing was changed")
    then = (f": free some space, then `scoretk sample --out {path} --resume`" if full else "")
    return StoreError(f"{path}: {what}; its first {kept} samples are intact{then}")


# ---------------------------------------------------------------------------- attributes

def _plain(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (for comparison and printing)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _differences(key: str, old: Any, new: Any) -> list[str]:
    """'field: file X, now Y' for each differing leaf (JSON attributes are compared by field)."""
    if isinstance(old, str) and isinstance(new, str) and old[:1] == new[:1] == "{":
        with contextlib.suppress(ValueError):
            a, b = _flat(json.loads(old)), _flat(json.loads(new))
            return [f"{key}.{k}: file {a.get(k, '<unset>')}, now {b.get(k, '<unset>')}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return [] if old == new else [f"{key}: file {old}, now {new}"]


def _chunks(row_shape: tuple[int, ...], dtype: Any) -> tuple[int, ...]:
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    return (max(1, min(4096, CHUNK_BYTES // max(row_bytes, 1))), *row_shape)


def _row_layout(item_shape: tuple[int, ...]) -> tuple[tuple[int, ...], Any]:
    """(row shape, dtype) of `samples` for items of `item_shape` (C, H, W) or (D,)."""
    if len(item_shape) == 3:
        c, h, w = item_shape
        return (h, w, c), np.uint8
    return (int(np.prod(item_shape)),), np.float32


def _check_layout(path: Path, f: h5py.File, attrs: dict[str, Any]) -> None:
    """Refuse a file whose attributes or datasets are not what scoretk writes (one line)."""
    missing = [k for k in REQUIRED if k not in attrs]
    if missing:
        raise StoreError(f"{path}: attribute {missing[0]!r} is missing: not a complete "
                         "scoretk sample file")
    try:
        item = tuple(int(n) for n in attrs["item_shape"])
        written = int(attrs["num_written"])
    except (TypeError, ValueError):
        raise StoreError(f"{path}: attributes item_shape/num_written are not numbers") from None
    row, dtype = _row_layout(item)
    wanted = {SAMPLES: (row, dtype)}
    if attrs.get("keep_float"):
        wanted[SAMPLES_FLOAT] = (item, np.float32)
    for name, (shape, kind) in wanted.items():
        ds = f.get(name)
        if not (isinstance(ds, h5py.Dataset) and ds.dtype == kind and ds.shape[1:] == shape
                and ds.maxshape[0] is None):
            got = f"{ds.dtype} {ds.shape}" if isinstance(ds, h5py.Dataset) else "missing"
            need = f"a resizable {np.dtype(kind)} (N, {', '.join(map(str, shape))})"
            raise StoreError(f"{path}: dataset {name!r} is {got}, but item_shape {list(item)} "
                             f"needs {need}: not a file scoretk wrote")
        if not 0 <= written <= ds.shape[0]:
            raise StoreError(f"{path}: damaged: num_written is {written} but {name!r} has "
                             f"{ds.shape[0]} rows")


def _new_file(item_shape: tuple[int, ...], attrs: dict[str, Any], keep_float: bool) -> bytes:
    """The bytes of an empty store (built in memory, written to disk in one piece)."""
    is_image = len(item_shape) == 3
    row_shape, dtype = _row_layout(item_shape)
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f.create_dataset(SAMPLES, shape=(0, *row_shape), maxshape=(None, *row_shape),
                         dtype=dtype, chunks=_chunks(row_shape, dtype),
                         compression="gzip", compression_opts=4, shuffle=not is_image)
        if keep_float and is_image:
            f.create_dataset(SAMPLES_FLOAT, shape=(0, *item_shape),
                             maxshape=(None, *item_shape), dtype=np.float32,
                             chunks=_chunks(item_shape, np.float32), compression="gzip",
                             compression_opts=4, shuffle=True)
        meta = {"format": FORMAT, **attrs, "item_shape": list(item_shape),
                "layout": "NHWC uint8" if is_image else "ND float32",
                "keep_float": bool(keep_float and is_image),
                "scoretk_version": __version__, "torch_version": torch.__version__,
                "h5py_version": h5py.__version__, "hdf5_version": h5py.version.hdf5_version,
                "num_written": 0, "complete": False, "network_evaluations": 0}
        for key, value in meta.items():
            if value is None:
                continue
            if isinstance(value, dict):
                value = json.dumps(value, sort_keys=True)
            f.attrs[key] = str(value) if isinstance(value, str) else value
    return image.getvalue()


def _publish(path: Path, data: bytes, *, exclusive: bool) -> None:
    """Write a new file's bytes under a temporary name and rename (or link) it to `path`."""
    try:
        with replacing(path, exclusive=exclusive) as tmp:
            fd = os.open(tmp, os.O_WRONLY)
            try:
                journal.DISK.write(fd, data, 0)
            finally:
                os.close(fd)
    except FileExistsError:
        raise StoreError(f"{path}: another process created it meanwhile; run again with "
                         "--resume or --force") from None
    except OSError as exc:
        raise _write_failure(path, exc, None) from None


class SampleStore:
    """Append-only HDF5 sample file, committed batch by batch (see the module docstring)."""

    def __init__(self, path: str | Path):
        """Open an existing sample file (read its attributes); raises StoreError if not ours."""
        self.path = Path(path)
        self._writer: JournaledFile | None = None
        self._release: weakref.finalize | None = None
        with _journaled(self.path) as jf:
            self.key = jf.key
            with jf.reading() as overlay, _h5(overlay, "r", self.path) as f:
                self._load(f)

    def _load(self, f: h5py.File) -> None:
        if SAMPLES not in f or f.attrs.get("format") != FORMAT:
            raise StoreError(f"{self.path}: not a scoretk sample file (no '{FORMAT}' "
                             f"format attribute or no '{SAMPLES}' dataset)")
        self.attrs: dict[str, Any] = {k: _plain(v) for k, v in f.attrs.items()}
        _check_layout(self.path, f, self.attrs)
        self.rows = int(f[SAMPLES].shape[0])

    @property
    def num_written(self) -> int:
        return int(self.attrs["num_written"])

    @property
    def num_samples(self) -> int:
        return int(self.attrs["num_samples"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs["complete"])

    @property
    def evaluations(self) -> int:
        """Network evaluations the written rows cost, summed over them (0 in files written
        before scoretk counted them)."""
        return int(self.attrs.get("network_evaluations", 0))

    @property
    def item_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.attrs["item_shape"])

    @property
    def is_image(self) -> bool:
        return len(self.item_shape) == 3

    # ------------------------------------------------------------------------ holding the file

    def __enter__(self) -> "SampleStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give up the run lock taken by `create` or `trim` (also when the store is dropped)."""
        if self._release is not None:
            self._release()
        self._writer = self._release = None

    def _claim(self) -> None:
        """Hold the file's run lock: StoreError if another process holds it, or if the path
        now names another file than the one this store read."""
        if self._writer is not None:
            return
        jf = _journaled(self.path)
        if jf.key != self.key:
            jf.close()
            raise StoreError(f"{self.path}: replaced by another process since it was read; "
                             "run again")
        self._writer = _claimed(jf)
        self._release = weakref.finalize(self, jf.close)

    @contextlib.contextmanager
    def _file(self) -> Iterator[JournaledFile]:
        """The file for one operation: the held one, else opened for the operation."""
        if self._writer is not None:
            yield self._writer
            return
        with _journaled(self.path) as jf:
            if jf.key != self.key:
                raise StoreError(f"{self.path}: replaced by another file since it was opened")
            yield jf

    @contextlib.contextmanager
    def _reading(self) -> Iterator[h5py.File]:
        with self._file() as jf, jf.reading() as overlay, _h5(overlay, "r", self.path) as f:
            yield f

    @contextlib.contextmanager
    def _writing(self) -> Iterator[h5py.File]:
        """The file open for changes, committed when the block ends (signals wait meanwhile)."""
        try:
            with deferred_signals(), self._file() as jf, jf.writing() as overlay, \
                    _h5(overlay, "r+", self.path) as f:
                yield f
        except OSError as exc:
            raise _write_failure(self.path, exc, self._written_now()) from None

    def _written_now(self) -> int:
        """num_written as the file says after a failed write (another rank may have added
        rows since this process last looked); this store's count if it cannot be read."""
        with contextlib.suppress(StoreError, OSError):
            return SampleStore(self.path).num_written
        return self.num_written

    # ------------------------------------------------------------------------ writing

    @classmethod
    def create(cls, path: str | Path, item_shape: tuple[int, ...], attrs: dict[str, Any],
               *, keep_float: bool = False) -> "SampleStore":
        """Create an empty store atomically, replacing any regular file at `path` that no
        other process is writing; the store holds the run lock until `close`.

        `attrs` must hold `num_samples`; JSON-able dicts are stored as JSON strings.
        """
        path = Path(path)
        data = _new_file(tuple(int(n) for n in item_shape), attrs, keep_float)
        old = _journaled(path) if os.path.lexists(path) else None
        try:
            if old is not None:
                _claimed(old)
            with contextlib.suppress(OSError):  # left by the file replaced, or one deleted
                journal.DISK.remove(journal.journal_path(path))
            remove_stale_temps(path, STALE_TEMP)
            _publish(path, data, exclusive=old is None)
        finally:
            if old is not None:
                old.close()
        store = cls(path)
        store._claim()
        return store

    def check_matches(self, attrs: dict[str, Any], item_shape: tuple[int, ...],
                      keep_float: bool) -> None:
        """Refuse to resume with settings that would give different samples than the file's."""
        now = {k: (json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)
               for k, v in attrs.items()}
        now.update(item_shape=[int(n) for n in item_shape],
                   keep_float=bool(keep_float and len(item_shape) == 3))
        diffs = [d for k in IDENTITY if k in now
                 for d in _differences(k, self.attrs.get(k), now[k])
                 if not d.startswith("recipe.sample.")]  # defaults only; compared as attrs
        if diffs:
            more = f" (and {len(diffs) - 2} more)" if len(diffs) > 2 else ""
            raise StoreError(f"{self.path}: cannot resume, it was started with different "
                             f"settings: {'; '.join(diffs[:2])}{more}; use the same settings "
                             "or --force to start over")

    def trim(self) -> None:
        """Take the file for this process's run (the run lock, as `create`), check that its
        written rows can be read, and drop rows beyond `num_written` (left by older versions,
        which could be cut off between writing rows and recording them)."""
        self._claim()
        remove_stale_temps(self.path, STALE_TEMP)
        with self._reading() as f:
            self._load(f)  # as it is now that no other run can write it
        try:
            self.verify()
        except StoreError as exc:
            raise StoreError(f"{exc}; {NOT_RESUMABLE}") from None
        if self.rows == self.num_written:
            return
        with self._writing() as f:
            n = min(int(f.attrs["num_written"]), self.rows)
            for name in (SAMPLES, SAMPLES_FLOAT):
                if name in f:
                    f[name].resize(n, axis=0)
            f.attrs["num_written"] = n
        self.rows = n
        self.attrs["num_written"] = n

    def append(self, x: Tensor, start: int | None = None, evaluations: int = 0) -> int:
        """Append a float batch (B, *item_shape) after the file's `num_written` rows (which must
        equal `start` if given); returns the new `num_written`. `evaluations`: the network
        evaluations the batch cost (per sample, summed over its rows).

        One commit: the rows, `num_written`, `complete` and `network_evaluations` change
        together or not at all. The counts are read from the file, so several processes can
        append in turn.
        """
        if tuple(x.shape[1:]) != self.item_shape:
            raise StoreError(f"{self.path}: batch of shape {tuple(x.shape)} does not match "
                             f"the file's item shape {self.item_shape}")
        x = x.detach().float().cpu()
        rows = to_uint8(x) if self.is_image else x.reshape(len(x), -1).numpy()
        b = len(x)
        with self._writing() as f:
            n = int(f.attrs["num_written"])
            if start is not None and n != start:
                raise StoreError(f"{self.path}: expected {start} rows written, the file says "
                                 f"{n}: is another process writing to it?")
            for name, data in ((SAMPLES, rows), (SAMPLES_FLOAT, x.numpy())):
                if name in f:
                    f[name].resize(n + b, axis=0)
                    f[name][n:n + b] = data
            total = int(f.attrs.get("network_evaluations", 0)) + int(evaluations)
            f.attrs["num_written"] = n + b
            f.attrs["complete"] = n + b >= self.num_samples
            f.attrs["network_evaluations"] = total
        self.rows = n + b
        self.attrs.update(num_written=n + b, complete=n + b >= self.num_samples,
                          network_evaluations=total)
        return n + b

    # ------------------------------------------------------------------------ reading

    def read(self, count: int, name: str = SAMPLES) -> np.ndarray:
        """The first `count` written rows (never rows beyond `num_written`)."""
        with self._reading() as f:
            ds = f[name]
            return _rows(self.path, ds, 0, min(count, self.num_written, ds.shape[0]))

    def verify(self) -> None:
        """StoreError if any of the first `num_written` rows cannot be decoded (a file damaged
        outside scoretk: cut short by a copy, a bad disk)."""
        with self._reading() as f:
            for name in (SAMPLES, SAMPLES_FLOAT):
                if name in f:
                    ds = f[name]
                    row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:]))
                    step = max(1, VERIFY_BYTES // (row_bytes * ds.chunks[0])) * ds.chunks[0]
                    for a in range(0, self.num_written, step):
                        _rows(self.path, ds, a, min(a + step, self.num_written))


def _rows(path: Path, ds: h5py.Dataset, a: int, b: int) -> np.ndarray:
    try:
        return ds[a:b]
    except (OSError, ValueError, RuntimeError) as exc:
        raise StoreError(f"{path}: damaged: rows {a} to {b - 1} of {ds.name.lstrip('/')!r} "
                         f"cannot be read ({_first_line(exc)})") from None


def describe(path: str | Path) -> str:
    """A human-readable summary of a sample file: datasets, completeness, provenance."""
    store = SampleStore(path)
    a = store.attrs
    lines = [f"file: {store.path}"]
    with store._reading() as f:
        for name in (SAMPLES, SAMPLES_FLOAT):
            if name in f:
                ds = f[name]
                lines.append(f"{name}: shape {ds.shape} {ds.dtype}, chunks {ds.chunks}, "
                             f"{ds.compression or 'uncompressed'}")
    lines += [f"num_written: {store.num_written} of {store.num_samples}",
              f"complete: {_state(store)}"]
    if store.num_written and "network_evaluations" in a:
        lines.append(f"network_evaluations: {store.evaluations:,} "
                     f"({store.evaluations / store.num_written:.1f} per sample)")
    if store.rows > store.num_written:
        lines.append(f"note: {store.rows - store.num_written} row(s) beyond num_written are "
                     "an unfinished write and are ignored")
    with contextlib.suppress(ValueError, KeyError):
        lines.append(f"recipe: {json.loads(a['recipe'])['name']}")
    for key in ("layout", "seed", "batch_size", "raw_weights", "checkpoint", "checkpoint_sha256",
                "recipe_file", "sampler_settings", "control", "scoretk_version",
                "torch_version", "h5py_version"):
        if key in a:
            lines.append(f"{key}: {a[key]}")
    return "\n".join(lines)


def _state(store: SampleStore) -> str:
    """'yes', 'no (resume ...)', or why the file is damaged (and so cannot be resumed)."""
    try:
        store.verify()
    except StoreError as exc:
        reason = str(exc).removeprefix(f"{store.path}: ")
        return f"{'yes' if store.complete else 'no'}, but the file is {reason}; {NOT_RESUMABLE}"
    return "yes" if store.complete else "no (resume with `scoretk sample --resume`)"
