"""The training engine: exact resume, crash-safe checkpoints, NaN stop, signals, torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
import yaml

from scoretk import checkpoint as ckpt_mod
from scoretk import hookimpl
from scoretk.execution.batch_threads import BatchThreads
from scoretk.checkpoint import RunDir, load_checkpoint
from scoretk.plugins import default_registry, load_plugins
from scoretk.recipe import Recipe
from scoretk.registry import Params
from scoretk.training import StepBatches, TrainingError, train

from conftest import run_cli


def _recipe(raw: dict, registry=None) -> Recipe:
    return Recipe.from_dict(raw, registry or default_registry())


def _tensors(state) -> list[torch.Tensor]:
    """All tensors of a (nested) state dict, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in _tensors(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


def _assert_identical(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert len(ta) == len(tb) and ta
    for x, y in zip(ta, tb):
        assert torch.equal(x, y)


def _first_step(run_dir) -> tuple[float, list[torch.Tensor]]:
    """(loss, gradients) of a run's first step, read from what the run wrote: metrics.jsonl
    (log_every 1) and Adam's first moment, which after one step is (1 - beta1) * gradient.

    Speed options must preserve these. Comparing weights after several Adam steps would not
    do: Adam turns last-bit gradient differences on near-zero entries into opposite updates,
    which differ by CPU (AVX2 against AVX-512 summation order)."""
    state = load_checkpoint(RunDir(run_dir).latest())
    assert state["step"] == 1
    beta1 = state["optimizer"]["param_groups"][0]["betas"][0]
    moments = state["optimizer"]["state"]
    grads = [moments[i]["exp_avg"] / (1 - beta1) for i in sorted(moments)]
    record = json.loads((RunDir(run_dir).metrics).read_text().splitlines()[0])
    return record["loss"], grads


def _assert_same_step(a, b, rtol: float = 1e-4) -> None:
    """Loss to float32 rounding; each gradient tensor to `rtol` in norm. Float32 sums in
    another order differ by a few ulps per term (~1e-7 relative), far inside 1e-4 even when
    terms cancel; a wrong gradient is off by O(1)."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert len(grads_a) == len(grads_b) and grads_a
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        err = float((ga.double() - gb.double()).norm() / ga.double().norm().clamp(min=1e-12))
        assert err < rtol, f"gradient {i}: relative error {err:.2e}"


def test_resume_reproduces_the_uninterrupted_run(tmp_path, toy_recipe):
    toy_recipe["data"]["n"] = 500
    toy_recipe["train"].update(iterations=20, checkpoint_every=5, batch_size=32)
    straight = load_checkpoint(train(_recipe(toy_recipe), default_registry(), tmp_path / "a"))

    half = {**toy_recipe, "train": {**toy_recipe["train"], "iterations": 10}}
    train(_recipe(half), default_registry(), tmp_path / "b")
    assert load_checkpoint(RunDir(tmp_path / "b").latest())["step"] == 10
    resumed = load_checkpoint(train(_recipe(toy_recipe), default_registry(), tmp_path / "b"))

    assert straight["step"] == resumed["step"] == 20
    for key in ("model", "optimizer", "averager"):
        _assert_identical(straight[key], resumed[key])
    # and the run actually moved: weights after 20 steps differ from after 10
    ten = load_checkpoint(tmp_path / "b" / "checkpoints" / "ckpt-00000010.pt")
    assert not torch.equal(_tensors(ten["model"])[0], _tensors(resumed["model"])[0])


def test_changed_model_recipe_refuses_to_resume(tmp_path, toy_recipe):
    toy_recipe["train"].update(iterations=2, checkpoint_every=1)
    train(_recipe(toy_recipe), default_registry(), tmp_path)
    toy_recipe["net"]["hidden"] = 16
    from scoretk.recipe import RecipeError
    with pytest.raises(RecipeError, match="--restart"):
        train(_recipe(toy_recipe), default_registry(), tmp_path)
    train(_recipe(toy_recipe), default_registry(), tmp_path, restart=True)  # and --restart works


def test_keeps_last_k_and_latest_points_at_newest(tmp_path, toy_recipe):
    toy_recipe["train"].update(iterations=12, checkpoint_every=2, keep_checkpoints=2)
    final = train(_recipe(toy_recipe), default_registry(), tmp_path)
    run = RunDir(tmp_path)
    assert sorted(p.name for p in run.checkpoints.glob("ckpt-*.pt")) == \
        ["ckpt-00000010.pt", "ckpt-00000012.pt"]
    assert run.latest() == final
    assert (tmp_path / "recipe.yaml").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    import json
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [5, 10, 12]
    assert all(r["items_per_s"] > 0 and "level_loss" in r and r["grad_norm"] > 0 for r in records)


def test_interrupted_checkpoint_write_leaves_previous_loadable(tmp_path, toy_recipe, monkeypatch):
    toy_recipe["train"].update(iterations=4, checkpoint_every=2)
    train(_recipe(toy_recipe), default_registry(), tmp_path)
    run = RunDir(tmp_path)
    good = run.latest()
    before = good.read_bytes()

    real_save = torch.save

    def crash_midway(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)  # half the bytes are on disk ...
        raise KeyboardInterrupt  # ... when the process is interrupted

    monkeypatch.setattr(ckpt_mod.torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        run.save({"model": {}}, 6, keep=3)
    monkeypatch.undo()
    assert run.latest() == good and good.read_bytes() == before
    assert load_checkpoint(good)["step"] == 4
    assert not list(run.checkpoints.glob("*.tmp")) and not (run.checkpoints / "ckpt-00000006.pt").exists()


def test_latest_survives_a_lost_pointer(tmp_path, toy_recipe):
    toy_recipe["train"].update(iterations=4, checkpoint_every=2)
    train(_recipe(toy_recipe), default_registry(), tmp_path)
    run = RunDir(tmp_path)
    run.latest_pointer.unlink()  # crash between checkpoint rename and pointer rename
    assert run.latest().name == "ckpt-00000004.pt"


def _nan_plugin(after: int) -> types.ModuleType:
    mod = types.ModuleType("nan_loss_plugin")

    class NaNAfter:
        def __init__(self, params):
            self.calls = 0

        def __call__(self, net, x, schedule, generator=None):
            self.calls += 1
            out = net(x, schedule.sigmas[:1].expand(x.shape[0]),
                      torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
            loss = out.square().mean()
            return (loss * float("nan") if self.calls > after else loss), {}

    @hookimpl
    def scoretk_register(registry):
        registry.add("loss", "nan_after_3", NaNAfter, Params, "test loss")

    mod.scoretk_register = scoretk_register
    return mod


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, toy_recipe):
    registry = load_plugins(extra=[_nan_plugin(after=3)]).registry
    toy_recipe["loss"] = {"kind": "nan_after_3"}
    toy_recipe["train"].update(iterations=10, checkpoint_every=2, log_every=100)
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step 4.*ckpt-00000002"):
        train(_recipe(toy_recipe, registry), registry, tmp_path)
    run = RunDir(tmp_path)
    state = load_checkpoint(run.latest())
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in _tensors(state["model"]))


def test_step_batches_are_a_function_of_the_step():
    a, b = StepBatches(100, 32, seed=1), StepBatches(100, 32, seed=1)
    assert torch.equal(a(7), b(7)) and torch.equal(a(0), b(0))  # order of calls does not matter
    epoch0 = torch.cat([a(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 96  # no repeats inside an epoch
    r0, r1 = StepBatches(100, 32, 1, rank=0, world=2), StepBatches(100, 32, 1, rank=1, world=2)
    assert torch.equal(torch.cat([r0(5), r1(5)]), a(5))


def test_missing_data_is_one_clear_line(tmp_path):
    out = run_cli("train", "recipes/ncsnv2_cifar10.yaml", "-o", f"data.root={tmp_path}/nowhere",
                  "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nowhere" in lines[0] and "data.root" in lines[0], out.stderr


def test_sigint_writes_a_final_checkpoint(tmp_path, toy_recipe):
    toy_recipe["train"].update(iterations=100000, checkpoint_every=100000, log_every=5)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(toy_recipe))
    proc = subprocess.Popen([sys.executable, "-m", "scoretk", "train", str(path), "--run-dir",
                             str(tmp_path / "run")], stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    state = load_checkpoint(RunDir(tmp_path / "run").latest())
    assert state["step"] >= 10 and f"interrupted at step {state['step']}" in err


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path, toy_recipe):
    toy_recipe["train"].update(iterations=6, checkpoint_every=3, batch_size=32)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(toy_recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "scoretk", "train", str(path),
                          "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    state = load_checkpoint(RunDir(tmp_path / "run").latest())  # loads in a single process
    assert state["step"] == 6
    reg = default_registry()
    recipe = Recipe.from_dict(state["recipe"], reg)
    from scoretk import assemble
    net = assemble.build_model(recipe, reg, tuple(state["shape"])).net
    net.load_state_dict(state["model"])
    assert out.stderr.count("scoretk train:") == 1  # only rank 0 talks
    assert "device cpu on each of 2 processes (this is rank 0)" in out.stderr


def test_torchrun_with_the_batch_split_matches_the_unsplit_run(tmp_path, toy_recipe):
    """DDP wraps the split net: its gradient hooks see the summed chunk gradients, so the
    first step's loss and gradients are the unsplit run's."""
    toy_recipe["train"].update(iterations=1, checkpoint_every=1, log_every=1, batch_size=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = []
    for threads in (1, 2):
        toy_recipe["train"]["batch_threads"] = threads
        path = tmp_path / f"r{threads}.yaml"
        path.write_text(yaml.safe_dump(toy_recipe))
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", "-m", "scoretk", "train", str(path),
                              "--run-dir", str(tmp_path / f"run{threads}")],
                             capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert ("batch split across 2 CPU threads" in out.stderr) == (threads == 2)
        steps.append(_first_step(tmp_path / f"run{threads}"))
    _assert_same_step(*steps)


def test_sample_grids_use_the_averaged_weights_every_n_steps(tmp_path, toy_recipe, monkeypatch):
    raw = {**toy_recipe,
           "data": {"kind": "digits", "size": 8},
           "schedule": {"kind": "geometric", "sigma_max": 3.0, "sigma_min": 0.3, "num_levels": 3},
           "net": {"kind": "convnet", "channels": 8, "blocks": 1},
           "sampler": {"kind": "annealed_langevin", "steps_per_level": 1, "eps": 1e-3},
           "averager": {"kind": "ema", "rate": 0.5}}
    raw["train"] = {**raw["train"], "iterations": 4, "sample_every": 2, "grid_size": 4,
                    "batch_size": 16}
    from scoretk_plugins.averagers import EMA
    swapped = []
    real = EMA.averaged

    def spy(self, model):
        swapped.append(True)
        return real(self, model)

    monkeypatch.setattr(EMA, "averaged", spy)
    train(_recipe(raw), default_registry(), tmp_path)
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == ["step-00000002.png", "step-00000004.png"]
    assert len(swapped) == 2
    from PIL import Image
    assert Image.open(tmp_path / "samples" / grids[0]).size[0] > 8  # a grid, not one image


def test_loader_workers_feed_the_same_batches(tmp_path, toy_recipe):
    toy_recipe["data"]["n"] = 300
    toy_recipe["train"].update(iterations=6, checkpoint_every=6, batch_size=32)
    inline = load_checkpoint(train(_recipe(toy_recipe), default_registry(), tmp_path / "a"))
    toy_recipe["train"]["num_workers"] = 1
    workers = load_checkpoint(train(_recipe(toy_recipe), default_registry(), tmp_path / "b"))
    _assert_identical(inline["model"], workers["model"])


def test_channels_last_training_follows_the_nchw_run(tmp_path, toy_recipe):
    """`train.channels_last` only changes the memory layout: an NCSNv2 step has the NCHW
    step's loss and gradients, up to float rounding (and the checkpoint loads either way)."""
    raw = {**toy_recipe,
           "data": {"kind": "digits", "size": 8},
           "schedule": {"kind": "geometric", "sigma_max": 3.0, "sigma_min": 0.3, "num_levels": 4},
           "net": {"kind": "ncsnv2", "ngf": 4},
           "optim": {"lr": 1e-3}}
    raw["train"] = {**raw["train"], "iterations": 1, "checkpoint_every": 1, "log_every": 1,
                    "batch_size": 8}
    plain = load_checkpoint(train(_recipe(raw), default_registry(), tmp_path / "a"))
    raw["train"]["channels_last"] = True
    fast = load_checkpoint(train(_recipe(raw), default_registry(), tmp_path / "b"))
    convs = [k for k, v in fast["model"].items()  # (1x1 or 1-channel kernels are both formats)
             if v.dim() == 4 and v.shape[1] > 1 and v.shape[-1] > 1]
    assert convs and all(fast["model"][k].is_contiguous(memory_format=torch.channels_last)
                         and not plain["model"][k].is_contiguous(memory_format=torch.channels_last)
                         for k in convs)  # the option took effect
    _assert_same_step(_first_step(tmp_path / "a"), _first_step(tmp_path / "b"))


def test_tensorboard_gets_the_logged_scalars_when_installed(tmp_path, toy_recipe, monkeypatch):
    """tensorboard is optional: when `torch.utils.tensorboard` imports, the run writes the
    same scalars as metrics.jsonl into <run>/tensorboard (a stand-in writer records them)."""
    written, closed = [], []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step, self.log_dir))

        def close(self):
            closed.append(True)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeWriter))
    toy_recipe["train"].update(iterations=10, log_every=5, checkpoint_every=10)
    train(_recipe(toy_recipe), default_registry(), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    for tag in ("train/loss", "train/grad_norm", "train/items_per_s"):
        logged = [(v, s) for t, v, s, _ in written if t == tag]
        key = tag.removeprefix("train/")
        assert logged == [(r[key], r["step"]) for r in records]
    assert all(d == str(tmp_path / "tensorboard") for *_, d in written) and closed == [True]


def test_bf16_off_cuda_says_it_trains_in_float32(tmp_path, toy_recipe, capsys):
    """bf16 autocast is a CUDA option; elsewhere the run goes on in float32 and says so."""
    toy_recipe["train"].update(iterations=2, bf16=True)
    train(_recipe(toy_recipe), default_registry(), tmp_path / "run")
    assert "train.bf16 applies on CUDA only; training in float32 on cpu" in capsys.readouterr().err


def test_batch_threads_training_follows_the_unsplit_run(tmp_path, toy_recipe, capsys):
    """`train.batch_threads` splits each batch across CPU threads: an NCSNv2 step has the
    unsplit step's loss and gradients, up to float rounding."""
    raw = {**toy_recipe,
           "data": {"kind": "digits", "size": 8},
           "schedule": {"kind": "geometric", "sigma_max": 3.0, "sigma_min": 0.3, "num_levels": 4},
           "net": {"kind": "ncsnv2", "ngf": 4},
           "optim": {"lr": 1e-3}}
    raw["train"] = {**raw["train"], "iterations": 1, "checkpoint_every": 1, "log_every": 1,
                    "batch_size": 8, "batch_threads": 1}
    train(_recipe(raw), default_registry(), tmp_path / "a")
    assert "batch split" not in capsys.readouterr().err
    raw["train"]["batch_threads"] = 3
    train(_recipe(raw), default_registry(), tmp_path / "b")
    assert "batch split across 3 CPU threads" in capsys.readouterr().err
    _assert_same_step(_first_step(tmp_path / "a"), _first_step(tmp_path / "b"))


def test_compiled_nets_are_not_split_and_an_explicit_split_says_so(tmp_path, toy_recipe, capsys,
                                                                   monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)  # no inductor here
    toy_recipe["train"].update(iterations=1, compile=True, batch_threads=2)
    train(_recipe(toy_recipe), default_registry(), tmp_path / "run")
    err = capsys.readouterr().err
    assert "train.batch_threads does not apply to compiled nets" in err
    assert "batch split" not in err and len(compiled) == 1
    assert not isinstance(compiled[0], BatchThreads)
