"""Pretrained weights found on disk and trusted by their SHA-256, never downloaded.

A plugin that needs published weights (a feature extractor, say) lists the files it trusts by
hash and the places a user may have them; `find_weights` takes the first place holding a
trusted file. The bytes are read once, hashed and loaded from memory, so the file checked is
the file loaded. State dicts load with `weights_only=True`; TorchScript runs code from the
archive, so it is accepted only from a file whose hash is listed.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor


class WeightsError(Exception):
    """Weights that cannot be found or are not a trusted file; one line that says where
    scoretk looked and what it found."""


@dataclass(frozen=True)
class KnownWeights:
    """A file trusted by its SHA-256: its format and, for reports, what it is."""

    sha256: str
    format: Literal["state_dict", "torchscript"]
    description: str


@dataclass(frozen=True)
class Candidate:
    """A place weights may be. `explicit`: the user named this file, so a missing or unknown
    one is an error rather than a reason to look further."""

    path: Path
    origin: str
    explicit: bool = False


@dataclass(frozen=True)
class FoundWeights:
    path: Path
    known: KnownWeights
    state: dict[str, Tensor]


def find_weights(what: str, candidates: list[Candidate],
                 known: dict[str, KnownWeights]) -> FoundWeights:
    """Load the first candidate that exists and holds a trusted file.

    An unknown file in a cache (another tool's variant, a partial download) is passed over and
    mentioned if nothing else is found; one the user named explicitly is an error at once.
    """
    passed: list[str] = []
    for cand in candidates:
        if not cand.path.is_file():
            if cand.explicit:
                raise WeightsError(f"{what}: {cand.path} ({cand.origin}) does not exist")
            passed.append(f"{cand.path} ({cand.origin})")
            continue
        data = cand.path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest not in known:
            why = (f"{cand.path} ({cand.origin}) has SHA-256 {digest}, which is not a "
                   f"trusted {what} file")
            if cand.explicit:
                raise WeightsError(f"{what}: {why}; trusted: "
                                   + ", ".join(f"{k.description} {h}" for h, k in known.items()))
            passed.append(f"{cand.path} ({cand.origin}: unknown SHA-256 {digest[:16]}...)")
            continue
        return FoundWeights(cand.path, known[digest], _load(data, known[digest], cand.path))
    raise WeightsError(f"{what}: no weights found (nothing is downloaded); looked in "
                       + "; ".join(passed))


def _load(data: bytes, known: KnownWeights, path: Path) -> dict[str, Tensor]:
    try:
        if known.format == "torchscript":
            with warnings.catch_warnings():  # its deprecation notice says nothing to our users
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(io.BytesIO(data), map_location="cpu")
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a trusted hash that will not load is one line too
        raise WeightsError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state
