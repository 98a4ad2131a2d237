"""Features of a source, batch by batch, and the on-disk cache of real data's features.

Only one batch of images is in memory at a time; what accumulates is the features (N x D
float32). Features of real data are cached, keyed by the data (dataset params, split, number
of items, subset seed) and the extractor's fingerprint (name, weights hash, input protocol),
so a reference set costs its Inception pass once per machine.

The cache lives in `$SCORETK_CACHE_DIR/features`, else `$XDG_CACHE_HOME/scoretk/features`, else
`~/.cache/scoretk/features`; deleting it is always safe.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from scoretk.components import FeatureExtractor
from scoretk.evaluation.sources import EvaluationError, Source
from scoretk.files import atomic_write

CACHE_ENV = "SCORETK_CACHE_DIR"
CACHE_FORMAT = 1


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "features"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scoretk" / "features"


def extract(source: Source, extractor: FeatureExtractor, name: str,
            batch_size: int = 50) -> Tensor:
    """(N, D) features of every item of `source`, with a progress bar on a terminal."""
    parts = []
    with tqdm(total=source.length, desc=f"{name}: {source.name}", unit="item",
              disable=None, leave=False) as bar:
        for start in range(0, source.length, batch_size):
            batch = source.read(start, min(start + batch_size, source.length))
            try:
                parts.append(extractor(batch))
            except ValueError as exc:
                raise EvaluationError(f"features {name} on {source.name}: {exc}") from None
            bar.update(len(batch))
    if not parts:
        raise EvaluationError(f"{source.name}: no items to score")
    return torch.cat(parts)


def cached_extract(source: Source, extractor: FeatureExtractor, name: str,
                   batch_size: int = 50) -> Tensor:
    """`extract`, through the cache when the source is real data with a key."""
    if source.key is None:
        return extract(source, extractor, name, batch_size)
    key = json.dumps({"format": CACHE_FORMAT, "features": extractor.fingerprint, **source.key},
                     sort_keys=True)
    path = cache_dir() / (f"{source.key['data']['kind']}-{source.length}-"
                          f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz")
    cached = _load(path, key)
    if cached is not None:
        return cached
    features = extract(source, extractor, name, batch_size)
    _save(path, key, features)
    return features


def _load(path: Path, key: str) -> Tensor | None:
    """The cached features, or None when absent, unreadable or made for another key."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            return torch.from_numpy(f["features"].copy())
    except (OSError, KeyError, ValueError):
        return None


def _save(path: Path, key: str, features: Tensor) -> None:
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), features=features.numpy())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(buf.getvalue()))
    except OSError as exc:  # a read-only home must not cost the figures just computed
        print(f"warning: cannot write the feature cache {path}: {exc}", file=sys.stderr)

