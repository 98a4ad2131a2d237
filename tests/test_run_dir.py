"""A run directory is scoretk's only where scoretk wrote: --restart, pruning and the resolved
recipe leave a user's files alone, the `latest` pointer stays inside the run, a second
trainer is locked out, and a resume applies changed settings and its own history."""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import types

import pytest
import torch
import yaml

from scoretk import files as files_mod
from scoretk import hookimpl
from scoretk.assemble import ComponentError
from scoretk.checkpoint import CheckpointError, RunDir, RunDirError, load_checkpoint
from scoretk.files import LockedError
from scoretk.plugins import default_registry, load_plugins
from scoretk.recipe import Recipe, RecipeError
from scoretk.registry import Params
from scoretk.training import train
from scoretk.training.run import TrainingRun

from conftest import run_cli


def _train(raw: dict, run_dir, registry=None, **kwargs):
    registry = registry or default_registry()
    return train(Recipe.from_dict(raw, registry), registry, run_dir, **kwargs)


def _small(toy_recipe, **train_settings) -> dict:
    toy_recipe["data"]["n"] = 200
    toy_recipe["train"].update({"iterations": 4, "checkpoint_every": 2, "batch_size": 32,
                                **train_settings})
    return toy_recipe


def _steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in
            (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_restart_removes_only_what_scoretk_wrote(tmp_path, toy_recipe):
    run = tmp_path / "run"
    _train(_small(toy_recipe, iterations=6), run)
    mine = {run / "notes.txt": "my notes", run / "checkpoints" / "ckpt-best.pt": "my weights",
            run / "samples" / "mine.png": "my picture"}
    for path, text in mine.items():
        path.write_text(text)
    _train(_small(toy_recipe, iterations=2), run, restart=True)
    assert all(path.read_text() == text for path, text in mine.items())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["ckpt-00000002.pt", "ckpt-best.pt"]  # the old run's ckpt-4 and ckpt-6 are gone
    assert _steps(run) == [2]


def test_a_failing_restart_keeps_the_old_run(tmp_path, toy_recipe):
    run = tmp_path / "run"
    _train(_small(toy_recipe), run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    too_big = _small(toy_recipe, batch_size=500)  # larger than the 200 items
    with pytest.raises(RecipeError, match="larger than the dataset"):
        _train(too_big, run, restart=True)
    missing = {**toy_recipe, "data": {"kind": "image_folder", "root": str(tmp_path / "none"),
                                      "image_size": 8}}
    with pytest.raises(Exception, match="none"):
        _train(missing, run, restart=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_pruning_deletes_only_numbered_checkpoints_scoretk_wrote(tmp_path, toy_recipe):
    run = RunDir(tmp_path)
    run.create()
    user = [run.checkpoints / "ckpt-best.pt", run.checkpoints / "ckpt-00000001.pt"]
    for path in user:
        path.write_text("the user's")
    best = run.save_named({"step": 0}, "best")
    for step in (2, 4, 6):
        run.save({"step": step}, step, keep=1)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == \
        ["best.pt", "ckpt-00000001.pt", "ckpt-00000006.pt", "ckpt-best.pt"]
    assert all(p.read_text() == "the user's" for p in user) and load_checkpoint(best)
    with pytest.raises(ValueError):
        run.save_named({}, "ckpt-00000009")  # a numbered name would be pruned


def test_a_users_recipe_yaml_is_never_replaced(tmp_path, toy_recipe, monkeypatch):
    """`--run-dir .` beside the user's own recipe.yaml: refused, and nothing written."""
    monkeypatch.chdir(tmp_path)
    own = "# my recipe, with comments\n" + yaml.safe_dump(toy_recipe)
    (tmp_path / "recipe.yaml").write_text(own)
    with pytest.raises(RunDirError, match="recipe.yaml: scoretk did not write this file"):
        _train(_small(toy_recipe), ".")
    assert (tmp_path / "recipe.yaml").read_text() == own
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_latest_is_followed_only_inside_the_run(tmp_path, toy_recipe):
    other, run = tmp_path / "other", tmp_path / "run"
    _train(_small(toy_recipe, iterations=2), other)
    _train(_small(toy_recipe, iterations=6, keep_checkpoints=5), run)
    for foreign in ("../../other/checkpoints/ckpt-00000002.pt",
                    str(other / "checkpoints" / "ckpt-00000002.pt"), "ckpt-best.pt"):
        (run / "latest").write_text(foreign + "\n")
        assert RunDir(run).latest() == run / "checkpoints" / "ckpt-00000006.pt"
    final = _train(_small(toy_recipe, iterations=8, keep_checkpoints=5), run)
    assert load_checkpoint(final)["step"] == 8  # resumed from its own step 6, not step 2


def _frozen_net_plugin() -> types.ModuleType:
    mod = types.ModuleType("frozen_net_plugin")

    class Frozen(torch.nn.Module):
        def forward(self, x, sigma, level):
            return -x

    @hookimpl
    def scoretk_register(registry):
        registry.add("net", "frozen_here", lambda p, shape, num_levels: Frozen(), Params, "t")

    mod.scoretk_register = scoretk_register
    return mod


def test_failed_runs_leave_no_directory_behind(tmp_path, toy_recipe, monkeypatch):
    target = tmp_path / "runs" / "new"
    with monkeypatch.context() as m:  # a failure once the directory exists, before any write
        m.setattr(TrainingRun, "begin", lambda *a: (_ for _ in ()).throw(OSError("no")))
        with pytest.raises(OSError):
            _train(_small(toy_recipe), target)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(RecipeError, match="larger than the dataset"):
        _train(_small(toy_recipe, batch_size=500), target)
    registry = load_plugins(extra=[_frozen_net_plugin()]).registry
    frozen = {**_small(toy_recipe), "net": {"kind": "frozen_here"}}
    with pytest.raises(RecipeError, match="net: 'frozen_here' has no trainable parameters: "
                                          "there is nothing to train"):
        _train(frozen, target, registry)
    assert not (tmp_path / "runs").exists()


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path, toy_recipe):
    run = tmp_path / "run"
    _train(_small(toy_recipe), run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from scoretk.files import FileLock; "
         f"FileLock({str(RunDir(run).lock_file)!r}, 'x').acquire(); print('held', flush=True); "
         "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"^{run}: in use by another process \(PID "
                                              rf"{holder.pid} on .*\); wait for it"):
            _train(_small(toy_recipe, iterations=6), run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert load_checkpoint(_train(_small(toy_recipe, iterations=6), run))["step"] == 6  # freed


def test_stale_temporary_files_of_the_run_are_removed(tmp_path, toy_recipe):
    run = tmp_path / "run"
    _train(_small(toy_recipe), run)
    stale = [run / "checkpoints" / ".ckpt-00000004.pt.k2j4x9a1.tmp", run / ".latest.p0q8z7y6.tmp"]
    users = run / ".notes.txt.a1b2c3d4.tmp"
    for path in [*stale, users]:
        path.write_text("left by a crash")
    _train(_small(toy_recipe, iterations=6), run)
    assert not any(p.exists() for p in stale) and users.exists()


def test_resume_applies_and_reports_changed_settings(tmp_path, toy_recipe, capsys):
    run = tmp_path / "run"
    _train(_small(toy_recipe), run)
    changed = _small(toy_recipe, iterations=6)
    changed["optim"]["lr"] = 3e-3
    final = load_checkpoint(_train(changed, run))
    assert "resuming with changed settings: optim.lr 0.001 -> 0.003, train.iterations 4 -> 6" \
        in capsys.readouterr().err
    assert final["optimizer"]["param_groups"][0]["lr"] == 3e-3  # Adam trained with the new lr
    assert final["recipe"]["optim"]["lr"] == 3e-3


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path, toy_recipe):
    run = tmp_path / "run"
    _train(_small(toy_recipe, iterations=8, checkpoint_every=4, log_every=2), run)
    (run / "checkpoints" / "ckpt-00000008.pt").unlink()  # as if killed after step 8's log
    (run / "latest").write_text("ckpt-00000004.pt\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # and a torn line
    _train(_small(toy_recipe, iterations=8, checkpoint_every=4, log_every=2), run)
    assert _steps(run) == [2, 4, 6, 8]


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(tmp_path, toy_recipe,
                                                                       capsys):
    run = tmp_path / "run"
    _train(_small(toy_recipe), run)
    latest = run / "checkpoints" / "ckpt-00000004.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    final = _train(_small(toy_recipe, iterations=6), run)
    err = capsys.readouterr().err
    assert "warning:" in err and "ckpt-00000004.pt: not a readable checkpoint" in err
    assert "resuming from" in err and "ckpt-00000002.pt" in err
    assert "resuming at step 2" in err and load_checkpoint(final)["step"] == 6


def _failing_open(after_bytes: int, err: int):
    """open() whose files, opened for writing, fail once `after_bytes` are written."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) > after_bytes:
                raise OSError(err, os.strerror(err))
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    return lambda path, mode="r", *a, **k: (Full(real_open(path, mode, *a, **k))
                                            if "w" in mode else real_open(path, mode, *a, **k))


def test_disk_full_while_writing_a_checkpoint_is_one_line(tmp_path, toy_recipe, monkeypatch):
    run = tmp_path / "run"
    _train(_small(toy_recipe), run)
    good = run / "checkpoints" / "ckpt-00000004.pt"
    before = good.read_bytes()
    monkeypatch.setattr(files_mod, "open", _failing_open(4000, errno.ENOSPC), raising=False)
    with pytest.raises(CheckpointError) as caught:
        _train(_small(toy_recipe, iterations=6), run)
    monkeypatch.undo()
    assert str(caught.value).startswith(f"{run / 'checkpoints' / 'ckpt-00000006.pt'}: cannot "
                                        "write the checkpoint: No space left on device")
    assert RunDir(run).latest() == good and good.read_bytes() == before
    assert not list(run.rglob("*.tmp")) and not (run / "checkpoints" / "ckpt-00000006.pt").exists()


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_too_large_from_the_command_line_is_one_line(tmp_path, toy_recipe, write_recipe):
    """A real EFBIG (RLIMIT_FSIZE below a checkpoint's size): exit 2, one line naming the
    file, the previous checkpoint intact."""
    run = tmp_path / "run"
    _train(_small(toy_recipe), run)
    recipe = write_recipe(_small(toy_recipe, iterations=6))
    out = subprocess.run([sys.executable, "-m", "scoretk", "train", str(recipe), "--run-dir",
                          str(run)], capture_output=True, text=True, timeout=300,
                         preexec_fn=_limit_file_size(8192))
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "ckpt-00000006.pt: cannot write the checkpoint: File too large" in errors[0]
    assert load_checkpoint(RunDir(run).latest())["step"] == 4


def _unprivileged(cmd: list[str]) -> list[str]:
    """Run `cmd` without root's power to ignore file permissions (tests may run as root)."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *cmd]


def test_read_only_runs_are_one_line_for_training_and_fine_for_sampling(tmp_path, toy_recipe,
                                                                        write_recipe):
    run = tmp_path / "run"
    _train(_small(toy_recipe), run)
    recipe = write_recipe(_small(toy_recipe, iterations=6))
    modes = {p: p.stat().st_mode for p in [run, *run.rglob("*")]}
    for path in modes:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        scoretk = [sys.executable, "-m", "scoretk"]
        out = subprocess.run(_unprivileged([*scoretk, "train", str(recipe), "--run-dir",
                                            str(run)]), capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert [line for line in out.stderr.splitlines() if line.startswith("error:")] == \
            [f"error: {run}: cannot write to the run directory (Permission denied)"]
        samples = tmp_path / "s.h5"
        out = subprocess.run(_unprivileged([*scoretk, "sample", "--run", str(run), "--out",
                                            str(samples), "-n", "4", "--device", "cpu"]),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and samples.exists(), out.stderr
        run.chmod(0o000)
        out = subprocess.run(_unprivileged([*scoretk, "sample", "--run", str(run), "--out",
                                            str(tmp_path / "t.h5"), "-n", "4"]),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip() == f"error: {run / 'checkpoints'}: Permission denied"
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_nothing_to_train_is_one_line_from_the_command_line(plugin_site, toy_recipe,
                                                            write_recipe, tmp_path):
    recipe = write_recipe({**_small(toy_recipe), "net": {"kind": "frozen"}})
    out = run_cli("train", str(recipe), "--run-dir", str(tmp_path / "run"),
                  env={"PYTHONPATH": str(plugin_site)})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("error")] == \
        ["error: recipe 'toy': net: 'frozen' has no trainable parameters: there is nothing "
         "to train; sample it from its recipe: scoretk sample --recipe RECIPE --out F.h5"]
    assert not (tmp_path / "run").exists()


def test_data_beyond_memory_is_refused_before_anything_is_written(tmp_path, toy_recipe):
    toy_recipe["data"]["n"] = 10**13
    with pytest.raises(ComponentError, match=r"data \('toy2d' from plugin 'datasets'\): "
                                             r"n=10,000,000,000,000 points need about"):
        _train(toy_recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()
