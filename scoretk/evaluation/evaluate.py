"""Sample quality against real data, in standard feature spaces, beside held-out real data.

`scoretk evaluate SAMPLES.h5 --against (REF.h5 | RECIPE)` scores the samples in each feature
space asked for, all against the whole reference set: FID, KID, k-NN precision, recall, density
and coverage, the Inception Score where the extractor has a classifier, and, for labelled data,
the classes a k-NN classifier finds. Against a recipe, held-out real data of the same size gets
the same figures: what a perfect generator would score at this N (the k-NN figures and FID
depend on N, so a figure means little without it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import h5py
import torch
from pydantic import ValidationError
from torch import Tensor

from scoretk.components import FeatureExtractor
from scoretk.evaluation.features import cached_extract, extract
from scoretk.evaluation.metrics import (K_NEIGHBOURS, KID_SUBSET_SIZE, KID_SUBSETS,
                                        GaussianStats, class_histogram, frechet_distance,
                                        gaussian_stats, inception_score, kernel_distance,
                                        knn_classify, knn_radii, manifold_metrics)
from scoretk.evaluation.requirements import Requirement, parse_requirement
from scoretk.evaluation.sources import (EvaluationError, Source, file_source, real_sources,
                                        stored_recipe)
from scoretk.registry import Registry

DEFAULT_NUM_REFERENCE = 50_000
"""Reference items (the size of CIFAR-10's training set, against which papers report FID)."""
FID_COMPARABLE_N = 10_000


@dataclass(frozen=True)
class Settings:
    """How an evaluation runs: feature batch size, the seed of the KID subsets, and their
    number."""

    batch_size: int = 50
    seed: int = 0
    kid_subsets: int = KID_SUBSETS


@dataclass(frozen=True)
class RealFeatures:
    """Reference features and what every figure against them reuses: their Gaussian
    statistics and each item's k-NN radius."""

    features: Tensor
    labels: Tensor | None
    stats: GaussianStats
    radii: Tensor


def real_features(features: Tensor, labels: Tensor | None) -> RealFeatures:
    return RealFeatures(features, labels, gaussian_stats(features),
                        knn_radii(features, K_NEIGHBOURS))


def figures(fake: Tensor, real: RealFeatures, extractor: FeatureExtractor,
            settings: Settings = Settings()) -> dict[str, Any]:
    """Every figure for one set of features against the reference."""
    out: dict[str, Any] = {"fid": frechet_distance(gaussian_stats(fake), real.stats)}
    out["kid_mean"], out["kid_std"] = kernel_distance(fake, real.features, settings.kid_subsets,
                                                      seed=settings.seed)
    out["kid_subset_size"] = min(KID_SUBSET_SIZE, len(fake), len(real.features))
    out.update(manifold_metrics(fake, real.features, K_NEIGHBOURS, real.radii))
    logits = extractor.class_logits(fake)
    out["is_mean"], out["is_std"] = (None, None) if logits is None else inception_score(logits)
    if real.labels is not None:
        num_classes = int(real.labels.max()) + 1
        pred = knn_classify(fake, real.features, real.labels)
        out.update(class_histogram(pred, num_classes), num_classes=num_classes)
    return out


def score_space(name: str, extractor: FeatureExtractor, samples: Source, reference: Source,
                heldout: Source | None, settings: Settings = Settings()) -> dict[str, Any]:
    """All figures in one feature space, for the samples and (if given) held-out data."""
    ref = cached_extract(reference, extractor, name, settings.batch_size)
    fake = extract(samples, extractor, name, settings.batch_size)
    real = real_features(ref, reference.labels)
    out = {"features": name, "description": extractor.describe(), "num_samples": len(fake),
           "num_reference": len(ref), "k": K_NEIGHBOURS,
           **figures(fake, real, extractor, settings)}
    if heldout is not None:
        held = cached_extract(heldout, extractor, name, settings.batch_size)
        out["heldout"] = {"num_samples": len(held), **figures(held, real, extractor, settings)}
    return out


def evaluate(samples: Source, reference: Source, heldout: Source | None,
             extractors: dict[str, FeatureExtractor], requirements: Iterable[Requirement] = (),
             *, settings: Settings = Settings()) -> dict[str, Any]:
    """Figures in each feature space (the first at the top level, the others under
    `other_features`), requirement checks, and warnings about comparability."""
    for source in (samples, reference, heldout):
        if source is not None and source.length <= K_NEIGHBOURS:
            raise EvaluationError(f"{source.name}: {source.length} items; the k-NN figures "
                                  f"need more than {K_NEIGHBOURS}")
    spaces = {name: score_space(name, ext, samples, reference, heldout, settings)
              for name, ext in extractors.items()}
    first = next(iter(spaces))
    checks = [req.check(spaces[req.space or first]) for req in requirements]
    return {**spaces[first], "samples": samples.name, "reference": reference.name,
            "heldout_source": heldout.name if heldout is not None else None,
            "other_features": {n: s for n, s in spaces.items() if n != first},
            "warnings": _warnings(spaces[first]), "requirements": checks,
            "pass": all(c["pass"] for c in checks)}


def _warnings(space: dict[str, Any]) -> list[str]:
    out = []
    n = space["num_samples"]
    if n < FID_COMPARABLE_N:
        out.append(f"FID from {n:,} samples: below {FID_COMPARABLE_N:,} it is biased upward "
                   "and not comparable with published figures (usually 50,000 samples)")
    if space["kid_subset_size"] < KID_SUBSET_SIZE:
        out.append(f"KID subsets of {space['kid_subset_size']} (fewer items than the usual "
                   f"{KID_SUBSET_SIZE})")
    held = space.get("heldout")
    if held is not None and held["num_samples"] < n:
        out.append(f"only {held['num_samples']:,} held-out items for {n:,} samples: the "
                   "held-out figures are at a smaller N")
    return out


# --- from the command line ------------------------------------------------------------------

def evaluate_file(samples_path: str, registry: Registry, *, against: str | None = None,
                  feature_names: Iterable[str] = (), feature_weights: str | None = None,
                  num_samples: int | None = None, num_reference: int = DEFAULT_NUM_REFERENCE,
                  batch_size: int = 50, device: str | torch.device = "auto", seed: int = 0,
                  requirements: Iterable[str] = (), overrides: Iterable[str] = ()
                  ) -> dict[str, Any]:
    """`scoretk evaluate`: everything checkable is checked before any feature is computed."""
    reqs = [parse_requirement(r) for r in requirements]
    samples = file_source(samples_path, num_samples)
    reference, heldout = reference_sources(samples, against, registry, num_reference, seed,
                                           list(overrides))
    if samples.item_shape != reference.item_shape:
        raise EvaluationError(f"{samples.name} holds items of shape {samples.item_shape}, "
                              f"{reference.name} of shape {reference.item_shape}")
    names = list(feature_names) or (["inception_v3"] if samples.is_image else ["pixels"])
    _check_requirements(reqs, names, heldout)
    extractors = build_extractors(registry, names, feature_weights, device)
    return evaluate(samples, reference, heldout, extractors, reqs,
                    settings=Settings(batch_size=batch_size, seed=seed))


def reference_sources(samples: Source, against: str | None, registry: Registry,
                      num_reference: int, seed: int = 0, overrides: list[str] = ()
                      ) -> tuple[Source, Source | None]:
    """(reference, held-out) for `--against`: an HDF5 file (no held-out data), a recipe, or,
    when absent, the recipe stored in the sample file; `overrides` (-o data.root=...) apply
    to the recipe."""
    from scoretk.recipe import RecipeError, apply_overrides, read_yaml

    if against is not None and h5py.is_hdf5(against):
        if overrides:
            raise EvaluationError(f"-o {overrides[0]}: overrides apply to a recipe, and "
                                  f"{against} is an HDF5 file")
        return file_source(against, num_reference), None
    recipe = read_yaml(against) if against is not None else stored_recipe(samples.name)
    where = against or f"the recipe stored in {samples.name}"
    if not isinstance(recipe, dict) or not isinstance(recipe.get("data"), dict):
        if against is None:
            raise EvaluationError(f"{samples.name} stores no recipe: pass --against REF.h5 "
                                  "or --against RECIPE")
        raise RecipeError(against, "data", "missing: a recipe to evaluate against needs a "
                          "data block")
    recipe = apply_overrides(recipe, overrides)
    try:
        return real_sources(recipe["data"], registry, num_reference, samples.length, seed)
    except ValidationError as exc:
        fields = "; ".join(f"data.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                           for e in exc.errors())
        raise EvaluationError(f"{where}: {fields}") from None


def _check_requirements(reqs: list[Requirement], names: list[str],
                        heldout: Source | None) -> None:
    for req in reqs:
        if req.space is not None and req.space not in names:
            raise EvaluationError(f"--require {req.text!r}: feature space {req.space!r} is not "
                                  f"evaluated (--features {' '.join(names)})")
        if req.relative and heldout is None:
            raise EvaluationError(f"--require {req.text!r}: no held-out data against an HDF5 "
                                  "reference; use a number")


def build_extractors(registry: Registry, names: list[str], weights: str | None,
                     device: str | torch.device = "auto") -> dict[str, FeatureExtractor]:
    """One extractor per name; `weights` goes to those whose params take a weights file.
    `device`: the execution policy's, or a name to pick one by."""
    from scoretk.execution.distributed import Dist, pick_device

    dev = device if isinstance(device, torch.device) else pick_device(device, Dist())
    comps = {name: registry.get("features", name) for name in dict.fromkeys(names)}
    takers = [n for n, c in comps.items() if "weights" in c.params.model_fields]
    if weights is not None and not takers:
        raise EvaluationError(f"--feature-weights: none of the features {', '.join(comps)} "
                              "takes a weights file")
    return {n: c.build({"weights": weights} if weights is not None and n in takers else {},
                       device=dev)
            for n, c in comps.items()}


# --- the report -----------------------------------------------------------------------------

_ROWS = (("fid", "FID", "{:.3f}"), ("kid_mean", "KID", "{:.5f}"), ("kid_std", "KID std", "{:.5f}"),
         ("precision", "precision (k=3)", "{:.3f}"), ("recall", "recall (k=3)", "{:.3f}"),
         ("density", "density (k=3)", "{:.3f}"), ("coverage", "coverage (k=3)", "{:.3f}"),
         ("is_mean", "Inception Score", "{:.3f}"), ("is_std", "IS std", "{:.3f}"))


def _cell(value: Any, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def format_space(space: dict[str, Any]) -> list[str]:
    held = space.get("heldout")
    lines = [space["description"],
             f"{'metric':<22}{'samples':>12}" + (f"{'held-out':>12}" if held else "")]
    for key, label, fmt in _ROWS:
        row = f"{label:<22}{_cell(space[key], fmt):>12}"
        lines.append(row + (f"{_cell(held[key], fmt):>12}" if held else ""))
    if "num_classes" in space:
        c = space["num_classes"]
        row = f"{'classes present':<22}{space['classes_present']:>9}/{c:<2}"
        lines.append(row + (f"{held['classes_present']:>9}/{c:<2}" if held else ""))
    return lines


def format_report(result: dict[str, Any]) -> str:
    """The text `scoretk evaluate` prints."""
    held = result.get("heldout")
    head = (f"{result['samples']}: {result['num_samples']:,} samples against "
            f"{result['reference']} ({result['num_reference']:,} items)")
    if held:
        head += f"; held-out: {result['heldout_source']} ({held['num_samples']:,} items)"
    lines = [head, ""] + format_space(result)
    for space in result["other_features"].values():
        lines += [""] + format_space(space)
    if result["requirements"]:
        lines += [""] + format_checks(result["requirements"], result["pass"])
    return "\n".join(lines)


def format_checks(checks: list[dict[str, Any]], passed: bool) -> list[str]:
    lines = []
    for c in checks:
        detail = c.get("reason") or f"{c['value']:.4g} {c['op']} {c['bound']:.4g}"
        lines.append(f"{'PASS' if c['pass'] else 'FAIL'}  {c['require']}: {detail}")
    met = sum(c["pass"] for c in checks)
    return lines + [f"{'PASS' if passed else 'FAIL'}: {met} of {len(checks)} requirements met"]
