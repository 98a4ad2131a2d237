"""Sample quality against real data, always beside the same figure for held-out real data.

`python -m scoretk.evaluation samples.h5` rebuilds the recipe's dataset, splits it into training
and held-out real data, and scores the samples and the held-out set against the training set:
k-NN precision/recall (Kynkäänniemi et al. 2019), a Fréchet distance, and the class histogram
of a k-NN classifier on the training set. A number alone means little on tiny data; the
held-out row says what a perfect generator would score at the same N.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scoretk.data import DataParams
from scoretk.registry import Registry

PR_TOLERANCE = 0.2
MAX_REFERENCE = 10000
"""Cap on real items used (pairwise distances, classifier training); a fixed random subset."""


# --- metrics ------------------------------------------------------------------------------

def _flat(x: np.ndarray | Tensor) -> Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    return x.detach().reshape(len(x), -1).to(torch.float64)


def _chunked_cdist(a: Tensor, b: Tensor, fn, chunk: int = 1024) -> Tensor:
    """fn(distances of a chunk of rows of a to all of b) per chunk, concatenated (bounded memory)."""
    return torch.cat([fn(torch.cdist(a[i:i + chunk], b)) for i in range(0, len(a), chunk)])


def knn_radii(x: Tensor, k: int = 3) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    return _chunked_cdist(x, x, lambda d: d.topk(k + 1, dim=1, largest=False).values[:, k])


def manifold_coverage(query: Tensor, support: Tensor, radii: Tensor) -> float:
    """Fraction of `query` inside the union of balls (support_i, radii_i)."""
    inside = _chunked_cdist(query, support, lambda d: (d <= radii[None]).any(1))
    return float(inside.double().mean())


def precision_recall(fake: Tensor, real: Tensor, k: int = 3,
                     real_radii: Tensor | None = None) -> tuple[float, float]:
    """Improved precision (fake within the real manifold) and recall (real within the fake
    manifold), manifolds being k-NN balls (Kynkäänniemi et al. 2019). Pass `real_radii`
    (from `knn_radii(real, k)`) to reuse them across several fake sets."""
    fake, real = _flat(fake), _flat(real)
    if real_radii is None:
        real_radii = knn_radii(real, k)
    precision = manifold_coverage(fake, real, real_radii)
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


def frechet_distance(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between fitted Gaussians.

    The trace of the matrix square root is taken from the eigenvalues of the symmetric
    S_a^1/2 S_b S_a^1/2 (same value as scipy's sqrtm, but stable for singular covariances)."""
    a, b = _flat(a).numpy(), _flat(b).numpy()
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sb @ root_a), 0, None)).sum()
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * cross)


def knn_classify(query: Tensor, train: Tensor, labels: Tensor, k: int = 5) -> Tensor:
    """Majority vote of the k nearest training items (ties go to the nearest one's class):
    no training step, and on the digits as accurate as a linear classifier."""
    num_classes = int(labels.max()) + 1
    nn_idx = _chunked_cdist(_flat(query), _flat(train),
                            lambda d: d.topk(min(k, d.shape[1]), dim=1, largest=False).indices)
    votes = torch.nn.functional.one_hot(labels[nn_idx], num_classes).sum(1).double()
    votes[torch.arange(len(nn_idx)), labels[nn_idx[:, 0]]] += 0.5
    return votes.argmax(1)


def class_histogram(pred: np.ndarray, num_classes: int, min_fraction: float) -> dict[str, Any]:
    frac = np.bincount(pred, minlength=num_classes)[:num_classes] / max(len(pred), 1)
    return {"class_fraction": [round(float(f), 4) for f in frac],
            "classes_present": int((frac >= min_fraction).sum())}


def evaluate(samples: np.ndarray | Tensor, real_train: np.ndarray | Tensor,
             real_heldout: np.ndarray | Tensor, labels_train: np.ndarray | Tensor | None = None,
             labels_heldout: np.ndarray | Tensor | None = None, *, k: int = 3, seed: int = 0,
             min_class_fraction: float = 0.02) -> dict[str, Any]:
    """Score `samples` and `real_heldout` (both (N, ...), [0, 1]) against `real_train`.

    Samples and held-out data are cut to the same N (first N samples, a fixed random subset of
    held-out data), since k-NN radii and covariance estimates depend on N. A class counts as
    present when it has at least `min_class_fraction` of the items, so that scattered
    misclassifications of garbage do not count as covering a class.
    """
    fake, train, held = _flat(samples), _flat(real_train), _flat(real_heldout)
    if fake.shape[1] != train.shape[1] or held.shape[1] != train.shape[1]:
        raise ValueError(f"item sizes differ: samples {fake.shape[1]}, training "
                         f"{train.shape[1]}, held-out {held.shape[1]} values")
    n = min(len(fake), len(held))
    pick = torch.randperm(len(held), generator=torch.Generator().manual_seed(seed))[:n]
    fake, held = fake[:n], held[pick]
    rows = {"samples": fake, "real": held}
    space = "pixels" if samples.ndim == 4 else "raw values"
    out: dict[str, Any] = {"n": n, "n_train": len(train), "k": k, "feature_space": space}
    train_radii = knn_radii(train, k)
    for name, x in rows.items():
        p, r = precision_recall(x, train, k, train_radii)
        out[name] = {"precision": p, "recall": r, "fd": frechet_distance(x, train)}

    if labels_train is not None:
        y = torch.as_tensor(np.asarray(labels_train)).long()
        num_classes = int(y.max()) + 1
        pred = {name: knn_classify(x, train, y).numpy() for name, x in rows.items()}
        for name in rows:
            out[name].update(class_histogram(pred[name], num_classes, min_class_fraction))
        out["num_classes"] = num_classes
        if labels_heldout is not None:
            yh = np.asarray(labels_heldout).astype(np.int64)[pick.numpy()]
            out["classifier_accuracy"] = float((pred["real"] == yh).mean())

    s, r = out["samples"], out["real"]
    checks = {"precision": abs(s["precision"] - r["precision"]) <= PR_TOLERANCE,
              "recall": abs(s["recall"] - r["recall"]) <= PR_TOLERANCE}
    aim = f"precision and recall within {PR_TOLERANCE} of held-out real"
    if "num_classes" in out:
        checks["classes"] = s["classes_present"] == out["num_classes"]
        aim += f", all {out['num_classes']} classes present"
    failed = [c for c, ok in checks.items() if not ok]
    out["pass"] = not failed
    out["verdict"] = (f"{'PASS' if not failed else 'FAIL'}: {aim}"
                      + (f" (failed: {', '.join(failed)})" if failed else ""))
    return out


def format_report(res: dict[str, Any]) -> str:
    """The table printed by the command line."""
    s, r = res["samples"], res["real"]
    lines = [f"N = {res['n']} samples vs {res['n']} held-out real, each scored against "
             f"{res['n_train']} training real ({res['feature_space']})",
             f"{'metric':<26}{'samples':>10}{'held-out':>10}"]
    lines += [f"{'precision (k=%d)' % res['k']:<26}{s['precision']:>10.3f}{r['precision']:>10.3f}",
              f"{'recall (k=%d)' % res['k']:<26}{s['recall']:>10.3f}{r['recall']:>10.3f}",
              f"{'Frechet distance':<26}{s['fd']:>10.3f}{r['fd']:>10.3f}"]
    if "num_classes" in res:
        c = res["num_classes"]
        lines.append(f"{'classes present':<26}{s['classes_present']:>7}/{c:<2}"
                     f"{r['classes_present']:>7}/{c:<2}")
        lines.append("class histogram (fraction per class predicted by a 5-NN classifier on the "
                     "training real data):")
        lines.append(f"{'class':<10}" + "".join(f"{i:>6}" for i in range(c)))
        for name, row in (("samples", s), ("held-out", r)):
            lines.append(f"{name:<10}" + "".join(f"{f:>6.2f}" for f in row["class_fraction"]))
        if "classifier_accuracy" in res:
            lines.append(f"(classifier accuracy on held-out real: "
                         f"{res['classifier_accuracy']:.3f})")
    lines.append(res["verdict"])
    return "\n".join(lines)


# --- reference data from a recipe -----------------------------------------------------------

def _dataset_arrays(ds, seed: int, max_items: int = MAX_REFERENCE) -> tuple[Tensor, Tensor | None]:
    idx = torch.arange(len(ds))
    if len(ds) > max_items:
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:max_items]
        idx = idx.sort().values
    labels = getattr(ds, "labels", None)
    return ds.batch(idx), (labels[idx] if labels is not None else None)


def reference_data(data_block: dict[str, Any], registry: Registry, seed: int = 0):
    """(train, train_labels, heldout, heldout_labels) from a recipe's data block, without its
    training augmentations: the dataset's own held-out split where it has one, otherwise a
    fixed random half of the data."""
    spec = dict(data_block)
    comp = registry.get("dataset", spec.pop("kind"))
    params = comp.params.model_validate(spec)
    params = params.plain() if isinstance(params, DataParams) else params
    split = params.heldout_split() if isinstance(params, DataParams) else None
    if split is None:
        x, y = _dataset_arrays(comp.build(params), seed, 2 * MAX_REFERENCE)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        half = len(perm) // 2
        tr, te = perm[:half], perm[half:]
        return x[tr], (y[tr] if y is not None else None), x[te], (y[te] if y is not None else None)
    (xtr, ytr), (xte, yte) = (_dataset_arrays(comp.build(p), seed) for p in split)
    return xtr, ytr, xte, yte


def read_samples(path: str) -> tuple[np.ndarray, dict[str, Any] | None, bool]:
    """Samples as float (N, C, H, W) in [0, 1] (or (N, D) vectors), the stored recipe, and
    whether the writer marked the file complete (an interrupted file is still evaluated)."""
    from scoretk.store import reading

    with reading(path) as f:
        ds = f["samples"]
        n = int(f.attrs.get("num_written", ds.shape[0]))
        x = ds[:n]
        recipe = f.attrs.get("recipe")
        complete = bool(f.attrs.get("complete", True))
    if len(x) == 0:
        raise ValueError("no samples written yet (num_written is 0)")
    if isinstance(recipe, bytes):
        recipe = recipe.decode()
    recipe = json.loads(recipe) if recipe is not None else None
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
        if x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    return np.ascontiguousarray(x, dtype=np.float32), recipe, complete


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scoretk.evaluation", description=__doc__.split(
        "\n")[0])
    ap.add_argument("samples", help="HDF5 sample file (dataset 'samples', attribute 'recipe')")
    ap.add_argument("--reference-recipe", metavar="R",
                    help="recipe YAML whose data block gives the real data (default: the "
                    "recipe stored in the sample file)")
    ap.add_argument("--k", type=int, default=3, help="neighbours for precision/recall")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fixed subsets")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    try:
        samples, recipe, complete = read_samples(args.samples)
    except Exception as exc:  # noqa: BLE001 - any failure to read is one line and exit 2
        print(f"error: cannot read {args.samples}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.reference_recipe:
            from scoretk.recipe import read_yaml

            recipe = read_yaml(args.reference_recipe)
        if not isinstance(recipe, dict) or not isinstance(recipe.get("data"), dict):
            raise ValueError("no recipe with a data block: the file has no 'recipe' attribute; "
                             "pass --reference-recipe")
        from scoretk.plugins import load_plugins

        registry = load_plugins().registry
        xtr, ytr, xte, yte = reference_data(recipe["data"], registry, args.seed)
        if samples.shape[1:] != tuple(xtr.shape[1:]):
            raise ValueError(f"samples have shape {samples.shape[1:]}, the recipe's data "
                             f"{tuple(xtr.shape[1:])}")
        res = evaluate(samples, xtr, xte, ytr, yte, k=args.k, seed=args.seed)
    except Exception as exc:  # noqa: BLE001
        print(f"error: cannot evaluate {args.samples}: {exc}", file=sys.stderr)
        return 2
    if not complete:
        print(f"note: {args.samples} is not marked complete; evaluating the {len(samples)} "
              "samples written so far", file=sys.stderr)
    print(json.dumps(res, indent=1) if args.json else format_report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
