"""`scoretk sample` / `scoretk inspect`: determinism, interruption, torchrun, memory, bad input.

Checkpoints are made here from tiny recipes with untrained (but EMA-updated) weights: what is
tested is the plumbing, which does not care whether the model is any good.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from scoretk import assemble
from scoretk.checkpoint import CHECKPOINT_FORMAT, RunDir, save_checkpoint
from scoretk.cli import main
from scoretk.plugins import default_registry
from scoretk.recipe import Recipe

from conftest import assert_one_line_error, interrupt_sampling_at, run_cli

TOY = {"name": "toy", "data": {"kind": "toy2d", "n": 500},
       "schedule": {"kind": "geometric", "sigma_max": 5.0, "sigma_min": 0.1, "num_levels": 3},
       "net": {"kind": "mlp", "hidden": 16, "depth": 2}, "loss": {"kind": "dsm"},
       "sampler": {"kind": "annealed_langevin", "steps_per_level": 2, "eps": 1e-3},
       "averager": {"kind": "ema", "rate": 0.9}, "train": {"iterations": 1, "device": "cpu"},
       "sample": {"num_samples": 24, "batch_size": 8, "seed": 3}}
IMG = {**TOY, "name": "img", "data": {"kind": "digits", "size": 8},
       "schedule": {"kind": "geometric", "sigma_max": 1.0, "sigma_min": 0.01, "num_levels": 3},
       "net": {"kind": "convnet", "channels": 8, "blocks": 1},
       "sampler": {"kind": "annealed_langevin", "steps_per_level": 2, "eps": 5e-5}}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
"""For subprocesses: this machine is shared, and two OpenMP threads per process mostly wait."""


def make_checkpoint(path: Path, raw: dict, shape: tuple[int, ...]) -> Path:
    """A checkpoint whose averaged weights differ from the raw ones."""
    registry = default_registry()
    recipe = Recipe.from_dict(raw, registry)
    torch.manual_seed(0)
    net = assemble.build_model(recipe, registry, shape).net
    averager = assemble.build_averager(recipe, registry, net)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    averager.update(net)
    save_checkpoint({"model": net.state_dict(), "averager": averager.state_dict(),
                     "optimizer": {}, "step": 1, "recipe": recipe.dump(), "shape": list(shape),
                     "rng": {}, "scoretk_version": "0.1.0",
                     "torch_version": str(torch.__version__)}, path)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs (conftest); see ONE_THREAD


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    return {"toy": make_checkpoint(d / "toy.pt", TOY, (2,)),
            "img": make_checkpoint(d / "img.pt", IMG, (1, 8, 8))}


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def sample(ckpt: Path, out: Path, *args: str):
    result = cli("sample", "--checkpoint", ckpt, "--out", out, "--device", "cpu", *args)
    assert result.exit_code == 0, result.output + result.stderr
    return result


def rows(path: Path, name: str = "samples") -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][:]


def attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return dict(f.attrs)


# --- determinism ---------------------------------------------------------------------------

def test_batch_size_does_not_change_the_samples(ckpts, tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    sample(ckpts["img"], a, "-n", "40", "--batch-size", "7", "--keep-float")
    sample(ckpts["img"], b, "-n", "40", "--batch-size", "16", "--keep-float")
    assert rows(a).shape == (40, 8, 8, 1) and rows(a).dtype == np.uint8
    np.testing.assert_array_equal(rows(a), rows(b))
    np.testing.assert_array_equal(rows(a, "samples_float"), rows(b, "samples_float"))
    assert attrs(a)["batch_size"] == 7 and bool(attrs(a)["complete"])


def test_batch_size_toy_vectors(ckpts, tmp_path):
    """Float32 vectors: the same samples whatever the batch size, up to rounding: CPU GEMM
    kernels pick their blocking by the number of rows and by the CPU (AVX2, AVX-512), so
    other batch sizes may differ in the last bits (not different samples)."""
    a, b, c = (tmp_path / f"{n}.h5" for n in "abc")
    sample(ckpts["toy"], a, "-n", "48", "--batch-size", "8")
    sample(ckpts["toy"], b, "-n", "48", "--batch-size", "24")
    sample(ckpts["toy"], c, "-n", "48", "--batch-size", "7")
    assert rows(a).shape == (48, 2) and rows(a).dtype == np.float32
    np.testing.assert_allclose(rows(a), rows(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows(a), rows(c), rtol=1e-5, atol=1e-5)


def test_batch_split_across_threads_does_not_change_the_samples(ckpts, tmp_path):
    """sample.batch_threads runs batch chunks on separate CPU threads: same rows, bit for bit
    (chunks of >= 8 rows for the toy MLP, see above)."""
    for kind, batch in (("img", 16), ("toy", 24)):
        a, b = tmp_path / f"{kind}-1.h5", tmp_path / f"{kind}-3.h5"
        for path, threads in ((a, 1), (b, 3)):
            sample(ckpts[kind], path, "-n", "48", "--batch-size", str(batch),
                   "-o", f"sample.batch_threads={threads}")
        np.testing.assert_array_equal(rows(a), rows(b))


def test_interrupted_then_resumed_equals_uninterrupted(ckpts, tmp_path, monkeypatch):
    ref, out = tmp_path / "ref.h5", tmp_path / "out.h5"
    sample(ckpts["img"], ref, "-n", "40", "--batch-size", "8")
    restore = interrupt_sampling_at(monkeypatch, 3)
    result = cli("sample", "--checkpoint", ckpts["img"], "--out", out, "-n", "40",
                 "--batch-size", "8", "--device", "cpu")
    assert result.exit_code != 0
    restore()
    a = attrs(out)
    assert a["num_written"] == 16 and not a["complete"]
    with h5py.File(out, "a") as f:  # and a batch that died after the resize, before num_written
        f["samples"].resize(20, axis=0)
        f["samples"][16:] = 7
    # resume: checkpoint and settings come from the file; another batch size is fine
    result = cli("sample", "--out", out, "--resume", "--batch-size", "5", "--device", "cpu")
    assert result.exit_code == 0, result.output + result.stderr
    assert "24 new" in result.output
    np.testing.assert_array_equal(rows(out), rows(ref))
    assert attrs(out)["num_written"] == 40 and attrs(out)["complete"]


def test_torchrun_two_processes_write_the_single_process_file(ckpts, tmp_path):
    ref, out = tmp_path / "ref.h5", tmp_path / "dist.h5"
    sample(ckpts["img"], ref, "-n", "44", "--batch-size", "8", "--keep-float")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scoretk", "sample", "--checkpoint", str(ckpts["img"]), "--out", str(out),
           "-n", "44", "--batch-size", "8", "--keep-float", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=ONE_THREAD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone reports
    np.testing.assert_array_equal(rows(out), rows(ref))
    np.testing.assert_array_equal(rows(out, "samples_float"), rows(ref, "samples_float"))
    assert attrs(out)["world_size"] == 2 and attrs(out)["num_written"] == 44


def start_sampling(ckpt: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scoretk", "sample", "--checkpoint",
                             str(ckpt), "--out", str(out), "--device", "cpu", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ONE_THREAD)


def wait_for_rows(proc: subprocess.Popen, out: Path) -> int:
    """num_written once it is positive (0 if the process ends first)."""
    from scoretk.store import SampleStore, StoreError

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(StoreError):  # not created yet
            written = SampleStore(out).num_written
            if written > 0:
                return written
        time.sleep(0.01)
    return 0


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()


def test_sigkill_at_a_random_moment_leaves_a_file_that_resumes_exactly(ckpts, tmp_path):
    """A real process with real fsyncs, killed a random moment after its first batch landed
    (tests/test_store_faults.py kills at every write position and many random moments)."""
    from scoretk.store import SampleStore

    ref, out = tmp_path / "ref.h5", tmp_path / "killed.h5"
    args = ["-n", "1000", "--batch-size", "50", "-o", "sampler.steps_per_level=10"]
    proc = start_sampling(ckpts["toy"], out, *args)
    try:
        assert wait_for_rows(proc, out) > 0, proc.stderr.read()
        time.sleep(random.uniform(0, 0.2))
    finally:
        kill(proc)
    store = SampleStore(out)  # opens, rolling back a commit the kill interrupted
    n = store.num_written
    assert 0 < n < 1000 and n % 50 == 0 and not store.complete
    sample(ckpts["toy"], ref, *args)
    np.testing.assert_array_equal(store.read(n), rows(ref)[:n])
    result = sample(ckpts["toy"], out, "--resume", *args)
    assert f"{1000 - n} new" in result.output
    np.testing.assert_array_equal(rows(out), rows(ref))
    assert attrs(out)["complete"]


def test_a_second_run_on_a_file_in_use_is_refused(ckpts, tmp_path):
    """--force or --resume while another process samples into the file: one line naming it,
    and the running one goes on undisturbed; once it is gone, the file is free."""
    from scoretk.store import SampleStore

    out = tmp_path / "busy.h5"
    proc = start_sampling(ckpts["toy"], out, "-n", "400", "--batch-size", "20",
                          "-o", "sampler.steps_per_level=300")
    try:
        assert wait_for_rows(proc, out) > 0, proc.stderr.read()
        for extra in (["--force", "-n", "8"], ["--resume"]):
            result = cli("sample", "--checkpoint", ckpts["toy"], "--out", out, *extra)
            assert_one_line_error(result, str(out), f"PID {proc.pid}")
        assert SampleStore(out).num_samples == 400 and proc.poll() is None
    finally:
        kill(proc)
    sample(ckpts["toy"], out, "--force", "-n", "8")
    assert attrs(out)["num_written"] == 8


LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from scoretk.cli import main
main(sys.argv[1:])
"""


def test_disk_full_is_one_line_and_keeps_the_rows(ckpts, tmp_path):
    """A real EFBIG (the file size limit set just below the finished file's size)."""
    from scoretk.store import SampleStore

    ref, out = tmp_path / "ref.h5", tmp_path / "full.h5"
    args = ["-n", "40", "--batch-size", "8"]
    sample(ckpts["img"], ref, *args)
    limit = ref.stat().st_size - 1
    proc = subprocess.run([sys.executable, "-c", LIMITED.format(limit=limit), "sample",
                           "--checkpoint", str(ckpts["img"]), "--out", str(out),
                           "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    stderr = proc.stderr
    assert proc.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert "disk full" in errors[0] and "--resume" in errors[0], errors[0]
    n = SampleStore(out).num_written
    assert 0 < n < 40
    np.testing.assert_array_equal(rows(out)[:n], rows(ref)[:n])
    result = sample(ckpts["img"], out, "--resume", *args)
    assert f"{40 - n} new" in result.output
    np.testing.assert_array_equal(rows(out), rows(ref))


RSS_SCRIPT = """
import resource, sys
from scoretk.cli import main
main(sys.argv[1:], standalone_mode=False)
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_peak_memory_does_not_grow_with_n(tmp_path):
    """3x32x32 items: keeping 20,000 of them would add 240 MB of floats to a ~0.4 GB process."""
    raw = {**TOY, "name": "rss", "data": {"kind": "cifar10", "root": "/nonexistent"},
           "schedule": {"kind": "geometric", "sigma_max": 1.0, "sigma_min": 0.1,
                        "num_levels": 2},
           "net": {"kind": "mlp", "hidden": 8, "depth": 1},
           "sampler": {"kind": "annealed_langevin", "steps_per_level": 1, "eps": 1e-3,
                       "denoise": False}}
    ckpt = make_checkpoint(tmp_path / "rss.pt", raw, (3, 32, 32))
    peak = {}
    for n in (200, 20_000):
        out = tmp_path / f"rss{n}.h5"
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, "sample", "--checkpoint",
                               str(ckpt), "--out", str(out), "-n", str(n), "--batch-size",
                               "500", "--device", "cpu"], capture_output=True, text=True,
                              timeout=600, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr
        peak[n] = int(proc.stdout.split("MAXRSS_KB")[1].split()[0])
        assert attrs(out)["num_written"] == n
    print(f"peak RSS: N=200 {peak[200] / 1024:.0f} MiB, N=20000 {peak[20_000] / 1024:.0f} MiB")
    assert abs(peak[20_000] - peak[200]) < 0.2 * peak[200], peak


# --- options -------------------------------------------------------------------------------

def test_averaged_weights_by_default_raw_on_request(ckpts, tmp_path):
    a, b = tmp_path / "ema.h5", tmp_path / "raw.h5"
    sample(ckpts["toy"], a, "-n", "16")
    sample(ckpts["toy"], b, "-n", "16", "--raw-weights")
    assert not np.array_equal(rows(a), rows(b))
    assert bool(attrs(b)["raw_weights"]) and not attrs(a)["raw_weights"]


def test_defaults_come_from_the_recipe_and_sampler_overrides_apply(ckpts, tmp_path):
    out = tmp_path / "o.h5"
    sample(ckpts["toy"], out, "-o", "sampler.steps_per_level=4", "-o", "sample.seed=11")
    a = attrs(out)
    assert a["num_written"] == 24 and a["batch_size"] == 8 and a["seed"] == 11
    assert '"steps_per_level": 4' in a["sampler_settings"]
    assert '"evaluations_per_sample": 13' in a["sampler_settings"]


def test_data_init_is_deterministic(ckpts, tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    sample(ckpts["img"], a, "-n", "20", "--batch-size", "6", "-o", "sampler.init=data")
    sample(ckpts["img"], b, "-n", "20", "--batch-size", "20", "-o", "sampler.init=data")
    np.testing.assert_array_equal(rows(a), rows(b))


def test_finds_run_latest_and_most_recent_run(ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("sample", "--out", "x.h5", "-n", "8")
    assert_one_line_error(result, "no checkpoint")
    for name in ("old", "new"):
        run = RunDir(tmp_path / "runs" / name).create()
        run.save(torch.load(ckpts["toy"], weights_only=True), step=5, keep=2)
        time.sleep(0.05)
    assert cli("sample", "--out", "a.h5", "-n", "8", "--device", "cpu").exit_code == 0
    assert attrs(tmp_path / "a.h5")["checkpoint"].endswith("new/checkpoints/ckpt-00000005.pt")
    assert cli("sample", "--run", "runs/old", "--out", "b.h5", "-n", "8").exit_code == 0
    assert "old/checkpoints" in attrs(tmp_path / "b.h5")["checkpoint"]


def test_existing_file_needs_resume_or_force(ckpts, tmp_path):
    out = tmp_path / "o.h5"
    sample(ckpts["toy"], out, "-n", "8")
    before = out.read_bytes()
    result = cli("sample", "--checkpoint", ckpts["toy"], "--out", out, "-n", "8")
    assert_one_line_error(result, "already exists", "--resume", "--force")
    result = sample(ckpts["toy"], out, "-n", "8", "--resume")  # complete: nothing to do
    assert "already complete" in result.output and out.read_bytes() == before
    sample(ckpts["toy"], out, "-n", "16", "--force")
    assert attrs(out)["num_written"] == 16


def test_resume_refuses_different_settings(ckpts, tmp_path):
    out = tmp_path / "o.h5"
    sample(ckpts["toy"], out, "-n", "8")
    with h5py.File(out, "a") as f:
        f.attrs["complete"] = False
        f.attrs["num_written"] = 0
    for args, needle in ((["--seed", "9"], "seed: file 3, now 9"),
                         (["-o", "sampler.steps_per_level=5"], "steps_per_level"),
                         (["-n", "9"], "num_samples"),
                         (["--checkpoint", ckpts["img"]], "checkpoint_sha256")):
        before = out.read_bytes()
        result = cli("sample", "--out", out, "--resume", *args)
        assert_one_line_error(result, "cannot resume", needle)
        assert out.read_bytes() == before


# --- bad input -----------------------------------------------------------------------------

class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", ["missing", "foreign", "corrupt0", "corrupt1", "corrupt2",
                                  "truncated", "evil", "directory"])
def test_bad_checkpoints_are_one_line_errors_and_leave_the_output_alone(ckpts, tmp_path, case):
    out = tmp_path / "keep.h5"
    sample(ckpts["toy"], out, "-n", "8")
    before = out.read_bytes()
    bad, marker = tmp_path / "bad.pt", tmp_path / "PWNED"
    needle = {"missing": "not found", "foreign": "not a scoretk checkpoint", "evil": "refused",
              "directory": "directory"}.get(case, "bad.pt: ")
    if case == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    elif case.startswith("corrupt"):
        bad.write_bytes(np.random.default_rng(int(case[-1])).bytes(5000))
    elif case == "truncated":
        bad.write_bytes(ckpts["toy"].read_bytes()[:3000])
    elif case == "evil":
        torch.save({"format": CHECKPOINT_FORMAT, "model": Evil(marker)}, bad)
    elif case == "directory":
        bad.mkdir()
    result = cli("sample", "--checkpoint", bad, "--out", out, "-n", "8", "--force")
    assert_one_line_error(result, needle)
    assert out.read_bytes() == before
    assert not marker.exists()


@pytest.mark.parametrize("args,needle", [
    (["-n", "0"], "--num-samples must be positive"),
    (["-n", "-5"], "--num-samples must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--resume", "--force"], "give one"),
    (["--seed", str(2**70)], "--seed must be a whole number from 0 to 2**63 - 1"),
    (["--seed", "-1"], "--seed must be"),
    (["-o", "net.hidden=4"], "only sampler.* and sample.*"),
    (["-o", "sampler.steps_per_level=0"], "sampler.steps_per_level"),
    (["-o", "sampler.nonsense=1"], "sampler.nonsense"),
    (["--grid", "nodir/g.png"], "does not exist"),
    (["--grid", "g.txt"], "--grid g.txt: pictures are written as PNG"),
])
def test_bad_arguments_are_one_line_errors(ckpts, tmp_path, args, needle):
    out = tmp_path / "keep.h5"
    out.write_bytes(b"precious")
    result = cli("sample", "--checkpoint", ckpts["toy"], "--out", out, "--force", *args)
    assert_one_line_error(result, needle)
    assert out.read_bytes() == b"precious"


def test_out_in_a_missing_directory(ckpts, tmp_path):
    result = cli("sample", "--checkpoint", ckpts["toy"], "--out", tmp_path / "no" / "o.h5")
    assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "no").exists()


def test_resume_of_a_foreign_file_is_refused(ckpts, tmp_path):
    out = tmp_path / "o.h5"
    out.write_bytes(os.urandom(3000))
    before = out.read_bytes()
    assert_one_line_error(cli("sample", "--checkpoint", ckpts["toy"], "--out", out,
                              "--resume"), "not an HDF5 file")
    assert out.read_bytes() == before


def test_out_naming_a_pipe_or_device_is_never_replaced(ckpts, tmp_path):
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    for extra in (["--force"], ["--resume"]):
        result = cli("sample", "--checkpoint", ckpts["toy"], "--out", fifo, "-n", "8", *extra)
        assert_one_line_error(result, str(fifo), "not a regular file")
        assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.h5"]


def scoretk_file_with(ckpts, path: Path, change) -> bytes:
    """A real sample file changed by `change(h5py.File)`; its bytes."""
    sample(ckpts["img"], path, "-n", "16", "--batch-size", "8")
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
        change(f)
    return path.read_bytes()


def _other_shape(f: h5py.File) -> None:
    del f["samples"]
    f.create_dataset("samples", data=np.zeros((16, 5), np.float32), maxshape=(None, 5))


@pytest.mark.parametrize("change,needle", [
    (_other_shape, "dataset 'samples' is float32 (16, 5)"),
    (lambda f: f.attrs.__delitem__("num_written"), "attribute 'num_written' is missing"),
    (lambda f: f.attrs.__setitem__("num_written", 99), "num_written is 99"),
])
def test_foreign_or_altered_files_are_refused_untouched(ckpts, tmp_path, change, needle):
    """scoretk's attributes over other data: --resume and inspect give one line, and the file
    keeps every byte."""
    out = tmp_path / "odd.h5"
    before = scoretk_file_with(ckpts, out, change)
    assert_one_line_error(cli("sample", "--out", out, "--resume", "--device", "cpu"), needle)
    assert_one_line_error(cli("inspect", out), needle)
    assert out.read_bytes() == before


def test_truncated_file_is_named_damaged_at_once(ckpts, tmp_path):
    out = tmp_path / "cut.h5"
    sample(ckpts["img"], out, "-n", "16")
    out.write_bytes(out.read_bytes()[:-500])
    for args in (["inspect", out], ["sample", "--out", out, "--resume"]):
        assert_one_line_error(cli(*args), str(out), "damaged or truncated HDF5 file")


def test_damaged_rows_are_not_called_resumable(ckpts, tmp_path):
    out = tmp_path / "bad.h5"
    data = bytearray(scoretk_file_with(ckpts, out, lambda f: None))
    with h5py.File(out) as f:
        chunk = f["samples"].id.get_chunk_info(0)
    data[chunk.byte_offset + 10:chunk.byte_offset + 30] = os.urandom(20)
    out.write_bytes(data)
    result = cli("inspect", out)
    assert result.exit_code == 0, result.output + result.stderr
    state = next(line for line in result.output.splitlines() if line.startswith("complete:"))
    assert "damaged" in state and "cannot be resumed" in state and "resume with" not in state
    assert_one_line_error(cli("sample", "--out", out, "--resume", "--device", "cpu"),
                          "damaged", "--force")
    assert out.read_bytes() == data


# --- inspect and grids ---------------------------------------------------------------------

def test_inspect_and_grids(ckpts, tmp_path):
    out, png = tmp_path / "i.h5", tmp_path / "g.png"
    result = sample(ckpts["img"], out, "-n", "10", "--grid", png)
    # two 4 x 3 mosaics (samples, digits) of 8 px images with 2 px padding, enlarged 4x,
    # 16 px apart and around, under an 18 px label row
    assert Image.open(png).size == (2 * 4 * 42 + 3 * 16, 18 + 4 * 32 + 16)
    result = cli("inspect", out, "--grid", tmp_path / "h.png", "-k", "4")
    assert result.exit_code == 0, result.output + result.stderr
    assert "samples: shape (10, 8, 8, 1) uint8" in result.output
    assert "num_written: 10 of 10" in result.output and "complete: yes" in result.output
    assert Image.open(tmp_path / "h.png").size == (2 * 4 * 22 + 3 * 16, 18 + 4 * 22 + 16)
    toy = tmp_path / "t.h5"
    sample(ckpts["toy"], toy, "-n", "8", "--grid", tmp_path / "s.png")
    assert Image.open(tmp_path / "s.png").size == (600, 600)
    assert cli("inspect", toy, "--grid", tmp_path / "t.png").exit_code == 0
    assert Image.open(tmp_path / "t.png").size == (600, 600)
    assert_one_line_error(cli("inspect", tmp_path / "none.h5"), "not found")


def test_inspect_grid_must_be_a_png(ckpts, tmp_path):
    out = tmp_path / "i.h5"
    sample(ckpts["toy"], out, "-n", "8")
    assert_one_line_error(cli("inspect", out, "--grid", tmp_path / "g.txt"),
                          "pictures are written as PNG")
    assert not (tmp_path / "g.txt").exists()


# --- signals and preflight ----------------------------------------------------------------

@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_sampling_leaves_a_file_that_resumes(ckpts, tmp_path, signum, status):
    from scoretk.store import SampleStore

    ref, out = tmp_path / "ref.h5", tmp_path / "stopped.h5"
    args = ["-n", "1000", "--batch-size", "50", "-o", "sampler.steps_per_level=10"]
    proc = start_sampling(ckpts["toy"], out, *args)
    assert wait_for_rows(proc, out) > 0, proc.stderr.read()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    n = SampleStore(out).num_written
    assert err.rstrip().endswith(f"interrupted: {out} is valid and holds {n} samples; "
                                 f"`scoretk sample --out {out} --resume` continues it")
    sample(ckpts["toy"], ref, *args)
    sample(ckpts["toy"], out, "--resume", *args)
    np.testing.assert_array_equal(rows(out), rows(ref))


@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "50000000", "-n", "50000000"], "batch size 50,000,000: one batch needs "
                                                     "about"),
    (["-n", str(10**15)], "-n 1,000,000,000,000,000: "),
])
def test_requests_beyond_memory_or_disk_are_refused_before_writing(ckpts, tmp_path, args,
                                                                   needle):
    out = tmp_path / "big.h5"
    result = run_cli("sample", "--checkpoint", str(ckpts["toy"]), "--out", str(out),
                     "--device", "cpu", *args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {needle}") and result.stderr.count("\n") == 1, \
        result.stderr
    assert not out.exists()
