"""The HDF5 sample store: one file of generated samples plus everything needed to reproduce them.

Layout (contract): `samples` is uint8 (N, H, W, C) for images, float32 (N, D) for vectors,
chunked by whole samples, gzip-compressed, resizable along N; `samples_float` (N, C, H, W)
float32 is optional. Attributes carry the recipe, checkpoint path and sha256, sampler settings,
seed, versions, `num_written` and `complete`.

The file is opened, appended to and closed again for every batch, so between batches (where a
sampling run spends nearly all its time) it is closed and consistent: a SIGKILL leaves a file
that opens, and `num_written` says which rows are real. Ctrl-C / SIGTERM are held back during
the few milliseconds of each write, so they never land mid-write.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from scoretk import __version__
from scoretk.files import deferred_signals, replacing
from scoretk.images import save_scatter, save_uint8_grid, to_uint8

FORMAT = "scoretk-samples-1"
SAMPLES, SAMPLES_FLOAT = "samples", "samples_float"
CHUNK_BYTES = 1 << 17
"""Target chunk size: a few whole samples (one for big images). A chunk never splits a
sample, so reading one image decodes one small chunk, and gzip still has enough to work on."""
LOCK_WAIT = 60.0
"""Seconds to wait for a file another process holds open (see `_open`)."""
IDENTITY = ("recipe", "checkpoint_sha256", "sampler_settings", "seed", "num_samples",
            "raw_weights", "item_shape", "keep_float")
"""Attributes that decide the samples' values: a resume must agree on all of them."""

__all__ = ["SampleStore", "StoreError", "describe", "to_uint8",
           "write_grid_from_file"]


class StoreError(Exception):
    """A sample file that cannot be created, resumed or read; the message is one line."""


def _open(path: Path, mode: str, wait: float = LOCK_WAIT) -> h5py.File:
    """h5py.File with every failure turned into one StoreError line.

    Another process may hold the file for a moment (a writer appending, `scoretk inspect`
    reading): HDF5's lock makes the open fail, so retry for up to `wait` seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            return h5py.File(path, mode)
        except FileNotFoundError:
            raise StoreError(f"{path}: file not found") from None
        except (OSError, ValueError) as exc:
            text = str(exc)
            if "lock" in text.lower():
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise StoreError(f"{path}: in use by another process (HDF5 file lock)") from None
            if "signature" in text.lower():
                raise StoreError(f"{path}: not an HDF5 file") from None
            first = text.splitlines()[0][:160] if text else type(exc).__name__
            raise StoreError(f"{path}: cannot open as HDF5 ({first})") from None


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


class SampleStore:
    """Append-only HDF5 sample file, closed between writes (see the module docstring)."""

    def __init__(self, path: str | Path):
        """Open an existing sample file (read its attributes); raises StoreError if not ours."""
        self.path = Path(path)
        with _open(self.path, "r") as f:
            if SAMPLES not in f or f.attrs.get("format") != FORMAT:
                raise StoreError(f"{self.path}: not a scoretk sample file (no '{FORMAT}' "
                                 f"format attribute or no '{SAMPLES}' dataset)")
            self.attrs: dict[str, Any] = {k: _plain(v) for k, v in f.attrs.items()}
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
    def item_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.attrs["item_shape"])

    @property
    def is_image(self) -> bool:
        return len(self.item_shape) == 3

    @classmethod
    def create(cls, path: str | Path, item_shape: tuple[int, ...], attrs: dict[str, Any],
               *, keep_float: bool = False) -> "SampleStore":
        """Create an empty store atomically (temp file + rename), replacing any file at `path`.

        `attrs` must hold `num_samples`; JSON-able dicts are stored as JSON strings.
        """
        path = Path(path)
        item_shape = tuple(int(n) for n in item_shape)
        is_image = len(item_shape) == 3
        if is_image:
            c, h, w = item_shape
            row_shape, dtype = (h, w, c), np.uint8
        else:
            row_shape, dtype = (int(np.prod(item_shape)),), np.float32
        with replacing(path) as tmp, h5py.File(tmp, "w") as f:
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
                    "num_written": 0, "complete": False}
            for key, value in meta.items():
                if value is None:
                    continue
                if isinstance(value, dict):
                    value = json.dumps(value, sort_keys=True)
                f.attrs[key] = str(value) if isinstance(value, str) else value
        return cls(path)

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
        """Drop rows beyond `num_written` (a write cut short before it was recorded)."""
        if self.rows == self.num_written:
            return
        with deferred_signals(), _open(self.path, "a") as f:
            n = min(self.num_written, self.rows)
            for name in (SAMPLES, SAMPLES_FLOAT):
                if name in f:
                    f[name].resize(n, axis=0)
            f.attrs["num_written"] = n
        self.rows = n
        self.attrs["num_written"] = n

    def append(self, x: Tensor, start: int | None = None) -> int:
        """Append a float batch (B, *item_shape) after the file's `num_written` rows (which must
        equal `start` if given); returns the new `num_written`.

        Open, resize, write, record `num_written` (and `complete`), close: SIGINT/SIGTERM wait.
        The count is read from the file, so several processes can append in turn.
        """
        if tuple(x.shape[1:]) != self.item_shape:
            raise StoreError(f"{self.path}: batch of shape {tuple(x.shape)} does not match "
                             f"the file's item shape {self.item_shape}")
        x = x.detach().float().cpu()
        rows = to_uint8(x) if self.is_image else x.reshape(len(x), -1).numpy()
        b = len(x)
        with deferred_signals(), _open(self.path, "a") as f:
            n = int(f.attrs["num_written"])
            if start is not None and n != start:
                raise StoreError(f"{self.path}: expected {start} rows written, the file says "
                                 f"{n}: is another process writing to it?")
            for name, data in ((SAMPLES, rows), (SAMPLES_FLOAT, x.numpy())):
                if name in f:
                    f[name].resize(n + b, axis=0)
                    f[name][n:n + b] = data
            f.attrs["num_written"] = n + b
            f.attrs["complete"] = n + b >= self.num_samples
        self.rows = n + b
        self.attrs.update(num_written=n + b, complete=n + b >= self.num_samples)
        return n + b

    def read(self, count: int, name: str = SAMPLES) -> np.ndarray:
        """The first `count` written rows (never rows beyond `num_written`)."""
        with _open(self.path, "r") as f:
            return f[name][: min(count, self.num_written, f[name].shape[0])]


def describe(path: str | Path) -> str:
    """A human-readable summary of a sample file: datasets, completeness, provenance."""
    store = SampleStore(path)
    a = store.attrs
    lines = [f"file: {store.path}"]
    with _open(store.path, "r") as f:
        for name in (SAMPLES, SAMPLES_FLOAT):
            if name in f:
                ds = f[name]
                lines.append(f"{name}: shape {ds.shape} {ds.dtype}, chunks {ds.chunks}, "
                             f"{ds.compression or 'uncompressed'}")
    state = "yes" if store.complete else "no (resume with `scoretk sample --resume`)"
    lines += [f"num_written: {store.num_written} of {store.num_samples}",
              f"complete: {state}"]
    if store.rows > store.num_written:
        lines.append(f"note: {store.rows - store.num_written} row(s) beyond num_written are "
                     "an unfinished write and are ignored")
    with contextlib.suppress(ValueError, KeyError):
        lines.append(f"recipe: {json.loads(a['recipe'])['name']}")
    for key in ("layout", "seed", "batch_size", "raw_weights", "checkpoint", "checkpoint_sha256",
                "sampler_settings", "scoretk_version", "torch_version", "h5py_version"):
        if key in a:
            lines.append(f"{key}: {a[key]}")
    return "\n".join(lines)


def write_grid_from_file(path: str | Path, png: str | Path, k: int = 64) -> None:
    """PNG of the first k samples: an image mosaic, or a scatter plot for 2-D points."""
    if k <= 0:
        raise StoreError(f"-k must be positive (got {k})")
    png = Path(png)
    if not png.parent.is_dir():
        raise StoreError(f"{png}: directory {png.parent} does not exist")
    store = SampleStore(path)
    rows = store.read(k)
    if len(rows) == 0:
        raise StoreError(f"{store.path}: no samples written yet")
    if store.is_image:
        save_uint8_grid(rows, png)
    elif rows.shape[1] == 2:
        save_scatter(rows, png)
    else:
        raise StoreError(f"{store.path}: a grid needs images or 2-D points, the samples are "
                         f"{rows.shape[1]}-D vectors")
