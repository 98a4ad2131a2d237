"""Sample quality against network evaluations (NFE) for every built-in sampler.

(a) The NCSN toy 0.2 N((-5,-5), I) + 0.8 N((5,5), I) with its exact score, sigma 20 -> 0.01,
    started from an exact draw of p_20 (init: data), so only the sampler's own error shows:
    the errors of the modes' weight, means and standard deviations (beside those of exact
    draws: the sampling noise at this N).
(b) A trained run (`--run DIR`, e.g. the quick start's digits) scored by scoretk.evaluation
    against real data: k-NN precision/recall and the Frechet distance in pixels.

Each sampler meets a budget its own way: annealed Langevin by steps per level (T = 5 on the toy,
whose schedule is free; T on the run's own schedule), consistent annealed and pc by the number
of geometric levels (one, resp. two evaluations per level), heun by its rho-spaced steps, the
adaptive ODE by its tolerance (its NFE is measured). Prints markdown tables; asserts nothing.
"""
from __future__ import annotations

import argparse
import functools
import time
from typing import Any, Callable

from common import header, registry, table  # noqa: F401  (puts the repository on sys.path)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from scoretk.rng import PerSampleNoise  # noqa: E402
from scoretk_plugins.schedules import GeometricSchedule  # noqa: E402

registry = functools.cache(registry)  # load the plugins once
KINDS = ("annealed_langevin", "consistent_annealed", "pc", "heun", "probability_flow")
TOLERANCES = {10: 1e-1, 30: 1e-2, 100: 1e-3, 300: 1e-4, 1000: 1e-5}


class MixtureScore(nn.Module):
    """Exact score of sum_k w_k N(mu_k, I) noised at sigma."""

    def __init__(self, weights: list[float], means: list[list[float]]):
        super().__init__()
        self.logw, self.mu = torch.tensor(weights).log(), torch.tensor(means)

    def forward(self, x, sigma, level):
        v = (1 + sigma**2)[:, None]
        d = x[:, None, :] - self.mu
        r = torch.softmax(self.logw - 0.5 * d.pow(2).sum(-1) / v, -1)
        return -(r[..., None] * d).sum(1) / v

    def draw(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.logw.exp(), n, replacement=True, generator=g)
        return self.mu[k] + torch.randn(n, self.mu.shape[1], generator=g)


def mode_errors(x: torch.Tensor, net: MixtureScore) -> tuple[float, float, float]:
    """(|weight - w_1|, max |mean - mu_k|, max |std - 1|) over the modes; a point belongs to
    the nearest mode."""
    nearest = torch.cdist(x.double(), net.mu.double()).argmin(1)
    weight = float((nearest == 0).double().mean())
    means = [(x[nearest == k].double().mean(0) - net.mu[k]).abs().max() for k in range(2)]
    stds = [(x[nearest == k].double().std(0) - 1).abs().max() for k in range(2)]
    return abs(weight - net.logw.exp()[0].item()), float(max(means)), float(max(stds))


def configs(kind: str, budget: int, levels: int | None) -> tuple[dict, int | None]:
    """(sampler params, number of geometric levels to build or None: the given schedule)."""
    if kind == "annealed_langevin":
        if levels is None:
            return {"steps_per_level": 5}, max(2, (budget - 1) // 5)
        return {"steps_per_level": max(1, round((budget - 1) / levels))}, None
    if kind == "consistent_annealed":
        return {}, max(2, budget)
    if kind == "pc":
        return {}, max(2, budget // 2)
    if kind == "heun":
        return {"spacing": "rho", "steps": max(2, (budget + 1) // 2)}, None
    tol = TOLERANCES.get(budget, 1e-3)
    return {"solver": "adaptive", "rtol": tol, "atol": tol}, None


def run(kind: str, params: dict, net: nn.Module, schedule, shape, n: int, batch: int,
        init: torch.Tensor | None, device) -> tuple[torch.Tensor, int, float]:
    """(samples, evaluations per sample, seconds), in batches with per-sample noise."""
    sampler = registry().build("sampler", {"kind": kind, **params})
    out, t0 = [], time.perf_counter()
    with torch.no_grad():
        for i0 in range(0, n, batch):
            rows = range(i0, min(i0 + batch, n))
            start = init[i0:rows.stop] if init is not None else None
            out.append(sampler.sample(net, schedule, shape, PerSampleNoise(0, rows, device),
                                      device=device, init=start).cpu())
    return torch.cat(out), sampler.last_evaluations, time.perf_counter() - t0


def sweep(budgets: list[int], kinds: list[str], do: Callable[[str, int], list[str]],
          width: int) -> list[list[str]]:
    """Rows for every sampler and budget, each printed as it comes (runs take long); a
    sampler that fails gets a row saying why."""
    rows = []
    for kind in kinds:
        for budget in budgets:
            try:
                row = do(kind, budget)
            except (RuntimeError, ValueError) as exc:
                row = [kind, f"budget {budget}: failed: {str(exc)[:80]}", *[""] * (width - 2)]
            print("  " + " | ".join(row), flush=True)
            rows.append(row)
    return rows


def bench_mixture(budgets: list[int], kinds: list[str], n: int) -> list[list[str]]:
    net = MixtureScore([0.2, 0.8], [[-5.0, -5.0], [5.0, 5.0]])
    floor = mode_errors(net.draw(n, seed=2), net)

    def do(kind: str, budget: int) -> list[str]:
        params, levels = configs(kind, budget, None)
        sched = GeometricSchedule(20.0, 0.01, levels or 100)
        x, nfe, secs = run(kind, {**params, "init": "data"}, net, sched, (2,), n, n,
                           net.draw(n, seed=1), "cpu")
        errors = mode_errors(x, net)
        return [kind, _params_text(params, levels), str(nfe),
                *(f"{e:.3f}" for e in errors), f"{secs:.1f}"]

    return [["exact draws", "", "", *(f"{e:.3f}" for e in floor), ""],
            *sweep(budgets, kinds, do, 7)]


def load_run(run_dir: str, device: torch.device) -> tuple[Any, Any, Any]:
    """(recipe, model with EMA weights in place, checkpoint step) from a training run."""
    from scoretk.checkpoint import CheckpointError, RunDir, load_checkpoint
    from scoretk.generation.job import load_model
    from scoretk.recipe import Recipe

    ckpt = RunDir(run_dir).latest()
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint")
    state = load_checkpoint(ckpt)
    recipe = Recipe.from_dict(dict(state["recipe"]), registry(), source=str(ckpt))
    model, averager = load_model(ckpt, state, recipe, registry(), device, False)
    averager.averaged(model.net).__enter__()  # keep the EMA weights in for the whole benchmark
    return recipe, model, state.get("step")


def bench_run(run_dir: str, budgets: list[int], kinds: list[str], batch: int,
              device: torch.device, limit: int | None = None) -> list[list[str]]:
    """Each sampler's samples from a trained run, scored by `scoretk evaluate`'s figures in
    pixel space against the training split, beside held-out real data of the same size."""
    from scoretk.evaluation.evaluate import Settings, evaluate
    from scoretk.evaluation.sources import real_sources, tensor_source
    from scoretk_plugins.features import PixelFeatures

    recipe, model, step = load_run(run_dir, device)
    n = limit or 1000
    reference, held = real_sources(recipe.dump()["data"], registry(), 50_000, n)
    n, sig = held.length, model.schedule.sigmas.tolist()
    print(f"\nrun {run_dir}: step {step}, {model.schedule.num_levels} levels "
          f"(sigma {sig[0]:.3g} -> {sig[-1]:.3g}), {n} samples per row against {n} held-out")

    def score(samples) -> dict:
        return evaluate(samples, reference, held, {"pixels": PixelFeatures()},
                        settings=Settings(kid_subsets=10))

    real = score(held)["heldout"]
    rows = [["held-out real", "", "", f"{real['precision']:.3f}", f"{real['recall']:.3f}",
             f"{real['fid']:.3f}", ""]]

    def do(kind: str, budget: int) -> list[str]:
        params, levels = configs(kind, budget, model.schedule.num_levels)
        sched = model.schedule if levels is None else GeometricSchedule(sig[0], sig[-1], levels)
        x, nfe, secs = run(kind, params, model.net, sched, model.shape, n, batch, None, device)
        res = score(tensor_source(x.clamp(0, 1)))
        return [kind, _params_text(params, levels), str(nfe), f"{res['precision']:.3f}",
                f"{res['recall']:.3f}", f"{res['fid']:.3f}", f"{secs:.0f}"]

    return rows + sweep(budgets, kinds, do, 7)


def _params_text(params: dict, levels: int | None) -> str:
    text = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return f"L={levels}" + (f", {text}" if text else "") if levels else text


def main(argv: list[str] | None = None) -> dict[str, list[list[str]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", default="10,30,100,300,1000",
                   help="network evaluations per sample to aim at (comma-separated)")
    p.add_argument("--samplers", default=",".join(KINDS))
    p.add_argument("--n", type=int, default=5000, help="toy samples per row")
    p.add_argument("--run", default=None, help="a training run directory for part (b)")
    p.add_argument("--batch", type=int, default=400, help="batch size for part (b)")
    p.add_argument("--run-n", type=int, default=None,
                   help="part (b): at most this many samples and held-out items per row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    kinds = args.samplers.split(",")
    device = torch.device(args.device)
    header("sampler quality against network evaluations", device, budgets=args.budgets)
    out = {"mixture": bench_mixture(budgets, kinds, args.n)}
    print(table(["sampler", "settings", "NFE", "weight error", "mean error", "std error", "s"],
                out["mixture"]))
    if args.run:
        out["run"] = bench_run(args.run, budgets, kinds, args.batch, device, args.run_n)
        print(table(["sampler", "settings", "NFE", "precision", "recall", "FID (pixels)", "s"],
                    out["run"]))
    return out


if __name__ == "__main__":
    main()
