"""`scoretk sample` beyond a checkpoint's plain samples: a recipe alone for an exact score
(the example plugin's `gaussian` net, which has nothing to train), inpainting, colourisation
and interpolation, the evaluations an adaptive solver really made, and samplers that refuse
the net. The exact Gaussian score makes the checks closed forms: no training anywhere.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from scoretk.cli import main

from conftest import assert_one_line_error, interrupt_sampling_at
from test_sample_cli import IMG, TOY, attrs, make_checkpoint, rows

pytestmark = pytest.mark.usefixtures("one_thread", "with_plugin_site")

EXACT = {"name": "exact", "data": {"kind": "toy2d", "n": 500},
         "schedule": {"kind": "geometric", "sigma_max": 10.0, "sigma_min": 0.01,
                      "num_levels": 30},
         "net": {"kind": "gaussian", "mean": 0.0, "std": 0.5}, "loss": {"kind": "dsm"},
         "sampler": {"kind": "consistent_annealed"}, "averager": {"kind": "none"},
         "train": {"iterations": 1}, "sample": {"num_samples": 24, "batch_size": 8, "seed": 3}}
DIGITS = {**EXACT, "name": "exact_digits", "data": {"kind": "digits"},
          "net": {"kind": "gaussian", "mean": 0.5, "std": 0.1}}
KINDS = ["annealed_langevin", "consistent_annealed", "pc", "heun", "probability_flow"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, result.output + result.stderr
    return result


def write(tmp_path: Path, raw: dict, name: str = "exact.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def control(path: Path) -> dict:
    return json.loads(attrs(path)["control"])


def floats(path: Path) -> np.ndarray:
    return rows(path, "samples_float")


# --- a recipe alone -----------------------------------------------------------------------------

def test_a_net_without_parameters_samples_from_its_recipe(tmp_path):
    """N(0, 0.5^2 I) by the deterministic ODE from N(0, 10^2 I): the flow maps the start
    onto N(0, 0.5^2 10^2 / (10^2 + 0.5^2) I) (std 0.4994, and Tweedie's last step takes off
    1e-4 more). 2000 x 2 values: the std's standard error is 0.006; the grid's error is
    smaller."""
    recipe, out = write(tmp_path, EXACT), tmp_path / "s.h5"
    ok("sample", "--recipe", recipe, "--out", out, "-n", "2000", "--batch-size", "500",
       "-o", "sampler.kind=heun")
    x, a = rows(out), attrs(out)
    assert x.shape == (2000, 2)
    assert np.abs(x.mean(0)).max() < 0.04 and np.abs(x.std(0) - 0.4994).max() < 0.03
    assert a["checkpoint"] == "none" and a["recipe_file"] == str(recipe.resolve())
    assert "checkpoint_sha256" not in a
    assert json.loads(a["recipe"])["net"] == {"kind": "gaussian", "mean": 0.0, "std": 0.5}
    assert a["network_evaluations"] == 2000 * (2 * 29 + 1)


def test_a_recipe_file_resumes_and_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    recipe, ref, out = write(tmp_path, EXACT), tmp_path / "ref.h5", tmp_path / "out.h5"
    ok("sample", "--recipe", recipe, "--out", ref)
    restore = interrupt_sampling_at(monkeypatch, 2)
    assert cli("sample", "--recipe", recipe, "--out", out).exit_code != 0
    restore()
    assert attrs(out)["num_written"] == 8
    assert "16 new" in ok("sample", "--out", out, "--resume", "--batch-size", "5").output
    np.testing.assert_array_equal(rows(out), rows(ref))
    assert attrs(out)["network_evaluations"] == attrs(ref)["network_evaluations"] == 24 * 30


def test_a_net_with_parameters_needs_its_checkpoint(tmp_path):
    out = tmp_path / "keep.h5"
    out.write_bytes(b"precious")
    recipe = write(tmp_path, {**EXACT, "net": {"kind": "mlp", "hidden": 8}})
    assert_one_line_error(cli("sample", "--recipe", recipe, "--out", out, "--force"),
                          "net: 'mlp' has", "trainable parameters", "--checkpoint")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("args,needle", [
    (["--checkpoint", "c.pt"], "give one of --checkpoint, --run and --recipe"),
    (["--raw-weights"], "--raw-weights"),
    (["-o", "net.nonsense=1"], "net.nonsense"),
])
def test_recipe_option_errors(tmp_path, args, needle):
    out = tmp_path / "keep.h5"
    out.write_bytes(b"precious")
    result = cli("sample", "--recipe", write(tmp_path, EXACT), "--out", out, "--force", *args)
    assert_one_line_error(result, needle)
    assert out.read_bytes() == b"precious"


def test_resume_keeps_to_the_model_the_file_was_started_with(tmp_path):
    recipe, ckpt = write(tmp_path, EXACT), make_checkpoint(tmp_path / "t.pt", TOY, (2,))
    exact, trained = tmp_path / "exact.h5", tmp_path / "trained.h5"
    ok("sample", "--recipe", recipe, "--out", exact, "-n", "8")
    ok("sample", "--checkpoint", ckpt, "--out", trained, "-n", "8")
    for path in (exact, trained):
        with h5py.File(path, "a") as f:
            f.attrs["complete"], f.attrs["num_written"] = False, 0
    for path, args, needle in (
            (exact, ["--checkpoint", ckpt], "sampled from its recipe alone"),
            (trained, ["--recipe", recipe], "resume it without --recipe"),
            (exact, ["--recipe", write(tmp_path, {**EXACT, "net": {"kind": "gaussian"}},
                                       "other.yaml")], "recipe.net.std")):
        before = path.read_bytes()
        assert_one_line_error(cli("sample", "--out", path, "--resume", *args), "cannot resume",
                              needle)
        assert path.read_bytes() == before


# --- the evaluations made ------------------------------------------------------------------------

def test_the_adaptive_solver_records_the_evaluations_it_made(tmp_path):
    """The budget is 2000 per sample (max_evaluations); the file records what each batch
    cost, which the summary line reports per sample."""
    out = tmp_path / "a.h5"
    result = ok("sample", "--recipe", write(tmp_path, EXACT), "--out", out, "-n", "12",
                "--batch-size", "6", "-o", "sampler={kind: probability_flow, solver: adaptive}")
    a = attrs(out)
    assert json.loads(a["sampler_settings"])["evaluations_per_sample"] == 2000
    per_sample = a["network_evaluations"] / 12
    assert 10 < per_sample < 500
    assert f"{per_sample:.1f} evaluations per sample" in result.output


def test_a_solver_giving_up_is_one_line_and_status_1(tmp_path):
    out = tmp_path / "a.h5"
    recipe = write(tmp_path, EXACT)
    flow = ["-o", "sampler={kind: probability_flow, solver: adaptive, max_evaluations: 5}"]
    result = cli("sample", "--recipe", recipe, "--out", out, "-n", "4", *flow)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    errors = result.stderr.strip().splitlines()
    assert errors[-1].startswith("error: the solver needed more than 5 network evaluations")
    assert sum(line.startswith("error:") for line in errors) == 1


def test_progress_counts_the_evaluations_the_batches_report():
    from scoretk.generation.sample import _Progress

    bar = _Progress(False, total=10, initial=2, evals_per_sample=2000)
    assert bar.evaluations() == 0
    bar.start_batch(4)
    bar.within_batch(30, 2000)
    assert bar.evaluations() == 4 * 30
    bar.advance(6, (4, 37))
    assert bar.evaluations() == 4 * 37  # not 4 x the budget of 2000
    bar.advance(10, None)  # another process's batch: counted at this one's mean
    assert bar.evaluations() == 8 * 37


# --- samplers that refuse the net ----------------------------------------------------------------

def test_a_sampler_refusing_the_net_is_one_line_before_the_file(tmp_path):
    """NCSN v1 knows only its levels: rho spacing evaluates others. Neither a new file
    (--force over another one) nor a resumed one is touched."""
    ckpt = make_checkpoint(tmp_path / "v1.pt", {**IMG, "net": {"kind": "ncsn", "ngf": 4}},
                           (1, 8, 8))
    out = tmp_path / "keep.h5"
    ok("sample", "--checkpoint", ckpt, "--out", out, "-n", "4")
    with h5py.File(out, "a") as f:
        f.attrs["complete"], f.attrs["num_written"] = False, 0
    before = out.read_bytes()
    rho = ["-o", "sampler={kind: heun, spacing: rho}"]
    for extra in (["--force"], ["--resume"]):
        result = cli("sample", "--checkpoint", ckpt, "--out", out, *extra, *rho)
        assert_one_line_error(result, "v1.pt: sampler:", "spacing: rho", "accepts_any_sigma")
        assert out.read_bytes() == before


# --- inpainting ------------------------------------------------------------------------------------

@pytest.fixture
def half_mask(tmp_path) -> Path:
    """8x8, the right half white: generated; the left half black: known."""
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    Image.fromarray(mask).save(tmp_path / "half.png")
    return tmp_path / "half.png"


def heldout_digits(n: int) -> np.ndarray:
    from scoretk.plugins import default_registry

    return default_registry().build("dataset", {"kind": "digits", "split": "test"}).batch(
        torch.arange(n)).numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_inpainting_through_every_sampler(tmp_path, half_mask, kind):
    """Known pixels exactly the held-out digits'; the others drawn from N(0.5, 0.1^2)
    (independent of the known ones: their mean, 320 values a side, standard error 0.006)."""
    out = tmp_path / "i.h5"
    ok("sample", "--recipe", write(tmp_path, DIGITS), "--out", out, "-n", "10",
       "--keep-float", "--inpaint-mask", half_mask, "--known", "data",
       "-o", f"sampler.kind={kind}")
    x, known = floats(out), heldout_digits(10)
    np.testing.assert_array_equal(x[..., :4], known[..., :4])
    assert abs(x[..., 4:].mean() - 0.5) < 0.04
    c = control(out)
    assert c["mode"] == "inpaint" and c["mask"] == str(half_mask.resolve())
    assert c["mask_shape"] == [8, 8] and len(c["mask_sha256"]) == 64
    assert c["known"] == "data (digits, held-out split)" and c["known_rows"] == 10


def test_inpainting_vectors_from_an_hdf5_mask_and_a_sample_file(tmp_path):
    """Coordinate 0 known from a 5-row sample file (sample i takes row i % 5), coordinate 1
    generated."""
    recipe, source, out = write(tmp_path, EXACT), tmp_path / "src.h5", tmp_path / "v.h5"
    ok("sample", "--recipe", recipe, "--out", source, "-n", "5", "--seed", "9")
    with h5py.File(tmp_path / "mask.h5", "w") as f:
        f["which"] = np.array([0, 1], np.uint8)
    ok("sample", "--recipe", recipe, "--out", out, "-n", "12", "--known", source,
       "--inpaint-mask", f"{tmp_path / 'mask.h5'}:which")
    x, src = rows(out), rows(source)
    np.testing.assert_array_equal(x[:, 0], src[np.arange(12) % 5, 0])
    assert len(set(x[:, 1].tolist())) == 12
    c = control(out)
    assert c["mask"] == f"{(tmp_path / 'mask.h5').resolve()}:which"
    assert c["known"] == str(source.resolve()) and c["known_rows"] == 5


def test_resume_reuses_the_files_control_and_refuses_another(tmp_path, half_mask):
    recipe, ref, out = write(tmp_path, DIGITS), tmp_path / "ref.h5", tmp_path / "out.h5"
    args = ["--recipe", recipe, "-n", "12", "--inpaint-mask", half_mask, "--known", "data"]
    ok("sample", "--out", ref, *args)
    ok("sample", "--out", out, *args)
    with h5py.File(out, "a") as f:
        f.attrs["complete"], f.attrs["num_written"] = False, 8
        f["samples"].resize(8, axis=0)
    other = np.zeros((8, 8), np.uint8)
    other[:4] = 255
    Image.fromarray(other).save(tmp_path / "top.png")
    source = tmp_path / "src.h5"
    ok("sample", "--recipe", recipe, "--out", source, "-n", "4")
    before = out.read_bytes()
    for extra, needle in (((["--inpaint-mask", tmp_path / "top.png", "--known", "data"]),
                           "control.mask"),
                          ((["--inpaint-mask", half_mask, "--known", source]), "control.known"),
                          ((["--interpolate", "3"]), "control")):
        result = cli("sample", "--out", out, "--resume", *extra)
        assert_one_line_error(result, "cannot resume", needle)
        assert out.read_bytes() == before
    Image.fromarray(other).save(half_mask)  # the recorded mask changed on disk
    assert_one_line_error(cli("sample", "--out", out, "--resume"), "control.mask_sha256")
    other[:4], other[:, 4:] = 0, 255
    Image.fromarray(other).save(half_mask)
    assert "4 new" in ok("sample", "--out", out, "--resume").output
    np.testing.assert_array_equal(rows(out), rows(ref))


# --- colourisation and interpolation -------------------------------------------------------------

def test_colourisation_keeps_each_pixels_grey_value(tmp_path):
    """Colour images from an image folder: every sample's channel mean is its source's."""
    folder = tmp_path / "images"
    folder.mkdir()
    pictures = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    for i, picture in enumerate(pictures):
        Image.fromarray(picture).save(folder / f"{i}.png")
    raw = {**DIGITS, "data": {"kind": "image_folder", "root": str(folder), "image_size": 8}}
    out = tmp_path / "c.h5"
    ok("sample", "--recipe", write(tmp_path, raw), "--out", out, "-n", "6", "--keep-float",
       "--colourise", "data", "-o", "sampler.kind=pc")
    x = floats(out)
    from scoretk.plugins import default_registry

    data = default_registry().build("dataset", raw["data"])
    grey = data.batch(torch.arange(6)).numpy().mean(1)
    np.testing.assert_allclose(x.mean(1), grey, atol=1e-6)
    assert x.std(1).mean() > 0.03  # the colours are not the grey image's
    assert control(out)["mode"] == "colourise"


@pytest.mark.parametrize("kind", ["consistent_annealed", "probability_flow"])
def test_interpolation_moves_along_the_arc_between_a_groups_ends(tmp_path, kind):
    """With a linear score (N(0, 0.5^2 I)) every sampler is linear in its noise, and each of
    a group's draws is cos(t_k) p + sin(t_k) q: sample k is exactly cos(t_k) x_0 + sin(t_k)
    x_(K-1). Batches of 3 split the groups of 4 anywhere: the same samples."""
    recipe, a, b = write(tmp_path, EXACT), tmp_path / "a.h5", tmp_path / "b.h5"
    for path, batch in ((a, "3"), (b, "8")):
        ok("sample", "--recipe", recipe, "--out", path, "-n", "8", "--batch-size", batch,
           "--interpolate", "4", "-o", f"sampler.kind={kind}")
    x = rows(a).reshape(2, 4, 2)
    np.testing.assert_allclose(rows(a), rows(b), atol=1e-6)
    for k in range(4):
        t = k / 3 * math.pi / 2
        np.testing.assert_allclose(x[:, k], math.cos(t) * x[:, 0] + math.sin(t) * x[:, 3],
                                   atol=1e-5)
    assert not np.allclose(x[0], x[1]) and control(a) == {"interpolate": 4}


# --- bad input -------------------------------------------------------------------------------------

def _png(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("case,needle", [
    ("missing", "file not found"),
    ("grey", "holds grey or coloured pixels"),
    ("size", "is 4x4 pixels, the images 8x8"),
    ("black", "marks no pixel to generate"),
    ("white", "marks every pixel"),
    ("alone", "--inpaint-mask MASK and --known SOURCE go together"),
    ("both", "give --inpaint-mask or --colourise, not both"),
    ("grey data", "--colourise needs colour images"),
    ("interpolate 1", "--interpolate needs at least 2"),
    ("vector source", "its items are (2,), the model's (1, 8, 8)"),
    ("source is out", "is the output file"),
    ("source missing", "--known"),
])
def test_control_errors_are_one_line_and_leave_the_output_alone(tmp_path, half_mask, case,
                                                                needle):
    out = tmp_path / "keep.h5"
    out.write_bytes(b"precious")
    mask, known = ["--inpaint-mask", half_mask], ["--known", "data"]
    args = {
        "missing": ["--inpaint-mask", tmp_path / "nope.png", *known],
        "grey": ["--inpaint-mask", _png(tmp_path / "g.png", np.full((8, 8), 128)), *known],
        "size": ["--inpaint-mask", _png(tmp_path / "s.png", np.eye(4) * 255), *known],
        "black": ["--inpaint-mask", _png(tmp_path / "b.png", np.zeros((8, 8))), *known],
        "white": ["--inpaint-mask", _png(tmp_path / "w.png", np.full((8, 8), 255)), *known],
        "alone": mask, "both": [*mask, *known, "--colourise", "data"],
        "grey data": ["--colourise", "data"], "interpolate 1": ["--interpolate", "1"],
        "vector source": [*mask, "--known", "VECTORS"], "source is out": [*mask, "--known", out],
        "source missing": [*mask, "--known", tmp_path / "none.h5"],
    }[case]
    if "VECTORS" in args:
        vectors = tmp_path / "vectors.h5"
        ok("sample", "--recipe", write(tmp_path, EXACT, "v.yaml"), "--out", vectors, "-n", "2")
        args = [vectors if a == "VECTORS" else a for a in args]
    result = cli("sample", "--recipe", write(tmp_path, DIGITS), "--out", out, "--force", *args)
    assert_one_line_error(result, needle)
    assert out.read_bytes() == b"precious"


def test_a_sampler_without_a_condition_argument(tmp_path, half_mask, monkeypatch):
    """A sampler written before conditions existed samples as before and refuses a mask."""
    from scoretk_plugins.samplers.pc import PredictorCorrector

    real = PredictorCorrector.sample

    def sample(self, net, schedule, shape, noise, *, device="cpu", init=None, progress=None):
        return real(self, net, schedule, shape, noise, device=device, init=init,
                    progress=progress)

    monkeypatch.setattr(PredictorCorrector, "sample", sample)
    recipe, out = write(tmp_path, DIGITS), tmp_path / "o.h5"
    ok("sample", "--recipe", recipe, "--out", out, "-n", "2", "-o", "sampler.kind=pc")
    result = cli("sample", "--recipe", recipe, "--out", out, "--force", "-o", "sampler.kind=pc",
                 "--inpaint-mask", half_mask, "--known", "data")
    assert_one_line_error(result, "sampler: 'pc' takes no condition", "--inpaint-mask")
