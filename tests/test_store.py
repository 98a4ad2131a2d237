"""The HDF5 sample store: layout, appending, trimming, resume checks, signals, inspect/grid."""
from __future__ import annotations

import json
import os
import signal

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from scoretk.images import save_grid, to_uint8
from scoretk.files import deferred_signals
from scoretk.store import (SAMPLES, SAMPLES_FLOAT, SampleStore, StoreError,
                           describe)

ATTRS = {"recipe": {"name": "t", "sampler": {"kind": "x", "T": 3}, "sample": {"batch_size": 4}},
         "sampler_settings": {"eps": 1e-5, "T": 3}, "seed": 7, "num_samples": 10,
         "batch_size": 4, "checkpoint": "/x/ckpt.pt", "checkpoint_sha256": "ab" * 32,
         "raw_weights": False}


def test_to_uint8_clamps_rounds_and_goes_nhwc():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.49 / 255, 0.5, 1.0, 2.0]).view(1, 1, 1, 7)
    x = torch.cat([x, x * 0 + 1, x * 0], dim=1)  # 3 channels
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 7, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 1, 128, 255, 255]  # round half to even at 0.5
    assert out[0, 0, :, 1].tolist() == [255] * 7 and out[0, 0, :, 2].tolist() == [0] * 7


def test_image_layout_chunks_compression_and_attrs(tmp_path):
    path = tmp_path / "s.h5"
    store = SampleStore.create(path, (3, 8, 6), ATTRS, keep_float=True)
    assert store.num_written == 0 and not store.complete
    x = torch.rand(4, 3, 8, 6)
    assert store.append(x) == 4
    assert store.append(torch.rand(6, 3, 8, 6)) == 10
    with h5py.File(path) as f:
        ds = f[SAMPLES]
        assert ds.dtype == np.uint8 and ds.shape == (10, 8, 6, 3)
        assert ds.maxshape == (None, 8, 6, 3)
        assert ds.chunks[1:] == (8, 6, 3) and ds.chunks[0] >= 1  # whole samples per chunk
        assert ds.compression == "gzip"
        np.testing.assert_array_equal(ds[:4], to_uint8(x))
        fl = f[SAMPLES_FLOAT]
        assert fl.dtype == np.float32 and fl.shape == (10, 3, 8, 6)
        np.testing.assert_array_equal(fl[:4], x.numpy())
        a = f.attrs
        assert a["num_written"] == 10 and bool(a["complete"]) and a["seed"] == 7
        assert json.loads(a["recipe"])["name"] == "t"
        assert json.loads(a["sampler_settings"])["T"] == 3
        for key in ("checkpoint", "checkpoint_sha256", "batch_size", "num_samples",
                    "scoretk_version", "torch_version", "h5py_version"):
            assert key in a


def test_vectors_are_float32_nd_without_float_copy(tmp_path):
    store = SampleStore.create(tmp_path / "v.h5", (2,), ATTRS, keep_float=True)
    x = torch.randn(10, 2)
    store.append(x)
    with h5py.File(store.path) as f:
        assert SAMPLES_FLOAT not in f
        assert f[SAMPLES].dtype == np.float32 and f[SAMPLES].maxshape == (None, 2)
        np.testing.assert_array_equal(f[SAMPLES][:], x.numpy())


def test_append_checks_shape_and_expected_start(tmp_path):
    store = SampleStore.create(tmp_path / "v.h5", (2,), ATTRS)
    with pytest.raises(StoreError, match="item shape"):
        store.append(torch.zeros(3, 3))
    store.append(torch.zeros(3, 2))
    with pytest.raises(StoreError, match="another process"):
        store.append(torch.zeros(3, 2), start=0)


def test_trim_discards_rows_beyond_num_written(tmp_path):
    store = SampleStore.create(tmp_path / "v.h5", (2,), ATTRS)
    store.append(torch.ones(4, 2))
    with h5py.File(store.path, "a") as f:  # a write that died before recording num_written
        f[SAMPLES].resize(7, axis=0)
        f[SAMPLES][4:] = 99
    store = SampleStore(store.path)
    assert store.rows == 7 and store.num_written == 4
    assert store.read(100).shape == (4, 2)  # readers never see the unrecorded rows
    assert "beyond num_written" in describe(store.path)
    store.trim()
    with h5py.File(store.path) as f:
        assert f[SAMPLES].shape == (4, 2)
    store.append(torch.zeros(2, 2), start=4)
    np.testing.assert_array_equal(store.read(10)[4:], 0)


def test_append_after_torn_write_overwrites_the_unrecorded_rows(tmp_path):
    store = SampleStore.create(tmp_path / "v.h5", (2,), ATTRS)
    store.append(torch.ones(4, 2))
    with h5py.File(store.path, "a") as f:
        f[SAMPLES].resize(9, axis=0)
    store.append(torch.zeros(3, 2))
    with h5py.File(store.path) as f:
        assert f[SAMPLES].shape == (7, 2) and f.attrs["num_written"] == 7


def test_check_matches_names_the_differing_setting(tmp_path):
    store = SampleStore.create(tmp_path / "v.h5", (2,), ATTRS)
    store.check_matches(ATTRS, (2,), False)
    # the recipe's sample section holds defaults only (compared as seed/num_samples attrs)
    store.check_matches({**ATTRS, "recipe": {**ATTRS["recipe"], "sample": {"batch_size": 9}},
                         "batch_size": 9}, (2,), False)
    with pytest.raises(StoreError, match=r"sampler_settings\.T: file 3, now 5"):
        store.check_matches({**ATTRS, "sampler_settings": {"eps": 1e-5, "T": 5}}, (2,), False)
    with pytest.raises(StoreError, match="seed: file 7, now 8"):
        store.check_matches({**ATTRS, "seed": 8}, (2,), False)
    with pytest.raises(StoreError, match="checkpoint_sha256"):
        store.check_matches({**ATTRS, "checkpoint_sha256": "cd" * 32}, (2,), False)
    with pytest.raises(StoreError, match="item_shape"):
        store.check_matches(ATTRS, (3,), False)


def test_create_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "v.h5"
    path.write_bytes(b"old")
    SampleStore.create(path, (2,), ATTRS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.h5"]


def test_foreign_and_broken_files_are_one_line_errors(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        SampleStore(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match="not an HDF5 file"):
        describe(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["samples"] = np.zeros((3, 2))
    with pytest.raises(StoreError, match="not a scoretk sample file"):
        SampleStore(other)


def test_deferred_signals_deliver_after_the_block():
    """With Python's own SIGINT handler in place. A shell starts background jobs (`make test
    &`) with SIGINT ignored, and Python keeps that; deferred_signals then rightly restores
    'ignored', and nothing is raised."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("finished the write")
        assert done == ["finished the write"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_describe_reports_shape_and_progress(tmp_path):
    store = SampleStore.create(tmp_path / "s.h5", (1, 4, 4), ATTRS)
    store.append(torch.rand(4, 1, 4, 4))
    text = describe(store.path)
    assert "samples: shape (4, 4, 4, 1) uint8" in text
    assert "num_written: 4 of 10" in text and "complete: no" in text
    assert "seed: 7" in text and "recipe: t" in text


def test_save_grid_writes_a_png(tmp_path):
    save_grid(torch.rand(6, 1, 8, 8), tmp_path / "g.png", nrow=3)
    img = Image.open(tmp_path / "g.png")
    assert img.size == (3 * 10 + 2, 2 * 10 + 2) and img.mode == "L"
