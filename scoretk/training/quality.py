"""Sample quality during training (`train.eval_every`): draw `eval_samples` with the averaged
weights, score them against the training data in a feature space, log the figures, and keep
checkpoints/best.pt by the chosen one (model selection as ncsnv2 does it with its fast FID).

The samples come from the same seeded noise at every evaluation, so two evaluations differ only
by the weights. Reference features are computed once per command (and cached on disk, keyed
like `scoretk evaluate`'s); docs/evaluation.md explains the figures and why they depend on N.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from tqdm import tqdm

from scoretk.checkpoint import BEST
from scoretk.components import Dataset, FeatureExtractor
from scoretk.evaluation.evaluate import RealFeatures, figures, real_features
from scoretk.evaluation.features import cached_extract, extract
from scoretk.evaluation.sources import real_sources, tensor_source
from scoretk.execution.policy import ExecutionPolicy
from scoretk.recipe import Recipe, TrainConfig
from scoretk.registry import Registry

LOWER_IS_BETTER = {"fid", "kid_mean"}
MIN_REFERENCE = 10_000
"""Reference items at least (fewer when the data has fewer): FID is biased at small N."""


def features_for(cfg: TrainConfig, item_shape: tuple[int, ...]) -> str:
    """`auto`: Inception features for colour images (the standard FID), pixels otherwise
    (vectors, grey or tiny images, where Inception says little)."""
    if cfg.eval_features != "auto":
        return cfg.eval_features
    return "inception_v3" if len(item_shape) == 3 and item_shape[0] == 3 else "pixels"


def improves(metric: str, value: float, best: dict[str, Any] | None) -> bool:
    if best is None or best.get("metric") != metric:
        return True
    return value < best["value"] if metric in LOWER_IS_BETTER else value > best["value"]


@dataclass
class EvalSetup:
    """What the evaluations need beyond the session, built before the run directory is
    touched: a missing feature extractor or its weights fail the command at its start."""

    registry: Registry
    data: Dataset
    features: str
    extractor: FeatureExtractor


def prepare(recipe: Recipe, registry: Registry, data: Dataset,
            policy: ExecutionPolicy) -> EvalSetup | None:
    """None when the recipe does not evaluate (`train.eval_every: 0`) or on ranks but 0."""
    if not recipe.train.eval_every or not policy.dist.is_main:
        return None
    features = features_for(recipe.train, tuple(data.shape))
    extractor = registry.get("features", features).build({}, device=policy.device)
    return EvalSetup(registry, data, features, extractor)


class EvaluateSamples:
    """The periodic evaluation; a Periodic of the training loop (see callbacks.py). Rank 0
    evaluates while the others wait."""

    def __init__(self, session: Any, setup: EvalSetup | None):
        self.s, self.setup = session, setup
        cfg = session.recipe.train
        self.every, self.metric = cfg.eval_every, cfg.eval_metric
        self.real: RealFeatures | None = None

    def due(self, info: Any) -> bool:
        return bool(self.every) and (info.step % self.every == 0 or info.final)

    def __call__(self, info: Any) -> None:
        setup = self.setup
        if setup is not None:
            fake = extract(tensor_source(self._draw()), setup.extractor, setup.features)
            self._record(info.step, figures(fake, self._reference(), setup.extractor))
        self.s.policy.dist.barrier()

    def _reference(self) -> RealFeatures:
        if self.real is None:
            cfg = self.s.recipe.train
            setup = self.setup
            reference, _ = real_sources(self.s.recipe.data.dump(), setup.registry,
                                        max(MIN_REFERENCE, cfg.eval_samples),
                                        cfg.eval_samples, seed=cfg.seed)
            found = cached_extract(reference, setup.extractor, setup.features)
            self.real = real_features(found, reference.labels)
        return self.real

    def _draw(self) -> Tensor:
        cfg = self.s.recipe.train
        with tqdm(total=cfg.eval_samples, desc="eval samples", leave=False, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            return self.s.draw("eval", cfg.eval_samples, self.s.recipe.sample.batch_size,
                               self.setup.data, bar)

    def _record(self, step: int, found: dict[str, Any]) -> None:
        """metrics.jsonl and TensorBoard; best.pt when the chosen figure improved."""
        s, value = self.s, float(found[self.metric])
        better = improves(self.metric, value, s.best)
        scalars = {k: v for k, v in found.items() if isinstance(v, (int, float)) and v == v}
        features = self.setup.features
        record = {"step": step, "eval": {"features": features,
                                         "num_samples": self.s.recipe.train.eval_samples,
                                         **scalars, "best": better}}
        s.run.dir.append_line(s.run.dir.metrics, json.dumps(record), "metrics")
        if s.writer is not None:
            for key, v in scalars.items():
                s.writer.add_scalar(f"eval/{key}", v, step)
        if better:
            s.best = {"metric": self.metric, "value": value, "step": step,
                      "features": features}
            s.run.dir.save_named(s.checkpoint_state(step), BEST)
        note = "new best" if better else f"best {s.best['value']:.4g} at step {s.best['step']}"
        s.bar.write(f"eval at step {step}: {self.metric} {value:.4g} ({features}, "
                    f"{record['eval']['num_samples']} samples); {note}", file=sys.stderr)
