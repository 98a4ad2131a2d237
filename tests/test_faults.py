"""Stops and crashes during training: SIGINT/SIGTERM end `scoretk train` with 130/143 and the
last good state written, whenever they come; a second Ctrl-C stops at once but never inside a
checkpoint write; a rank killed under torchrun restarts from the last checkpoint and ends
with the weights of an uninterrupted run. The faults come from the test plugin
tests/plugins/scoretk_faults (installed by the `plugin_site` fixture)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch
import yaml

from scoretk import checkpoint as ckpt_mod
from scoretk.checkpoint import RunDir, load_checkpoint
from scoretk.files import HeldSignals, Stopped, raise_if_stopped


def _start(args: list[str], plugin_site=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if plugin_site is not None:
        env["PYTHONPATH"] = str(plugin_site)
    return subprocess.Popen([sys.executable, "-m", "scoretk", *args], stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for(path, proc: subprocess.Popen, lines: int = 0) -> None:
    """Until `path` exists (and holds `lines` lines), while `proc` runs."""
    deadline = time.monotonic() + 300
    while not (path.exists() and path.read_text().count("\n") >= lines):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)


def _write(tmp_path, raw: dict, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sigterm_while_training_writes_a_checkpoint_and_exits_143(tmp_path, toy_recipe):
    """(Ctrl-C, 130: tests/test_train.py)"""
    toy_recipe["train"].update(iterations=100000, checkpoint_every=100000, log_every=5)
    proc = _start(["train", str(_write(tmp_path, toy_recipe)), "--run-dir", str(tmp_path / "run")])
    _wait_for(tmp_path / "run" / "metrics.jsonl", proc, lines=2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    step = load_checkpoint(RunDir(tmp_path / "run").latest())["step"]
    assert step >= 10 and err.rstrip().endswith(
        f"interrupted at step {step}; checkpoint {tmp_path / 'run'}/checkpoints/"
        f"ckpt-{step:08d}.pt written; run the same command again to resume")


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_before_training_starts_stops_at_once(tmp_path, toy_recipe, plugin_site,
                                                       signum, status):
    """While the data loads, before the loop holds signals: stopped at once, nothing left."""
    ready = tmp_path / "loading"
    toy_recipe["data"] = {"kind": "waiting", "ready": str(ready), "seconds": 600}
    run = tmp_path / "runs" / "toy"
    proc = _start(["train", str(_write(tmp_path, toy_recipe)), "--run-dir", str(run)],
                  plugin_site)
    _wait_for(ready, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert err.rstrip().endswith(f"stopped by {signal.Signals(signum).name}")
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_a_second_ctrl_c_stops_at_once_and_exits_130(tmp_path, toy_recipe, plugin_site):
    marker = tmp_path / "in-step-4"
    toy_recipe["net"] = {"kind": "kill_once", "hidden": 32, "depth": 2, "marker": str(marker),
                         "kill_at": 4, "pause": 600}  # step 4 takes ten minutes
    toy_recipe["train"].update(iterations=100, checkpoint_every=2)
    run = tmp_path / "run"
    proc = _start(["train", str(_write(tmp_path, toy_recipe)), "--run-dir", str(run)],
                  plugin_site)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)  # would finish the step: ten minutes
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.rstrip().endswith(f"stopped at once by a second signal, after step 3; the last "
                                 f"checkpoint is {run}/checkpoints/ckpt-00000002.pt")
    assert "Aborted" not in err and "Traceback" not in err
    assert load_checkpoint(RunDir(run).latest())["step"] == 2


def test_a_stop_never_cuts_a_checkpoint_write(tmp_path, monkeypatch):
    """The second Ctrl-C arriving during the write: the checkpoint and `latest` are complete
    first, then the command stops."""
    run = RunDir(tmp_path).create()
    real_save = torch.save

    def signal_midway(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", signal_midway)
    with HeldSignals(hold=1) as held:
        held.received.append(signal.SIGINT)  # the first Ctrl-C asked for a clean stop
        with pytest.raises(Stopped) as caught:
            run.save({"step": 3, "weights": torch.ones(3)}, 3, keep=2)
    assert caught.value.exit_status == 130
    assert load_checkpoint(run.latest())["step"] == 3


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_lost_in_a_finaliser_is_still_acted_on():
    """Python swallows an exception raised inside a weakref callback (or __del__), where a
    signal's handler may run: the signal stays pending, and the next check stops."""

    def signal_inside_the_callback(_ref):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs here, inside the callback
            pass

    class Thing:
        pass

    with HeldSignals(hold=0):
        thing = Thing()
        ref = weakref.ref(thing, signal_inside_the_callback)
        del thing  # the Stopped raised in the callback is printed and dropped
        assert ref() is None
        with pytest.raises(Stopped) as caught:
            raise_if_stopped()
    assert caught.value.exit_status == 143


def _torchrun(recipe, run, plugin_site, *extra: str) -> subprocess.CompletedProcess:
    """torchrun in a session of its own: on a timeout its workers go too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(plugin_site)}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            *extra, "-m", "scoretk", "train", str(recipe), "--run-dir", str(run)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_a_rank_killed_under_torchrun_restarts_from_the_last_checkpoint(tmp_path, toy_recipe,
                                                                        plugin_site):
    """Rank 1 SIGKILLs itself in step 5 (once: the marker file); torchrun restarts both ranks,
    which resume from step 4 (rank 0's lock went with its process) and finish with the
    weights, Adam state and averages of a run nobody killed."""
    marker = tmp_path / "killed"
    toy_recipe["data"]["n"] = 256
    toy_recipe["train"].update(iterations=6, checkpoint_every=2, batch_size=32)
    toy_recipe["net"] = {"kind": "kill_once", "hidden": 32, "depth": 2, "marker": str(marker),
                         "kill_at": 5, "rank": 1}
    recipe = _write(tmp_path, toy_recipe)
    out = _torchrun(recipe, tmp_path / "killed-run", plugin_site, "--max-restarts=2")
    assert out.returncode == 0 and marker.exists(), out.stderr[-3000:]
    assert "resuming at step 4" in out.stderr, out.stderr[-3000:]
    killed = load_checkpoint(RunDir(tmp_path / "killed-run").latest())
    straight = _torchrun(recipe, tmp_path / "straight-run", plugin_site)  # the marker exists: no kill
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = load_checkpoint(RunDir(tmp_path / "straight-run").latest())
    assert killed["step"] == reference["step"] == 6
    for key in ("model", "optimizer", "averager"):
        _assert_equal(killed[key], reference[key])


def _assert_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert a == b
