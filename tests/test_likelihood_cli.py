"""`scoretk likelihood`: bits per dimension through the command line, against the exact
log-density of the example plugin's Gaussian score (isotropic, so Hutchinson's estimate
v^T M v equals tr M for every Rademacher v: what is left is the solver's error and the
N(0, sigma_max^2 I) prior standing in for p_sigma_max, under 0.005 nats here)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from scoretk.evaluation.likelihood import dequantise
from scoretk.plugins import default_registry
from scoretk.rng import PerSampleNoise

from conftest import assert_one_line_error
from test_sample_cli import IMG, TOY, make_checkpoint
from test_sample_control import DIGITS, EXACT, cli, ok, write

pytestmark = pytest.mark.usefixtures("one_thread", "with_plugin_site")


def exact_bits(x: torch.Tensor, std: float, sigma_min: float, bins: int | None) -> float:
    """Mean bits per dimension of x under N(0, (std^2 + sigma_min^2) I), the exact score's
    density at sigma_min."""
    var = std**2 + sigma_min**2
    log_p = torch.distributions.Normal(0.0, math.sqrt(var)).log_prob(x.double()).flatten(1).sum(1)
    dim = x[0].numel()
    return float(((-log_p / dim + (math.log(bins) if bins else 0.0)) / math.log(2)).mean())


def likelihood(*args) -> dict:
    return json.loads(ok("likelihood", *args, "--json").stdout)


def test_vectors_match_the_exact_density(tmp_path):
    """Toy points near the origin (the prior's stand-in is then exact to 0.001 nats); the
    items are a fixed permutation by the seed of all the data (toy2d has no split)."""
    data = {"kind": "toy2d", "n": 300, "means": [[0.0, 0.0], [0.5, 0.5]], "std": 0.5}
    recipe = write(tmp_path, {**EXACT, "data": data})
    res = likelihood("--recipe", recipe, "-n", "100", "--seed", "4", "--batch-size", "40")
    points = default_registry().build("dataset", data).batch(torch.arange(300))
    picked = points[torch.randperm(300, generator=torch.Generator().manual_seed(4))[:100]]
    assert res["bits_per_dim"] == pytest.approx(exact_bits(picked, 0.5, 0.01, None), abs=0.005)
    assert res["items"] == 100 and res["solver"] == "adaptive" and not res["dequantised"]
    assert res["weights"] == "no" and 10 < res["evaluations_per_item"] < 500


def test_digits_use_the_held_out_split_and_dequantise(tmp_path):
    """-n beyond the 359 held-out digits takes them all; each is dequantised by (seed, i)."""
    recipe = write(tmp_path, {**DIGITS, "net": {"kind": "gaussian", "mean": 0.0, "std": 0.5}})
    res = likelihood("--recipe", recipe, "-n", "1000", "--batch-size", "400")
    held = default_registry().build("dataset", {"kind": "digits", "split": "test"})
    order = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))
    x = dequantise(held.batch(order), PerSampleNoise(0, range(len(held))))
    assert res["items"] == 359 and res["asked"] == 1000 and res["dequantised"]
    assert res["data"] == "digits, held-out split"
    assert res["bits_per_dim"] == pytest.approx(exact_bits(x, 0.5, 0.01, 256), abs=0.005)


def test_a_checkpoint_table_and_fixed_steps(tmp_path):
    """A trained-style checkpoint (averaged weights by default), Heun steps through the
    schedule: 2 (L - 1) evaluations per item, whatever the batch size."""
    ckpt = make_checkpoint(tmp_path / "toy.pt", TOY, (2,))
    result = ok("likelihood", "--checkpoint", ckpt, "-n", "20", "--solver", "heun",
                "--batch-size", "7")
    for needle in ("toy.pt, step 1, averaged weights", "20 items of toy2d",
                   "bits per dimension", "network evaluations per item           4.0"):
        assert needle in result.output, result.output
    a = likelihood("--checkpoint", ckpt, "-n", "20", "--solver", "heun", "--batch-size", "7")
    b = likelihood("--checkpoint", ckpt, "-n", "20", "--solver", "heun", "--batch-size", "20")
    assert a["bits_per_dim"] == pytest.approx(b["bits_per_dim"], abs=1e-5)
    raw = likelihood("--checkpoint", ckpt, "-n", "20", "--solver", "heun", "--raw-weights")
    assert raw["weights"] == "raw" and raw["bits_per_dim"] != a["bits_per_dim"]


def test_errors_are_one_line(tmp_path, monkeypatch):
    v1 = make_checkpoint(tmp_path / "v1.pt", {**IMG, "net": {"kind": "ncsn", "ngf": 4}},
                         (1, 8, 8))
    recipe = write(tmp_path, EXACT)
    monkeypatch.chdir(tmp_path)  # no runs/ here
    for args, needle in (
            (["-n", "0", "--recipe", recipe], "-n/--num-samples must be positive"),
            (["--batch-size", "-1", "--recipe", recipe], "--batch-size must be positive"),
            (["--tolerance", "0", "--recipe", recipe], "--tolerance must be positive"),
            (["--recipe", recipe, "--checkpoint", v1], "give one of"),
            (["--recipe", recipe, "--best"], "--best picks a run's checkpoints/best.pt"),
            ([], "no checkpoint"),
            (["--checkpoint", v1, "--solver", "adaptive"], "knows only its noise levels"),
            (["--recipe", write(tmp_path, {**EXACT, "net": {"kind": "mlp"}}, "mlp.yaml")],
             "trainable parameters")):
        assert_one_line_error(cli("likelihood", *args), needle)
    res = likelihood("--checkpoint", v1, "-n", "4")  # auto: Heun for a level-only net
    assert res["solver"] == "heun" and res["evaluations_per_item"] == 2 * 2


def test_a_solver_giving_up_is_one_line_and_status_1(tmp_path, monkeypatch):
    import scoretk.evaluation.bits_per_dim as bits_per_dim
    from scoretk.score import SolverError

    def give_up(*args, **kwargs):
        raise SolverError("the adaptive ODE solver failed (underflow in dt); try the fixed-step "
                          "solver\nsecond line")

    monkeypatch.setattr(bits_per_dim, "log_likelihood", give_up)
    result = cli("likelihood", "--recipe", write(tmp_path, EXACT), "-n", "4")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: the adaptive ODE solver failed (underflow in dt); try the "
                      "fixed-step solver"] and "Traceback" not in result.stderr
